"""Reading dataset files into rows, with errors that name the row.

Shared by the web app (validation and profiling on upload) and the worker (loading for training), so both
read a file the same way: the options resolved at upload (encoding, delimiter, quoting, header, index column,
nested fields) are stored in the dataset's profile (``profile["import"]``) and handed back to ``load_rows``.

Text formats (CSV, TSV, delimited ``.txt``, JSON array, JSONL) use plain ``csv``/``json`` from the standard
library: no parser library gives row-numbered error messages for all of them. Parquet, Arrow files and a
zipped Hugging Face ``datasets`` folder (``save_to_disk``) are read with pyarrow, imported only when such a
file arrives (the web process stays light).

Detection, each overridable by an explicit option (``ImportOptions``):

- encoding: a UTF-16 or UTF-8 byte-order mark decides; otherwise UTF-8, and Latin-1 when the bytes are not
  valid UTF-8 (with a note in the profile saying which line first failed);
- delimiter: the extension's own (``,`` for .csv, tab for .tsv and .txt) when it splits the first rows into
  the same number (at least 2) of fields, else the first of tab, comma, semicolon and ``|`` that does;
- quoting: ``"`` quotes values; for tab-separated text whose quotes do not pair up (a stray ``"`` in a
  sentence), quotes are read as ordinary characters;
- header (``_detect_header``): each column of the first row votes. For a header: a word above a column of
  numbers; a name that is not one of the repeated values below it (a label column); an empty first cell above
  numbers (pandas' index). Against: a number; a value that recurs below it; a value too long for a name (over
  40 characters or 5 words). More votes for than against, or a tie, keeps the first row as the header (the
  old behaviour); more against makes the file headerless, with columns ``column_1..n`` or the given names;
- index column: pandas' unnamed first column (an empty header cell or ``Unnamed: 0``) is dropped when it
  holds exactly 0..n-1, else kept as ``index``; in a headerless file a first column of exactly 0..n-1 (10 rows
  or more) is dropped too;
- nested JSON: kept as is unless ``nested`` asks to flatten objects (``a.b`` columns) or to explode a column
  that holds lists of objects into one row per object; the profile names such columns.

Every problem is an ``InvalidDataset`` whose message says where (row and/or line, column) and what was
expected. "Row N" counts data rows from 1 (the CSV header and blank lines are not rows); "line N" is the
line of the file, for editors.
"""

import csv
import datetime
import decimal
import io
import json
import math
import re
import statistics
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.core.errors import InvalidDataset
from app.core.tasks import CAUSAL_LM, CLASSIFICATION, PREFERENCE

FORMATS = ("csv", "tsv", "txt", "json", "jsonl", "parquet", "arrow", "hf-dataset")
DELIMITED = ("csv", "tsv", "txt")
BINARY = ("parquet", "arrow", "hf-dataset")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".zip": "hf-dataset",
}
_SUPPORTED = ".csv, .tsv, .txt, .json, .jsonl, .parquet, .arrow or a .zip of a saved Hugging Face dataset"
_CONVERT_HINTS = {
    ".xlsx": "export the sheet as CSV (File > Save As > CSV UTF-8)",
    ".xls": "export the sheet as CSV (File > Save As > CSV UTF-8)",
    ".ods": "export the sheet as CSV",
}
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "latin-1", "cp1252")
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
INDEX_CHOICES = ("auto", "drop", "keep")
NESTED_CHOICES = ("keep", "flatten", "explode")
# Rows looked at to detect the delimiter and the header.
_SAMPLE_ROWS = 200
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
_UTF8_BOM = b"\xef\xbb\xbf"
_PANDAS_INDEX_NAMES = ("", "Unnamed: 0")
# pandas' to_csv(header=False) still writes the index; in a headerless file a 0..n-1 first column of at least
# this many rows is taken for it.
_HEADERLESS_INDEX_ROWS = 10
_EXCEL_SEP = re.compile(r"\A[ \t]*sep=(.)[ \t]*\r?\n")
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


