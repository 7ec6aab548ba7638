"""Reading dataset files (CSV, TSV, JSON array, JSONL) into rows, with errors that name the row.

Shared by the web app (validation and profiling on upload) and the worker (loading for training), so both
read a file the same way. Plain ``csv``/``json`` from the standard library: no parser library gives
row-numbered error messages for all four formats, and these are a few dozen lines.
"""

import csv
import io
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from app.errors import InvalidDataset

FORMATS = ("csv", "tsv", "json", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PREVIEW_ROWS = 5
MAX_LABEL_CLASSES = 100

Row = dict[str, Any]


def detect_format(filename: str) -> str:
    """The format named by the file's extension; InvalidDataset for anything else."""
    suffix = Path(filename).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise InvalidDataset(
            f"Unsupported file type {suffix or '(none)'!r} for {filename!r}: upload .csv, .tsv, .json or .jsonl.",
            field="file",
        )
    return _EXTENSIONS[suffix]


def _decode(data: bytes) -> str:
    if not data.strip():
        raise InvalidDataset("The file is empty: it has no header and no rows.", field="file")
    if b"\x00" in data[:65536]:
        raise InvalidDataset(
            "The file contains NUL bytes: it looks binary, not a text CSV/TSV/JSON/JSONL file.", field="file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidDataset(
            f"Line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8 and upload it again.",
            field="file",
            row=line,
        ) from None


def _parse_delimited(text: str, delimiter: str) -> tuple[list[str], list[Row]]:
    kind = "CSV" if delimiter == "," else "TSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InvalidDataset(f"The {kind} header cannot be read: {exc}.", field="file", row=1) from None
    header = [name.strip() for name in header]
    if any(not name for name in header):
        position = [name for name in header].index("") + 1
        raise InvalidDataset(f"Column {position} of the header has no name.", field="file", row=1)
    duplicates = [name for name, count in Counter(header).items() if count > 1]
    if duplicates:
        raise InvalidDataset(f"The header repeats the column name {duplicates[0]!r}.", field="file", row=1)
    rows: list[Row] = []
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            row_number = len(rows) + 1
            if len(record) != len(header):
                raise InvalidDataset(
                    f"Row {row_number} (line {reader.line_num}) has {len(record)} fields; the header has "
                    f"{len(header)} ({', '.join(header)}). Quote values that contain the delimiter.",
                    field="file",
                    row=row_number,
                )
            rows.append(dict(zip(header, record, strict=True)))
    except csv.Error as exc:
        raise InvalidDataset(
            f"Line {reader.line_num} cannot be read as {kind}: {exc}.", field="file", row=len(rows) + 1
        ) from None
    if len(header) == 1:
        other = "\t" if delimiter == "," else ","
        hint = ";" if ";" in header[0] else other if other in header[0] else None
        if hint is not None:
            shown = "tab" if hint == "\t" else repr(hint)
            raise InvalidDataset(
                f"The {kind} header has a single column {header[0]!r} that contains {shown}: the file seems to use "
                f"another delimiter. Save it with {'commas (.csv)' if delimiter == ',' else 'tabs (.tsv)'}.",
                field="file",
                row=1,
            )
    return header, rows


def _parse_json_array(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDataset(
            f"The JSON is not valid at line {exc.lineno}, column {exc.colno}: {exc.msg}.", field="file", row=exc.lineno
        ) from None
    if not isinstance(value, list):
        raise InvalidDataset(
            f"A .json dataset must be an array of objects; this file holds a {type(value).__name__}. "
            "Use .jsonl for one object per line.",
            field="file",
        )
    return value


def _parse_jsonl(text: str) -> list[Any]:
    records: list[Any] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidDataset(
                f"Line {line_number} is not valid JSON: {exc.msg} at column {exc.colno}.", field="file", row=line_number
            ) from None
    return records


def _records_to_rows(records: list[Any]) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise InvalidDataset(
                f"Row {index} is a {type(record).__name__}, not an object with named fields.", field="file", row=index
            )
        for key in record:
            columns.setdefault(str(key), None)
    return list(columns), [{str(k): v for k, v in record.items()} for record in records]


def parse_rows(data: bytes, fmt: str) -> tuple[list[str], list[Row]]:
    """Parse a whole file into its column names and rows; InvalidDataset names the row at fault."""
    text = _decode(data)
    if fmt in ("csv", "tsv"):
        columns, rows = _parse_delimited(text, "," if fmt == "csv" else "\t")
    elif fmt == "json":
        columns, rows = _records_to_rows(_parse_json_array(text))
    elif fmt == "jsonl":
        columns, rows = _records_to_rows(_parse_jsonl(text))
    else:
        raise InvalidDataset(f"Unsupported format {fmt!r}.", field="file")
    if not rows:
        what = "a header but no data rows" if fmt in ("csv", "tsv") else "no rows"
        raise InvalidDataset(f"The file has {what}.", field="file")
    if not columns:
        raise InvalidDataset("The rows have no fields.", field="file")
    return columns, rows


def load_rows(path: Path, fmt: str) -> tuple[list[str], list[Row]]:
    """Read a stored dataset file."""
    return parse_rows(path.read_bytes(), fmt)


def _value_kind(value: Any) -> str:
    if value is None or value == "":
        return "missing"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _histogram(lengths: list[int], buckets: int = 10) -> list[dict[str, int]]:
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / buckets))
    counts = Counter((length - low) // width for length in lengths)
    return [
        {"from": low + i * width, "to": low + (i + 1) * width - 1, "count": counts.get(i, 0)}
        for i in range(math.ceil((high - low + 1) / width))
    ]


def profile_rows(columns: list[str], rows: list[Row]) -> dict[str, Any]:
    """Row count, per-column types, text-length statistics, label balance and a preview."""
    column_profiles: dict[str, Any] = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        kinds = Counter(_value_kind(value) for value in values)
        present = {kind: count for kind, count in kinds.items() if kind != "missing"}
        info: dict[str, Any] = {
            "type": next(iter(present)) if len(present) == 1 else ("mixed" if present else "missing"),
            "missing": kinds.get("missing", 0),
        }
        strings = [value for value in values if isinstance(value, str) and value != ""]
        if strings and info["type"] == "string":
            lengths = [len(value) for value in strings]
            info["length"] = {
                "min": min(lengths),
                "mean": round(statistics.fmean(lengths), 1),
                "median": statistics.median(lengths),
                "max": max(lengths),
                "histogram": _histogram(lengths),
            }
        hashable = [json.dumps(value) if isinstance(value, dict | list) else value for value in values]
        distinct = Counter(str(value) for value in hashable if value not in (None, ""))
        info["distinct"] = len(distinct)
        if 1 < len(distinct) <= MAX_LABEL_CLASSES and len(distinct) < max(2, len(rows)):
            info["value_counts"] = dict(distinct.most_common())
        column_profiles[column] = info
    return {
        "rows": len(rows),
        "columns": column_profiles,
        "preview": rows[:PREVIEW_ROWS],
    }
