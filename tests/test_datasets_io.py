"""Parsing and profiling of dataset files (app.core.datasets_io): small, fast, no database."""

import json

import pytest

from app.core.datasets_io import (
    MAX_CSV_FIELD_CHARS,
    PREVIEW_ROWS,
    detect_format,
    parse_rows,
    profile_rows,
    read_dataset,
)
from app.core.errors import InvalidDataset


def _profile(data: bytes, fmt: str) -> dict:
    return profile_rows(*parse_rows(data, fmt))


# ---- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "fmt"),
    [
        ("a.csv", "csv"),
        ("A.CSV", "csv"),
        ("b.tsv", "tsv"),
        ("c.json", "json"),
        ("d.jsonl", "jsonl"),
        ("e.ndjson", "jsonl"),
        ("archive.2024.csv", "csv"),
    ],
)
def test_detect_format_by_extension(filename: str, fmt: str) -> None:
    assert detect_format(filename) == fmt


@pytest.mark.parametrize(
    ("filename", "expected"), [("x.xlsx", "'.xlsx'"), ("x", "(no extension)"), ("x.docx", "'.docx'")]
)
def test_detect_format_refuses_other_extensions(filename: str, expected: str) -> None:
    with pytest.raises(InvalidDataset, match="Unsupported file type") as info:
        detect_format(filename)
    assert expected in info.value.message


def test_csv_rows_and_columns() -> None:
    columns, rows = parse_rows(b"text,label\nhello,pos\nbye,neg\n", "csv")
    assert columns == ["text", "label"]
    assert rows == [{"text": "hello", "label": "pos"}, {"text": "bye", "label": "neg"}]


def test_csv_quoting_keeps_delimiters_quotes_and_newlines_inside_values() -> None:
    data = b'text,label\n"a, b",pos\n"she said ""hi""",neg\n"two\nlines",pos\n'
    _, rows = parse_rows(data, "csv")
    assert [row["text"] for row in rows] == ["a, b", 'she said "hi"', "two\nlines"]


def test_csv_bom_is_not_part_of_the_first_column_name() -> None:
    columns, rows = parse_rows("\ufefftext,label\nhello,pos\n".encode(), "csv")
    assert columns == ["text", "label"]
    assert rows[0]["text"] == "hello"


def test_csv_crlf_line_endings() -> None:
    _, rows = parse_rows(b"text,label\r\nhello,pos\r\nbye,neg\r\n", "csv")
    assert rows == [{"text": "hello", "label": "pos"}, {"text": "bye", "label": "neg"}]


def test_csv_blank_lines_and_header_spaces_are_ignored() -> None:
    columns, rows = parse_rows(b"\n text , label \n\nhello,pos\n\n\nbye,neg", "csv")
    assert columns == ["text", "label"]
    assert len(rows) == 2


def test_tsv() -> None:
    columns, rows = parse_rows(b"text\tlabel\nhello, world\tpos\n", "tsv")
    assert columns == ["text", "label"]
    assert rows == [{"text": "hello, world", "label": "pos"}]


def test_json_array_of_objects_keeps_value_types() -> None:
    data = b'[{"text": "a", "label": 1}, {"text": "b", "label": 0, "extra": true}]'
    columns, rows = parse_rows(data, "json")
    assert columns == ["text", "label", "extra"]
    assert rows[0] == {"text": "a", "label": 1}
    assert rows[1]["extra"] is True


def test_jsonl_with_blank_lines_and_crlf() -> None:
    data = b'{"text": "a", "label": "x"}\r\n\r\n   \n{"text": "b", "label": "y"}\n\n'
    columns, rows = parse_rows(data, "jsonl")
    assert columns == ["text", "label"]
    assert [row["text"] for row in rows] == ["a", "b"]


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break() -> None:
    data = '{"text": "a\u2028b", "label": "x"}\n{"text": "c", "label": "y"}\n'.encode()
    _, rows = parse_rows(data, "jsonl")
    assert rows[0]["text"] == "a\u2028b"


# ---- errors name the row or line ----------------------------------------------------------------


def test_ragged_csv_row_is_named_with_its_line() -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_rows(b'text,label\n"multi\nline",pos\nbad,row,here\n', "csv")
    assert info.value.row == 2
    assert "Row 2 (line 4) has 3 fields" in info.value.message


def test_unterminated_quote_names_where_it_opened() -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_rows(b'text,label\na,pos\nb,neg\n"c,pos\nd,neg\n', "csv")
    assert "Row 3 (line 4) has a quoted value that is never closed" in info.value.message


def test_value_over_the_csv_field_limit() -> None:
    with pytest.raises(InvalidDataset, match=f"longer than {MAX_CSV_FIELD_CHARS:,} characters"):
        parse_rows(b"text,label\n" + b"x" * (MAX_CSV_FIELD_CHARS + 1) + b",pos\n", "csv")


def test_invalid_utf8_names_the_line_when_utf8_is_asked_for() -> None:
    with pytest.raises(InvalidDataset, match="Line 3 is not valid UTF-8"):
        parse_rows(b"text,label\nok,pos\n\xff\xfe,neg\n", "csv", {"encoding": "utf-8"})