@dataclass
class ImportOptions:
    """How to read a file; ``None`` (or ``auto``) means detect. Stored, resolved, in ``profile["import"]``."""

    encoding: str | None = None
    delimiter: str | None = None
    quotechar: str | None = None  # "" reads quotes as ordinary characters
    header: bool | None = None
    column_names: list[str] | None = None
    index_column: str = "auto"
    nested: str = "keep"
    explode_column: str | None = None
    split: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "ImportOptions":
        """Options from form fields or a stored profile; InvalidDataset names the field at fault."""
        values = dict(values or {})

        def text(name: str) -> str | None:
            value = values.get(name)
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
                return None
            return str(value)

        encoding = text("encoding")
        if encoding is not None:
            encoding = encoding.strip().lower().replace("_", "-")
            encoding = {"utf8": "utf-8", "latin1": "latin-1", "iso-8859-1": "latin-1", "utf16": "utf-16"}.get(
                encoding, encoding
            )
            if encoding not in ENCODINGS:
                raise InvalidDataset(
                    f"Unknown encoding {values['encoding']!r}; choose auto or one of {', '.join(ENCODINGS)}.",
                    field="encoding",
                )
        delimiter = values.get("delimiter")
        if isinstance(delimiter, str) and delimiter.strip().lower() in ("", "auto"):
            delimiter = None
        if delimiter is not None:
            delimiter = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(
                str(delimiter).lower(), str(delimiter)
            )
            if len(delimiter) != 1 or delimiter in '"\r\n':
                raise InvalidDataset(
                    f"The delimiter must be one character (or tab, comma, semicolon, pipe); got {delimiter!r}.",
                    field="delimiter",
                )
        quotechar = values.get("quotechar")
        if quotechar is None or str(quotechar).strip().lower() in ("", "auto"):
            quotechar = None
        elif str(quotechar).strip().lower() == "none":
            quotechar = ""
        elif len(str(quotechar)) != 1:
            raise InvalidDataset(
                f"The quote character must be one character or none; got {quotechar!r}.", field="quotechar"
            )
        header = values.get("header")
        if isinstance(header, str):
            lowered = header.strip().lower()
            if lowered in ("", "auto"):
                header = None
            elif lowered in ("true", "yes", "1", "on", "present"):
                header = True
            elif lowered in ("false", "no", "0", "off", "absent", "none"):
                header = False
            else:
                raise InvalidDataset(
                    f"header must be auto, yes or no; got {values['header']!r}.", field="header"
                )
        names = values.get("column_names")
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")] if names.strip() else None
        if names is not None:
            names = [str(name) for name in names]
        index_column = str(values.get("index_column") or "auto").lower()
        index_column = {"dropped": "drop", "kept": "keep", "none": "auto"}.get(index_column, index_column)
        if index_column not in INDEX_CHOICES:
            raise InvalidDataset(
                f"index_column must be one of {', '.join(INDEX_CHOICES)}; got {values['index_column']!r}.",
                field="index_column",
            )
        nested = str(values.get("nested") or "keep").lower()
        if nested not in NESTED_CHOICES:
            raise InvalidDataset(
                f"nested must be one of {', '.join(NESTED_CHOICES)}; got {values['nested']!r}.",
                field="nested",
            )
        return cls(
            encoding=encoding,
            delimiter=delimiter,
            quotechar=quotechar,
            header=header if isinstance(header, bool) or header is None else bool(header),
            column_names=names or None,
            index_column=index_column,
            nested=nested,
            explode_column=text("explode_column"),
            split=text("split"),
        )


@dataclass
class ImportResult:
    """Columns and rows of a file, the options it was read with (detected or given) and notes for the page."""

    columns: list[str]
    rows: list["Row"]
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _check_binary(data: bytes) -> None:
    for magic, what in (*_MAGIC, (b"PAR1", "a Parquet file")):
        if data.startswith(magic) and (magic != b"PAR1" or data.endswith(b"PAR1")):
            raise InvalidDataset(
                f"The file is {what}, not a text file; upload {_SUPPORTED} text saved as UTF-8.", field="file"
            )


def _check_nul(data: bytes) -> None:
    nul = data.find(b"\x00")
    if nul >= 0:
        line = _line_of(data, nul)
        raise InvalidDataset(
            f"Line {line} contains a NUL byte (offset {nul}): the file looks binary, not a text "
            "CSV/TSV/JSON/JSONL file saved as UTF-8.",
            field="file",
            row=line,
        )


def _strict_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_of(data, exc.start)
        raise InvalidDataset(
            f"Line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8 and upload it again, or choose its encoding (e.g. latin-1).",
            field="file",
            row=line,
        ) from None


def _utf16_without_bom(data: bytes, notes: list[str] | None) -> str | None:
    """UTF-16 saved without a byte-order mark: ASCII text then has a NUL in every other byte."""
    head = data[:2000]
    if len(head) < 4 or b"\x00" not in head:
        return None
    even, odd = head[0::2], head[1::2]
    for encoding, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros.count(0) >= 0.6 * len(zeros) and other.count(0) == 0:
            if notes is not None:
                notes.append(f"The file has no byte-order mark but reads as {encoding.upper()}.")
            return encoding
    return None


