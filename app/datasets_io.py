"""Reading dataset files (CSV, TSV, JSON array, JSONL) into rows, with errors that name the row.

Shared by the web app (validation and profiling on upload) and the worker (loading for training), so both
read a file the same way. Plain ``csv``/``json`` from the standard library: no parser library gives
row-numbered error messages for all four formats, and these are a few dozen lines. Kept free of
third-party imports so the worker and the web app can both use it cheaply.

Every problem is an ``InvalidDataset`` whose message says where (row and/or line, column) and what was
expected. "Row N" counts data rows from 1 (the CSV header and blank lines are not rows); "line N" is the
line of the file, for editors.
"""

import csv
import io
import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from app.errors import InvalidDataset

FORMATS = ("csv", "tsv", "json", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SUPPORTED = ".csv, .tsv, .json or .jsonl"
_CONVERT_HINTS = {
    ".xlsx": "export the sheet as CSV (File > Save As > CSV UTF-8)",
    ".xls": "export the sheet as CSV (File > Save As > CSV UTF-8)",
    ".ods": "export the sheet as CSV",
    ".txt": "rename it .csv or .tsv if it is delimited text, or .jsonl if it holds one JSON object per line",
    ".parquet": "Parquet is not read yet; export it as JSONL or CSV",
}
PREVIEW_ROWS = 5
MAX_LABEL_CLASSES = 100
MAX_LABEL_CHARS = 200
# Python's csv module refuses longer fields; an unclosed quote is the usual reason for hitting it.
MAX_CSV_FIELD_CHARS = csv.field_size_limit()

# Signatures of binary files people upload by mistake, so the message can say what the file is.
_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook is one)"),
    (b"\xd0\xcf\x11\xe0", "an old Office document (.xls/.doc)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

Row = dict[str, Any]


def detect_format(filename: str) -> str:
    """The format named by the file's extension; InvalidDataset for anything else."""
    suffix = Path(filename).suffix.lower()
    if suffix not in _EXTENSIONS:
        shown = repr(suffix) if suffix else "(no extension)"
        hint = _CONVERT_HINTS.get(suffix)
        raise InvalidDataset(
            f"Unsupported file type {shown} for {filename!r}: upload {_SUPPORTED}"
            + (f"; {hint}." if hint else "."),
            field="file",
        )
    return _EXTENSIONS[suffix]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(data: bytes) -> str:
    if not data:
        raise InvalidDataset("The file is empty (0 bytes): it has no header and no rows.", field="file")
    if data.startswith(_UTF16_BOMS):
        raise InvalidDataset(
            "The file is UTF-16 encoded; save it as UTF-8 and upload it again.", field="file"
        )
    for magic, what in (*_MAGIC, (b"PAR1", "a Parquet file")):
        if data.startswith(magic) and (magic != b"PAR1" or data.endswith(b"PAR1")):
            raise InvalidDataset(
                f"The file is {what}, not a text file; upload {_SUPPORTED} text saved as UTF-8.", field="file"
            )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = _line_of(data, nul)
        raise InvalidDataset(
            f"Line {line} contains a NUL byte (offset {nul}): the file looks binary, not a text "
            "CSV/TSV/JSON/JSONL file saved as UTF-8.",
            field="file",
            row=line,
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_of(data, exc.start)
        raise InvalidDataset(
            f"Line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8 and upload it again.",
            field="file",
            row=line,
        ) from None
    if not text.strip():
        raise InvalidDataset("The file holds only whitespace: it has no header and no rows.", field="file")
    return text


def _check_header(header: list[str], kind: str, line: int) -> None:
    for position, name in enumerate(header, start=1):
        if not name:
            raise InvalidDataset(
                f"Column {position} of the {kind} header (line {line}) has no name; every column needs one.",
                field="file",
                row=line,
            )
    seen: dict[str, int] = {}
    for position, name in enumerate(header, start=1):
        if name in seen:
            raise InvalidDataset(
                f"Columns {seen[name]} and {position} of the {kind} header (line {line}) are both named "
                f"{name!r}; column names must be unique.",
                field="file",
                row=line,
            )
        seen[name] = position


def _check_delimiter(header: list[str], delimiter: str, kind: str, line: int) -> None:
    """A one-column header that contains another delimiter means the file was saved with that one."""
    if len(header) != 1:
        return
    other = "\t" if delimiter == "," else ","
    hint = ";" if ";" in header[0] else other if other in header[0] else None
    if hint is None:
        return
    shown = "a tab" if hint == "\t" else repr(hint)
    wanted = "commas (.csv)" if delimiter == "," else "tabs (.tsv)"
    rename = " or name it .csv" if hint == "," else " or name it .tsv" if hint == "\t" else ""
    raise InvalidDataset(
        f"The {kind} header (line {line}) is a single column {header[0]!r} that contains {shown}: the file "
        f"seems to use {shown} as its delimiter. Save it with {wanted}{rename}.",
        field="file",
        row=line,
    )


def _csv_error(exc: csv.Error, kind: str, line: int, row: int) -> InvalidDataset:
    reason = str(exc)
    if "unexpected end of data" in reason:
        message = (
            f"Row {row} (line {line}) has a quoted value that is never closed: the quote opened there runs "
            'to the end of the file. Close it, or write a quote inside a quoted value as two quotes ("").'
        )
    elif "field larger than field limit" in reason:
        message = (
            f"Row {row} (from line {line}) has a value longer than {MAX_CSV_FIELD_CHARS:,} characters; "
            "usually a quote was left open. Close it, or shorten the value."
        )
    elif "expected after" in reason:
        message = (
            f"Row {row} (line {line}) cannot be read as {kind}: {reason}. A quote inside a quoted value "
            'must be doubled (""), and a value that starts with a quote must end with one.'
        )
    else:
        message = f"Row {row} (line {line}) cannot be read as {kind}: {reason}."
    return InvalidDataset(message, field="file", row=row)


def _parse_delimited(text: str, delimiter: str) -> tuple[list[str], list[Row]]:
    kind = "CSV" if delimiter == "," else "TSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        raw_header = next(reader)
        while not any(value.strip() for value in raw_header):  # blank lines before the header
            raw_header = next(reader)
    except csv.Error as exc:
        raise InvalidDataset(
            f"The {kind} header (line {reader.line_num}) cannot be read: {exc}.", field="file", row=1
        ) from None
    except StopIteration:
        raise InvalidDataset(
            "The file holds only whitespace: it has no header and no rows.", field="file"
        ) from None
    header = [name.strip() for name in raw_header]
    _check_header(header, kind, reader.line_num)
    _check_delimiter(header, delimiter, kind, reader.line_num)
    rows: list[Row] = []
    start_line = reader.line_num + 1
    try:
        for record in reader:
            line, start_line = start_line, reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            row_number = len(rows) + 1
            if len(record) != len(header):
                advice = (
                    "Quote values that contain the delimiter."
                    if len(record) > len(header)
                    else "A value is missing, or a line break sits inside an unquoted value."
                )
                raise InvalidDataset(
                    f"Row {row_number} (line {line}) has {_count(len(record), 'field')}; the header has "
                    f"{len(header)} ({', '.join(header)}). {advice}",
                    field="file",
                    row=row_number,
                )
            rows.append(dict(zip(header, record, strict=True)))
    except csv.Error as exc:
        raise _csv_error(exc, kind, start_line, len(rows) + 1) from None
    return header, rows


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return "null"


class _DuplicateKeys(dict[str, Any]):
    """An object in which the file repeats a key (json keeps the last; we refuse the row)."""

    repeated: str = ""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            flagged = _DuplicateKeys(pairs)
            flagged.repeated = key
            return flagged
        result[key] = value
    return result


def _value_error(exc: ValueError) -> str:
    """A JSON value Python refuses although it parses (an integer of more than 4,300 digits)."""
    if "integer string conversion" in str(exc):
        return "it holds an integer with more digits than Python reads (4,300); store it as a string"
    return str(exc)


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object_pairs)


def _parse_json_array(text: str) -> list[tuple[int, Any]]:
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and exc.lineno > 1:
            hint = " The file holds more than one JSON value: if it has one object per line, name it .jsonl."
        raise InvalidDataset(
            f"The JSON is not valid at line {exc.lineno}, column {exc.colno}: {exc.msg}.{hint}",
            field="file",
            row=exc.lineno,
        ) from None
    except RecursionError:
        raise InvalidDataset(
            "The JSON is nested too deeply to read; rows must be flat objects.", field="file"
        ) from None
    except ValueError as exc:
        raise InvalidDataset(f"The JSON cannot be read: {_value_error(exc)}.", field="file") from None
    if not isinstance(value, list):
        raise InvalidDataset(
            f"A .json dataset must be an array of objects ([{{...}}, {{...}}]); this file holds "
            f"{_json_kind(value)}. Use .jsonl for one object per line.",
            field="file",
        )
    return [(index, record) for index, record in enumerate(value, start=1)]


def _parse_jsonl(text: str) -> list[tuple[int, Any]]:
    records: list[tuple[int, Any]] = []
    # Split on "\n" only: str.splitlines() also splits at U+2028 and friends, which JSON strings may hold.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, _loads(line)))
        except json.JSONDecodeError as exc:
            hint = ""
            if not records and (line.strip() in ("[", "{") or line.lstrip().startswith("[")):
                hint = " The file looks like one JSON document: if it is an array of objects, name it .json."
            raise InvalidDataset(
                f"Line {line_number} is not valid JSON: {exc.msg} at column {exc.colno}. Each line of a "
                f".jsonl file must be one complete JSON object.{hint}",
                field="file",
                row=line_number,
            ) from None
        except RecursionError:
            raise InvalidDataset(
                f"Line {line_number} is nested too deeply to read; rows must be flat objects.",
                field="file",
                row=line_number,
            ) from None
        except ValueError as exc:
            raise InvalidDataset(
                f"Line {line_number} cannot be read: {_value_error(exc)}.", field="file", row=line_number
            ) from None
    return records


def _bad_value(value: Any) -> str | None:
    """Why a parsed JSON value cannot be stored (NaN/Infinity, lone surrogates), searching nested values."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return (
                f"{item!r} is not a number JSON allows (NaN, Infinity or an out-of-range exponent); use null"
            )
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds an unpaired \\uD800-\\uDFFF escape, which is not valid Unicode text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _records_to_rows(
    records: list[tuple[int, Any]], where: str, check_strings: bool
) -> tuple[list[str], list[Row]]:
    """Objects to rows; ``where`` is "Row" (a JSON array's element) or "Line" (a JSONL line)."""
    columns: dict[str, None] = {}
    rows: list[Row] = []
    for position, record in records:
        place = f"{where} {position}"
        if not isinstance(record, dict):
            raise InvalidDataset(
                f"{place} is {_json_kind(record)}, not an object with named fields like "
                '{"text": "...", "label": "..."}.',
                field="file",
                row=position,
            )
        if isinstance(record, _DuplicateKeys):
            raise InvalidDataset(
                f"{place} repeats the field {record.repeated!r}; each field may appear once per object.",
                field="file",
                row=position,
            )
        for key in record:
            if not key.strip():
                raise InvalidDataset(
                    f"{place} has a field with an empty name; every field needs a name.",
                    field="file",
                    row=position,
                )
            columns.setdefault(key, None)
        for key, value in record.items():
            if isinstance(value, float | dict | list) or (check_strings and isinstance(value, str)):
                problem = _bad_value(value)
                if problem is not None:
                    raise InvalidDataset(f"{place}, field {key!r}: {problem}.", field="file", row=position)
        if check_strings:
            problem = _bad_value(list(record))
            if problem is not None:
                raise InvalidDataset(f"{place}, a field name: {problem}.", field="file", row=position)
        rows.append(dict(record))
    return list(columns), rows


def parse_rows(data: bytes, fmt: str) -> tuple[list[str], list[Row]]:
    """Parse a whole file into its column names and rows; InvalidDataset names the row at fault."""
    if fmt not in FORMATS:
        raise InvalidDataset(
            f"Unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}.", field="file"
        )
    text = _decode(data)
    if fmt in ("csv", "tsv"):
        columns, rows = _parse_delimited(text, "," if fmt == "csv" else "\t")
    else:
        check_strings = _SURROGATE_ESCAPE.search(text) is not None
        if fmt == "json":
            columns, rows = _records_to_rows(_parse_json_array(text), "Row", check_strings)
        else:
            columns, rows = _records_to_rows(_parse_jsonl(text), "Line", check_strings)
    if not rows:
        what = {
            "csv": "a header but no data rows",
            "tsv": "a header but no data rows",
            "json": "an empty array: no rows",
            "jsonl": "no rows",
        }[fmt]
        raise InvalidDataset(f"The file has {what}.", field="file")
    if not columns:
        raise InvalidDataset("Every row is an empty object: the rows have no fields.", field="file")
    return columns, rows


def load_rows(path: Path, fmt: str) -> tuple[list[str], list[Row]]:
    """Read a stored dataset file."""
    return parse_rows(path.read_bytes(), fmt)


def _value_kind(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "missing"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _histogram(lengths: list[int], buckets: int = 10) -> list[dict[str, int]]:
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / buckets))
    counts = Counter((length - low) // width for length in lengths)
    return [
        {"from": low + i * width, "to": low + (i + 1) * width - 1, "count": counts.get(i, 0)}
        for i in range(math.ceil((high - low + 1) / width))
    ]


def _column_profile(values: list[Any], row_count: int) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    first_row: dict[str, int] = {}
    for row_number, value in enumerate(values, start=1):
        kind = _value_kind(value)
        kinds[kind] += 1
        first_row.setdefault(kind, row_number)
    present = {kind: count for kind, count in kinds.items() if kind != "missing"}
    info: dict[str, Any] = {
        "type": next(iter(present)) if len(present) == 1 else ("mixed" if present else "missing"),
        "missing": kinds.get("missing", 0),
    }
    if info["missing"]:
        info["first_missing_row"] = first_row["missing"]
    if info["type"] == "mixed":
        # Which kinds, how many of each and where each first occurs: enough for a message naming the rows.
        info["kinds"] = {
            kind: {"count": count, "first_row": first_row[kind]} for kind, count in present.items()
        }
    if info["type"] == "string":
        strings = [value for value in values if isinstance(value, str) and value.strip()]
        lengths = [len(value) for value in strings]
        info["length"] = {
            "min": min(lengths),
            "mean": round(statistics.fmean(lengths), 1),
            "median": statistics.median(lengths),
            "max": max(lengths),
            "histogram": _histogram(lengths),
        }
        numeric = [value for value in strings if _is_number(value)]
        info["numeric"] = len(numeric)
    distinct = Counter(
        json.dumps(value) if isinstance(value, dict | list) else str(value)
        for value in values
        if _value_kind(value) != "missing"
    )
    info["distinct"] = len(distinct)
    if len(distinct) <= MAX_LABEL_CLASSES and all(len(value) <= MAX_LABEL_CHARS for value in distinct):
        info["values"] = sorted(distinct)  # what a label column can hold, even when no value repeats
    if 1 < len(distinct) <= MAX_LABEL_CLASSES and len(distinct) < max(2, row_count):
        info["value_counts"] = dict(distinct.most_common())
    return info


def profile_rows(columns: list[str], rows: list[Row]) -> dict[str, Any]:
    """Row count, per-column types, text-length statistics, label balance and a preview.

    Per column: ``type`` (string, number, bool, object, mixed or missing); ``missing`` (empty, blank or
    absent values) and ``first_missing_row``; ``kinds`` for mixed columns (count and first row of each
    kind); ``length`` statistics and ``numeric`` (how many values read as numbers) for text; ``distinct``
    values, the sorted ``values`` when there are at most 100 short ones, and ``value_counts`` for columns
    that look like labels (2 to 100 values, repeated across rows).
    """
    return {
        "rows": len(rows),
        "columns": {
            column: _column_profile([row.get(column) for row in rows], len(rows)) for column in columns
        },
        "preview": rows[:PREVIEW_ROWS],
    }