def test_invalid_utf8_falls_back_to_latin1_with_a_note() -> None:
    result = read_dataset("text,label\ncaf\u00e9 noir,pos\nthé,neg\n".encode("latin-1"), "csv")

    assert result.rows[0]["text"] == "caf\u00e9 noir"
    assert result.options["encoding"] == "latin-1"
    assert "line 2" in result.notes[0] and "Latin-1" in result.notes[0]


def test_jsonl_error_names_the_file_line_not_the_record() -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_rows(b'{"text": "a"}\n\n\n{"text": \n', "jsonl")
    assert info.value.row == 4
    assert "Line 4 is not valid JSON" in info.value.message


def test_json_rows_must_be_objects() -> None:
    with pytest.raises(InvalidDataset, match="Row 3 is the number 7, not an object"):
        parse_rows(b'[{"a": 1}, {"a": 2}, 7]', "json")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_json_numbers_outside_the_standard_are_refused(constant: bytes) -> None:
    with pytest.raises(InvalidDataset, match="Row 2, field 'score'"):
        parse_rows(b'[{"score": 1}, {"score": [' + constant + b"]}]", "json")


def test_whitespace_only_and_empty() -> None:
    with pytest.raises(InvalidDataset, match="empty"):
        parse_rows(b"", "csv")
    with pytest.raises(InvalidDataset, match="only whitespace"):
        parse_rows(b" \n\t\r\n", "jsonl")


# ---- profile ------------------------------------------------------------------------------------


def test_profile_rows_label_counts_and_preview() -> None:
    rows = "".join(f"text number {i},{'pos' if i % 3 else 'neg'}\n" for i in range(9))
    profile = _profile(("text,label\n" + rows).encode(), "csv")
    assert profile["rows"] == 9
    label = profile["columns"]["label"]
    assert label["type"] == "string"
    assert label["value_counts"] == {"pos": 6, "neg": 3}
    assert label["distinct"] == 2
    assert label["values"] == ["neg", "pos"]
    assert len(profile["preview"]) == PREVIEW_ROWS
    assert profile["preview"][0] == {"text": "text number 0", "label": "neg"}
    assert "value_counts" not in profile["columns"]["text"]  # every value differs: not a label column


def test_profile_length_stats_and_histogram() -> None:
    profile = _profile(b"text,label\na,x\nabc,y\nabcdefghij,x\nabcd,y\n", "csv")
    length = profile["columns"]["text"]["length"]
    assert (length["min"], length["max"], length["mean"], length["median"]) == (1, 10, 4.5, 3.5)
    assert sum(bucket["count"] for bucket in length["histogram"]) == 4
    assert length["histogram"][0]["from"] == 1
    assert length["histogram"][-1]["to"] >= 10


def test_profile_missing_values_name_the_first_row() -> None:
    profile = _profile(b"text,label\na,x\nb,\nc,y\n  ,x\n", "csv")
    assert profile["columns"]["label"]["missing"] == 1
    assert profile["columns"]["label"]["first_missing_row"] == 2
    assert profile["columns"]["text"]["first_missing_row"] == 4


def test_profile_mixed_types_say_where_each_kind_starts() -> None:
    data = json.dumps([{"label": 1}, {"label": 0}, {"label": "pos"}, {"label": 1}]).encode()
    label = _profile(data, "json")["columns"]["label"]
    assert label["type"] == "mixed"
    assert label["kinds"] == {"number": {"count": 3, "first_row": 1}, "string": {"count": 1, "first_row": 3}}


def test_profile_counts_numeric_text() -> None:
    columns = _profile(b"id,text\n1,a\n2.5,b\n-3,c\n", "csv")["columns"]
    assert columns["id"]["numeric"] == 3
    assert columns["text"]["numeric"] == 0


def test_profile_of_json_types() -> None:
    data = b'[{"n": 1, "b": true, "o": {"k": 1}}, {"n": 2.5, "b": false, "o": [1]}]'
    columns = _profile(data, "json")["columns"]
    assert (columns["n"]["type"], columns["b"]["type"], columns["o"]["type"]) == ("number", "bool", "object")


def test_trailing_delimiter_on_every_line_drops_the_empty_column() -> None:
    result = read_dataset(b"text,label,\ngood,pos,\nbad,neg,\n", "csv")

    assert result.columns == ["text", "label"] and result.rows[1] == {"text": "bad", "label": "neg"}
    assert "empty last column was dropped" in result.notes[0]


def test_json_rows_wrapped_in_one_key() -> None:
    result = read_dataset(
        b'{"version": 2, "data": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]}', "json"
    )

    assert result.columns == ["text", "label"] and len(result.rows) == 2
    assert "'data' array" in result.notes[0]


def test_excel_sep_line_names_the_delimiter_and_is_skipped() -> None:
    result = read_dataset(b"sep=;\r\ntext;label\r\ngood, fine;pos\r\nbad;neg\r\n", "csv")

    assert result.columns == ["text", "label"] and result.rows[0] == {"text": "good, fine", "label": "pos"}
    assert result.options["delimiter"] == ";"


def test_headerless_pandas_export_drops_its_index() -> None:
    lines = [
        f"{i},sentence number {i} is long enough to be text,{'pos' if i % 2 else 'neg'}" for i in range(12)
    ]

    result = read_dataset(("\n".join(lines) + "\n").encode(), "csv")

    assert result.options["header"] is False and result.options["index_column"] == "drop"
    assert result.columns == ["column_1", "column_2"] and len(result.rows) == 12