def _decode(data: bytes, encoding: str | None = None, notes: list[str] | None = None) -> tuple[str, str]:
    """The file's text and the encoding it was read with (detected when ``encoding`` is None)."""
    if not data:
        raise InvalidDataset("The file is empty (0 bytes): it has no header and no rows.", field="file")
    _check_binary(data)
    if encoding is None and data.startswith(_UTF16_BOMS):
        encoding = "utf-16"
    elif encoding is None:
        encoding = _utf16_without_bom(data, notes)
    if encoding in ("utf-8", "utf-8-sig") and data.startswith(_UTF16_BOMS):
        raise InvalidDataset(
            "The file is UTF-16 encoded; save it as UTF-8 and upload it again, or choose the encoding utf-16.",
            field="file",
        )
    if encoding is not None and encoding.startswith("utf-16"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise InvalidDataset(
                f"The file cannot be read as {encoding.upper()} (offset {exc.start}: {exc.reason}); "
                "save it as UTF-8 and upload it again.",
                field="file",
            ) from None
        text = text.removeprefix("\ufeff")
    else:
        _check_nul(data)
        if encoding in ("latin-1", "cp1252"):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise InvalidDataset(
                    f"Line {_line_of(data, exc.start)} cannot be read as {encoding} "
                    f"(byte 0x{data[exc.start]:02x}); choose latin-1.",
                    field="file",
                ) from None
        elif encoding is not None:
            text = _strict_utf8(data)
            encoding = "utf-8-sig" if data.startswith(_UTF8_BOM) else "utf-8"
        else:
            try:
                text = data.decode("utf-8-sig")
                encoding = "utf-8-sig" if data.startswith(_UTF8_BOM) else "utf-8"
            except UnicodeDecodeError as exc:
                line = _line_of(data, exc.start)
                # Bytes 0x80-0x9f are control characters in Latin-1 but quotes and dashes in Windows-1252,
                # which is what such files usually are; without them the two read the same.
                text, encoding = data.decode("latin-1"), "latin-1"
                if re.search(b"[\x80-\x9f]", data):
                    try:
                        text, encoding = data.decode("cp1252"), "cp1252"
                    except UnicodeDecodeError:
                        pass
                shown = "Windows-1252" if encoding == "cp1252" else "Latin-1 (ISO-8859-1)"
                if notes is not None:
                    notes.append(
                        f"The file is not valid UTF-8 (line {line}, byte 0x{data[exc.start]:02x}), so it was "
                        f"read as {shown}. If accented letters look wrong in the preview, save the file as "
                        "UTF-8, or re-import it with another encoding."
                    )
    if not text.strip():
        raise InvalidDataset("The file holds only whitespace: it has no header and no rows.", field="file")
    return text, encoding


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


def _kind_of(delimiter: str) -> str:
    return "CSV" if delimiter == "," else "TSV" if delimiter == "\t" else "delimited text"


def _reader(text: str, delimiter: str, quotechar: str) -> Any:
    if quotechar:
        return csv.reader(
            io.StringIO(text, newline=""), delimiter=delimiter, quotechar=quotechar, strict=True
        )
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)


def _sample(text: str) -> str:
    """The first rows of the text (whole lines only), enough to detect the delimiter and the header."""
    lines = text.split("\n", _SAMPLE_ROWS + 1)
    return "\n".join(lines[:_SAMPLE_ROWS]) if len(lines) > _SAMPLE_ROWS else text


def _field_counts(sample: str, delimiter: str, quotechar: str, cut: bool) -> list[int] | None:
    """Fields per record of the sample; ``cut`` samples may end inside a quoted value (its record is dropped)."""
    records: list[list[str]] = []
    try:
        for record in _reader(sample, delimiter, quotechar):
            if any(value.strip() for value in record):
                records.append(record)
    except csv.Error:
        if not cut or len(records) < 2:
            return None
        cut = True
    if cut and len(records) > 1:
        records = records[:-1]  # the sample's last record may be a partial line
    return [len(record) for record in records]


def _consistent(counts: list[int] | None) -> bool:
    """Every sampled row splits into the same number (2 or more) of fields."""
    return counts is not None and bool(counts) and counts[0] >= 2 and len(set(counts)) == 1


def _detect_delimiter(text: str, fmt: str) -> str:
    default = "," if fmt == "csv" else "\t"
    sample = _sample(text)
    cut = len(sample) < len(text)
    for candidate in dict.fromkeys((default, "\t", ",", ";", "|")):
        quotes = ('"', "") if candidate == "\t" else ('"',)
        if any(_consistent(_field_counts(sample, candidate, quote, cut)) for quote in quotes):
            return candidate
    return default


def _read_records(text: str, delimiter: str, quotechar: str) -> list[tuple[int, list[str]]]:
    """Non-blank records with the line each starts on; csv.Error carries the line and the record count."""
    reader = _reader(text, delimiter, quotechar)
    records: list[tuple[int, list[str]]] = []
    start_line = 1
    try:
        for record in reader:
            line, start_line = start_line, reader.line_num + 1
            if not record or not any(value.strip() for value in record):
                continue  # blank line
            records.append((line, record))
    except csv.Error as exc:
        exc.args = (*exc.args, start_line, records)
        raise
    return records


def _ragged(records: list[tuple[int, list[str]]]) -> bool:
    return len({len(record) for _, record in records}) > 1


def _is_name_like(value: str) -> bool:
    return len(value) <= 40 and len(value.split()) <= 5


def _detect_header(records: list[list[str]]) -> tuple[bool, str]:
    """Whether the first record is a header, and why (the rule is in the module docstring)."""
    first = records[0]
    body = [record for record in records[1:_SAMPLE_ROWS] if len(record) == len(first)]
    if not body:
        return True, "the file has a single row"
    votes_for: list[str] = []
    votes_against: list[str] = []
    for position, raw in enumerate(first):
        value = raw.strip()
        below = [record[position].strip() for record in body if record[position].strip()]
        if not value:
            if position == 0 and below and all(_is_number(item) for item in below):
                votes_for.append("an empty first cell above numbers (an index column)")
            continue
        if _is_number(value):
            votes_against.append(f"column {position + 1} starts with the number {value!r}")
            continue
        if below and sum(_is_number(item) for item in below) >= 0.9 * len(below):
            votes_for.append(f"{value!r} stands above numbers")
            continue
        distinct = set(below)
        if len(below) >= 4 and len(distinct) <= max(2, min(50, len(below) // 2)):
            if value in distinct:
                votes_against.append(f"{value!r} is also a value further down column {position + 1}")
            else:
                votes_for.append(f"{value!r} is not one of the values of column {position + 1}")
            continue
        if not _is_name_like(value):
            votes_against.append(f"{value[:30]!r}… is too long for a column name")
    if len(votes_against) > len(votes_for):
        return False, "; ".join(votes_against)
    return True, "; ".join(votes_for) or "nothing speaks against it"


def _is_range_index(values: list[str]) -> bool:
    return all(value.strip() == str(number) for number, value in enumerate(values))


def _parse_delimited(
    text: str, fmt: str, options: ImportOptions, resolved: dict[str, Any], notes: list[str]
) -> tuple[list[str], list[Row]]:
    excel_hint = _EXCEL_SEP.match(text)
    if excel_hint:
        # Excel's "sep=;" first line names the delimiter; it is not a row.
        text = "\n" + text[excel_hint.end() :]  # a blank line keeps the line numbers
        notes.append(
            f"The first line {excel_hint.group(0).strip()!r} (Excel's delimiter hint) was read and skipped."
        )
    delimiter = (
        options.delimiter or (excel_hint.group(1) if excel_hint else None) or _detect_delimiter(text, fmt)
    )
    kind = _kind_of(delimiter)
    quotechar = '"' if options.quotechar is None else options.quotechar
    try:
        records = _read_records(text, delimiter, quotechar)
        failure: csv.Error | None = None
    except csv.Error as exc:
        records, failure = [], exc
    if options.quotechar is None and delimiter == "\t" and (failure is not None or _ragged(records)):
        # Tab-separated sentences often hold a lone quote; read quotes as text when that pairs every row up.
        try:
            plain = _read_records(text, delimiter, "")
        except csv.Error:
            plain = []
        if plain and not _ragged(plain):
            records, failure, quotechar = plain, None, ""
            notes.append('Quotes (") do not pair up in this tab-separated file, so they are read as text.')
    if failure is not None:
        reason, line, read = failure.args[0], failure.args[-2], failure.args[-1]
        count = len(read)
        if count == 0:
            raise InvalidDataset(
                f"The {kind} header (line {line}) cannot be read: {reason}.", field="file", row=1
            )
        has_header = options.header
        if has_header is None:  # the rows before the failure decide, as they would have
            has_header = _detect_header([record for _, record in read])[0] if count > 1 else True
        raise _csv_error(csv.Error(reason), kind, line, count + (0 if has_header else 1))
    if not records:
        raise InvalidDataset("The file holds only whitespace: it has no header and no rows.", field="file")
    if options.header is None:
        has_header, why = _detect_header([record for _, record in records])
        resolved["header_reason"] = why
    else:
        has_header = options.header
    header_line = records[0][0]
    if has_header:
        header = [name.strip() for name in records[0][1]]
        body = records[1:]
    else:
        header = [f"column_{position}" for position in range(1, len(records[0][1]) + 1)]
        body = records
    index_action = "none"
    if header and (
        options.index_column == "drop"
        or header[0] in _PANDAS_INDEX_NAMES
        or (not has_header and options.index_column != "keep")
    ):
        first_values = [record[0] for _, record in body if record]
        # A headerless file's first column is an index only when long enough not to be a short label column.
        enough = has_header or len(first_values) >= _HEADERLESS_INDEX_ROWS
        if options.index_column == "drop" or (
            options.index_column == "auto" and enough and first_values and _is_range_index(first_values)
        ):
            index_action = "drop"
        elif header[0] in _PANDAS_INDEX_NAMES:
            index_action = "keep"
            header[0] = "index" if "index" not in header else "index_"
    if (
        has_header
        and len(header) > 1
        and header[-1] == ""
        and all(len(record) == len(header) and not record[-1].strip() for _, record in body)
    ):
        # "a,b," lines: a trailing delimiter on every line makes an empty, unnamed last column.
        header = header[:-1]
        body = [(line, record[:-1]) for line, record in body]
        notes.append("Every line ended with a delimiter; the empty last column was dropped.")
    skip = 1 if index_action == "drop" else 0
    columns = header[skip:]
    if not has_header and skip:
        columns = [f"column_{position}" for position in range(1, len(columns) + 1)]
    if options.column_names:
        if len(options.column_names) != len(columns):
            dropped = " besides the dropped index column" if skip else ""
            raise InvalidDataset(
                f"{len(options.column_names)} column name(s) were given ({', '.join(options.column_names)}) but "
                f"the file has {len(columns)} column(s){dropped}; give one name per column.",
                field="column_names",
            )
        columns = [name.strip() for name in options.column_names]
        resolved["column_names"] = columns
    elif not has_header:
        notes.append(f"The file has no header row; its columns are named {', '.join(columns)}.")
    resolved.update(delimiter=delimiter, quotechar=quotechar or "none", header=has_header)
    resolved["index_column"] = index_action
    if index_action == "drop":
        notes.append("The first column was an unnamed index (0, 1, 2, …) and was dropped.")
    elif index_action == "keep":
        notes.append(f"The unnamed first column is kept as {header[0]!r}.")
    _check_header(columns, kind, header_line)
    if options.delimiter is None or len(header) == 1:
        _check_delimiter(header, delimiter, kind, header_line)
    rows: list[Row] = []
    for line, record in body:
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
        rows.append(dict(zip(columns, record[skip:], strict=True)))
    return columns, rows


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


def _parse_json_array(text: str, notes: list[str] | None = None) -> list[tuple[int, Any]]:
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
    if isinstance(value, dict):
        # {"data": [{...}, ...]}: one key holding the rows, as many exports wrap them
        wrapped = [
            key
            for key, item in value.items()
            if isinstance(item, list) and item and all(isinstance(row, dict) for row in item)
        ]
        if len(wrapped) == 1 and len(value) <= 3:
            if notes is not None:
                notes.append(f"The rows were read from the file's {wrapped[0]!r} array.")
            value = value[wrapped[0]]
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


def _jsonable(value: Any) -> Any:
    """An Arrow value as JSON data (dates as ISO text, decimals as numbers, bytes as text when they decode)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        if value and all(isinstance(item, tuple) and len(item) == 2 for item in value):
            return {str(key): _jsonable(item) for key, item in value}  # an Arrow map
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return str(value)


def _class_label_names(table: Any) -> dict[str, list[str]]:
    """Names of ``datasets`` ClassLabel columns, from the features ``datasets`` keeps in the Arrow schema."""
    metadata = table.schema.metadata or {}
    try:
        info = json.loads(metadata.get(b"huggingface", b"{}"))
    except ValueError:
        return {}
    features = (info.get("info") or {}).get("features") or {}
    return {
        name: [str(label) for label in feature["names"]]
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names")
    }


def _table_rows(table: Any, notes: list[str]) -> tuple[list[str], list[Row]]:
    # pandas writes a non-default index as a column of its own; it is not data.
    columns = [name for name in table.column_names if name != "__index_level_0__"]
    rows = [{name: _jsonable(row.get(name)) for name in columns} for row in table.select(columns).to_pylist()]
    for column, names in _class_label_names(table).items():
        if column not in columns:
            continue
        for row in rows:
            value = row.get(column)
            if isinstance(value, int) and 0 <= value < len(names):
                row[column] = names[value]
        notes.append(
            f"Column {column!r} holds class ids; the dataset's names for them are used ({', '.join(names[:10])})."
        )
    return columns, rows


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise InvalidDataset(
            "Reading Parquet and Arrow files needs the pyarrow package on the server.", field="file"
        ) from None
    return pyarrow


def _read_arrow_bytes(data: bytes, what: str) -> Any:
    """An Arrow table from IPC stream bytes (``datasets``' own files) or an IPC/Feather file."""
    pa = _pyarrow()
    import pyarrow.ipc

    errors = []
    for opener in (pyarrow.ipc.open_stream, pyarrow.ipc.open_file):
        try:
            return opener(pa.BufferReader(data)).read_all()
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            errors.append(str(exc))
    raise InvalidDataset(
        f"{what} is not an Arrow file ({errors[-1]}); upload an Arrow IPC file, Parquet, or a zipped "
        "datasets folder written by save_to_disk.",
        field="file",
    )


def _read_parquet(data: bytes) -> Any:
    pa = _pyarrow()
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise InvalidDataset(
            f"The file is not a Parquet file that can be read ({exc}); export it again with "
            "DataFrame.to_parquet, or upload CSV or JSONL.",
            field="file",
        ) from None


def _read_saved_dataset(
    data: bytes, options: ImportOptions, resolved: dict[str, Any], notes: list[str], max_unpacked: int
) -> Any:
    """The Arrow table of a zipped ``Dataset.save_to_disk`` folder (or one split of a ``DatasetDict``)."""
    pa = _pyarrow()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidDataset(
            "The .zip file cannot be opened; zip the folder that Dataset.save_to_disk wrote and upload that.",
            field="file",
        ) from None
    with archive:
        members = [
            info
            for info in archive.infolist()
            if info.filename.endswith(".arrow") and not info.filename.startswith("__MACOSX")
        ]
        if not members:
            raise InvalidDataset(
                "The .zip holds no .arrow files; zip the folder that Dataset.save_to_disk wrote "
                "(it holds data-00000-of-00001.arrow, dataset_info.json and state.json).",
                field="file",
            )
        splits: dict[str, list[zipfile.ZipInfo]] = {}
        for info in members:
            splits.setdefault(str(PurePosixPath(info.filename).parent), []).append(info)
        names = {folder: PurePosixPath(folder).name for folder in splits}
        if len(splits) > 1:
            wanted = options.split or ("train" if "train" in names.values() else sorted(names.values())[0])
            chosen = [folder for folder, name in names.items() if name == wanted]
            if not chosen:
                raise InvalidDataset(
                    f"The saved dataset has no split {wanted!r}; its splits are "
                    f"{', '.join(sorted(names.values()))}.",
                    field="split",
                )
            folder = chosen[0]
            resolved["split"] = wanted
            notes.append(
                f"The saved dataset has the splits {', '.join(sorted(names.values()))}; split {wanted!r} was "
                "imported (re-import to choose another)."
            )
        else:
            folder = next(iter(splits))
        chosen_members = sorted(splits[folder], key=lambda info: info.filename)
        if sum(info.file_size for info in chosen_members) > max_unpacked:
            raise InvalidDataset(
                f"The saved dataset unpacks to more than {max_unpacked:,} bytes; upload a smaller dataset.",
                field="file",
            )
        tables = [_read_arrow_bytes(archive.read(info), info.filename) for info in chosen_members]
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise InvalidDataset(
            f"The dataset's Arrow files do not share one schema: {exc}.", field="file"
        ) from None


def _flatten(row: Row, prefix: str = "") -> Row:
    flat: Row = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def nested_columns(columns: list[str], rows: list[Row]) -> dict[str, str]:
    """Columns holding objects (``object``), lists of objects (``list``) or chat messages (``messages``)."""
    found: dict[str, str] = {}
    for column in columns:
        values = [row.get(column) for row in rows if row.get(column) not in (None, "", [])]
        if values and all(isinstance(value, dict) for value in values):
            found[column] = "object"
        elif values and all(
            isinstance(value, list) and all(isinstance(item, dict) for item in value) for value in values
        ):
            first: dict[str, Any] = next((item for value in values for item in (value or [])), {})
            chat = ("role" in first and "content" in first) or ("from" in first and "value" in first)
            found[column] = "messages" if chat else "list"
    return found


def _unnest(
    columns: list[str], rows: list[Row], options: ImportOptions, resolved: dict[str, Any], notes: list[str]
) -> tuple[list[str], list[Row]]:
    nested = nested_columns(columns, rows)
    resolved["nested"] = options.nested
    if nested:
        resolved["nested_columns"] = nested
    if options.nested == "explode":
        lists = [column for column, kind in nested.items() if kind == "list"]
        column = options.explode_column or (lists[0] if lists else None)
        if column is None or column not in columns:
            raise InvalidDataset(
                f"No column {'named ' + repr(column) + ' ' if column else ''}holds lists of objects to explode; "
                f"columns: {', '.join(columns)}.",
                field="explode_column",
            )
        resolved["explode_column"] = column
        exploded: list[Row] = []
        for number, row in enumerate(rows, start=1):
            items = row.get(column)
            if items in (None, "", []):
                continue
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise InvalidDataset(
                    f"Row {number}: column {column!r} holds {_json_kind(items)}, not a list of objects, so it "
                    "cannot be exploded into rows.",
                    field="explode_column",
                    row=number,
                )
            parent = {key: value for key, value in row.items() if key != column}
            for item in items:
                child = _flatten(item)
                exploded.append(
                    {**parent, **{(f"{column}.{k}" if k in parent else k): v for k, v in child.items()}}
                )
        notes.append(
            f"Each object in column {column!r} became a row: {len(rows):,} rows gave {len(exploded):,}."
        )
        rows = exploded
    if options.nested in ("flatten", "explode"):
        rows = [_flatten(row) for row in rows]
        if options.nested == "flatten" and any(kind == "object" for kind in nested.values()):
            notes.append("Nested objects were flattened into columns named parent.child.")
    elif any(kind != "messages" for kind in nested.values()):
        nested = {name: kind for name, kind in nested.items() if kind != "messages"}
        shown = ", ".join(
            f"{name!r} ({'lists of objects' if kind == 'list' else 'objects'})"
            for name, kind in nested.items()
        )
        notes.append(
            f"Column(s) {shown} hold nested data that training cannot read; re-import with nested fields "
            "flattened (a.b columns) or exploded (one row per object in a list)."
        )
    if options.nested != "keep":
        ordered: dict[str, None] = {}
        for row in rows:
            ordered.update(dict.fromkeys(row))
        columns = list(ordered)
    return columns, rows


def _parse_json_or_lines(
    text: str, notes: list[str], resolved: dict[str, Any], check_strings: bool
) -> tuple[list[str], list[Row]]:
    """A .json file: an array of objects, or JSON Lines saved under .json (pandas' ``to_json(lines=True)``)."""
    try:
        return _records_to_rows(_parse_json_array(text, notes), "Row", check_strings)
    except InvalidDataset as exc:
        if "name it .jsonl" not in exc.message:
            raise
        try:
            records = _parse_jsonl(text)
        except InvalidDataset as lines_error:
            # The first line is a whole object: the file is JSON Lines, and its broken line is the news.
            raise lines_error if lines_error.row and lines_error.row > 1 else exc from None
        if not all(isinstance(record, dict) for _, record in records):
            raise
        notes.append("The .json file holds one JSON object per line (JSON Lines); it was read as such.")
        resolved["json_lines"] = True
        return _records_to_rows(records, "Line", check_strings)


def read_dataset(
    data: bytes,
    fmt: str,
    options: ImportOptions | Mapping[str, Any] | None = None,
    max_unpacked_bytes: int = 2 * 1024**3,
) -> ImportResult:
    """Parse a whole file with the given options (``None`` fields detected); InvalidDataset names the row."""
    if fmt not in FORMATS:
        raise InvalidDataset(
            f"Unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}.", field="file"
        )
    if not isinstance(options, ImportOptions):
        options = ImportOptions.from_mapping(options)
    resolved: dict[str, Any] = {"format": fmt}
    notes: list[str] = []
    if fmt in BINARY:
        if not data:
            raise InvalidDataset("The file is empty (0 bytes): it has no header and no rows.", field="file")
        if fmt == "parquet":
            table = _read_parquet(data)
        elif fmt == "arrow":
            table = _read_arrow_bytes(data, "The file")
        else:
            table = _read_saved_dataset(data, options, resolved, notes, max_unpacked_bytes)
        columns, rows = _table_rows(table, notes)
        columns, rows = _unnest(columns, rows, options, resolved, notes)
    else:
        text, encoding = _decode(data, options.encoding, notes)
        resolved["encoding"] = encoding
        if fmt in DELIMITED:
            columns, rows = _parse_delimited(text, fmt, options, resolved, notes)
        else:
            check_strings = _SURROGATE_ESCAPE.search(text) is not None
            if fmt == "json":
                columns, rows = _parse_json_or_lines(text, notes, resolved, check_strings)
            else:
                columns, rows = _records_to_rows(_parse_jsonl(text), "Line", check_strings)
            columns, rows = _unnest(columns, rows, options, resolved, notes)
    if not rows:
        what = {
            "json": "an empty array: no rows",
            "jsonl": "no rows",
        }.get(fmt, "a header but no data rows" if fmt in DELIMITED else "no rows")
        raise InvalidDataset(f"The file has {what}.", field="file")
    if not columns:
        raise InvalidDataset("Every row is an empty object: the rows have no fields.", field="file")
    return ImportResult(columns=columns, rows=rows, options=resolved, notes=notes)


def parse_rows(
    data: bytes, fmt: str, options: ImportOptions | Mapping[str, Any] | None = None
) -> tuple[list[str], list[Row]]:
    """Parse a whole file into its column names and rows; InvalidDataset names the row at fault."""
    result = read_dataset(data, fmt, options)
    return result.columns, result.rows


def load_rows(
    path: Path, fmt: str, options: ImportOptions | Mapping[str, Any] | None = None
) -> tuple[list[str], list[Row]]:
    """Read a stored dataset file with the options it was imported with (``profile["import"]``)."""
    return parse_rows(path.read_bytes(), fmt, options)


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


_LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "intent", "topic", "y")
# Text columns whose mean length is at least this share of the longest one's are joined for classification.
_JOIN_SHARE = 0.25


# Column names (last dotted part, lower case) that mark instruction data, in order of preference.
_INSTRUCTION_NAMES = ("instruction", "definition")
_OUTPUT_NAMES = ("output", "response")
_PROMPT_NAMES = ("prompt", "question", "query")
_COMPLETION_NAMES = ("completion", "answer", "response")


def _first(leaf: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((leaf[name] for name in names if name in leaf), None)


def _by_leaf(columns: list[str]) -> dict[str, str]:
    """Columns by their lower-cased last dotted part (``instances.input`` answers to ``input``)."""
    found: dict[str, str] = {}
    for column in columns:
        found.setdefault(column.rsplit(".", 1)[-1].lower(), column)
    return found


# Preference data: (prompt column names, chosen, rejected) in order of preference; the last is OpenAI's shape.
_PREFERENCE_PROMPTS = ("prompt", "conversations", "messages", "input", "question", "instruction", "query")
_PREFERENCE_PAIRS = (("chosen", "rejected"), ("preferred_output", "non_preferred_output"))


def propose_preference(leaf: dict[str, str], infos: dict[str, Any]) -> dict[str, Any] | None:
    """Preference data, if the columns say so: a prompt with chosen and rejected answers (prompt/chosen/rejected,
    ShareGPT conversations/chosen/rejected, OpenAI input/preferred_output/non_preferred_output), or KTO's
    conversation with a true/false label (``messages`` + a boolean ``label``)."""
    prompt = _first(leaf, _PREFERENCE_PROMPTS)
    for chosen_name, rejected_name in _PREFERENCE_PAIRS:
        if chosen_name in leaf and rejected_name in leaf and prompt is not None:
            chosen, rejected = leaf[chosen_name], leaf[rejected_name]
            shape = (
                "OpenAI preference"
                if chosen_name == "preferred_output"
                else "ShareGPT"
                if prompt.rsplit(".", 1)[-1].lower() == "conversations"
                else "prompt/chosen/rejected"
            )
            return {
                "task": PREFERENCE,
                "format": "pairs",
                PREFERENCE: {
                    "format": "pairs",
                    "prompt_column": prompt,
                    "chosen_column": chosen,
                    "rejected_column": rejected,
                },
                "reason": f"{shape} pairs: {prompt!r} answered by {chosen!r} (better) and {rejected!r} (worse)",
            }
    conversation = _first(leaf, ("messages", "conversations"))
    label = _first(leaf, ("label", "kto_tag", "desirable"))
    label_info = infos.get(label or "", {})
    # A mixed column with booleans is still proposed, so that the job form names the row that is not one.
    booleans = label_info.get("type") == "bool" or "bool" in (label_info.get("kinds") or {})
    if conversation is not None and label is not None and booleans:
        return {
            "task": PREFERENCE,
            "format": "kto",
            PREFERENCE: {
                "format": "kto",
                "loss": "kto",
                "messages_column": conversation,
                "label_column": label,
            },
            "reason": f"KTO: answers in {conversation!r} marked good or bad by {label!r}",
        }
    return None


def propose(columns: list[str], profile: dict[str, Any]) -> dict[str, Any]:
    """The task, format and columns a dataset most likely is, from its column names and profile.

    Chat ``messages`` (or ``conversations``) -> causal-LM chat; ``instruction`` (or ``definition``) +
    ``output`` (or ``response``) -> Alpaca; ``prompt``/``question``/``query`` + ``completion``/``answer``/
    ``response`` -> prompt-completion; otherwise a text column (the longest text) and a
    low-cardinality label column (a conventional name first, else the one with the fewest classes) ->
    classification, with other long text columns (title + description) proposed for joining; text alone ->
    causal-LM plain text. ``reason`` says which rule matched.
    """
    infos: dict[str, Any] = profile.get("columns", {})
    leaf = _by_leaf(columns)
    nested = (profile.get("import") or {}).get("nested_columns") or {}
    preference = propose_preference(leaf, infos)
    if preference is not None:
        return preference
    chat = next((c for c in columns if nested.get(c) == "messages"), None) or next(
        (leaf[name] for name in ("messages", "conversations") if name in leaf), None
    )
    if chat is not None:
        return {
            "task": CAUSAL_LM,
            "format": "chat",
            "causal_lm": {"format": "chat", "messages_column": chat},
            "reason": f"column {chat!r} holds chat messages",
        }
    instruction = _first(leaf, _INSTRUCTION_NAMES)
    output = _first(leaf, _OUTPUT_NAMES)
    if instruction and output:
        settings = {
            "format": "alpaca",
            "instruction_column": instruction,
            "output_column": output,
            "input_column": leaf.get("input"),
        }
        return {
            "task": CAUSAL_LM,
            "format": "alpaca",
            "causal_lm": settings,
            "reason": f"{instruction}/{output}",
        }
    prompt = _first(leaf, _PROMPT_NAMES)
    completion = _first(leaf, _COMPLETION_NAMES)
    if prompt and completion:
        settings = {
            "format": "prompt-completion",
            "prompt_column": prompt,
            "completion_column": completion,
        }
        return {
            "task": CAUSAL_LM,
            "format": "prompt-completion",
            "causal_lm": settings,
            "reason": f"{prompt}/{completion}",
        }
    rows = max(int(profile.get("rows") or 0), 1)
    labels = [
        c
        for c in columns
        if infos.get(c, {}).get("value_counts") and infos[c].get("distinct", 0) <= max(2, rows // 2)
    ]
    texts = [
        c
        for c in columns
        if infos.get(c, {}).get("type") == "string"
        and c not in labels
        and infos[c].get("numeric", 0) < 0.5 * rows
        and infos[c].get("length")
    ]
    texts.sort(key=lambda c: -infos[c]["length"]["mean"])
    named = [c for c in labels if c.rsplit(".", 1)[-1].lower() in _LABEL_NAMES]
    label = named[0] if named else min(labels, key=lambda c: infos[c]["distinct"]) if labels else None
    if texts and label is not None:
        longest = infos[texts[0]]["length"]["mean"]
        joined = [
            c for c in columns if c in texts and infos[c]["length"]["mean"] >= max(_JOIN_SHARE * longest, 10)
        ]
        proposal: dict[str, Any] = {
            "task": CLASSIFICATION,
            "format": "classification",
            "text_column": texts[0],
            "label_column": label,
            "reason": f"text in {texts[0]!r} (the longest), {infos[label]['distinct']} classes in {label!r}",
        }
        if len(joined) > 1:
            proposal["text_columns"] = joined[:4]
        return proposal
    if texts:
        return {
            "task": CAUSAL_LM,
            "format": "text",
            "text_column": texts[0],
            "causal_lm": {"format": "text"},
            "reason": f"text in {texts[0]!r} and no label column",
        }
    return {"task": None, "format": None, "reason": "no column holds text"}
