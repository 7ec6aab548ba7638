"""A person's real files through the real API: detection first, explicit options second, re-import.

Fixtures are written at test time from ../shared/data (tests/import_fixtures.py). Each case is a file that
failed or was misread before issue 17: pandas' to_csv, headerless CSV, tab-separated .txt with a stray quote,
nested JSONL, chat JSONL, Alpaca JSON, Parquet, Arrow and a zipped saved datasets folder.
"""

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests import import_fixtures as fixtures


def _upload(client: TestClient, path: Path, **options: str) -> dict[str, Any]:
    response = client.post("/api/v1/datasets", files={"file": (path.name, path.read_bytes())}, data=options)
    assert response.status_code == 201, response.text
    return response.json()


def test_pandas_export_drops_the_index_and_proposes_classification(
    client: TestClient, tmp_path: Path
) -> None:
    # given: SST-2 written by DataFrame.to_csv (first header cell empty, index 0..n-1)
    path = fixtures.pandas_export(tmp_path / "sst2_pandas.csv", 300)

    # when
    dataset = _upload(client, path)

    # then: the index is gone, the header was read, and the proposal is text -> label classification
    assert dataset["columns"] == ["text", "label"]
    assert dataset["row_count"] == 300
    imported = dataset["profile"]["import"]
    assert imported["header"] is True and imported["index_column"] == "drop" and imported["delimiter"] == ","
    assert dataset["profile"]["proposal"]["task"] == "sequence-classification"
    assert dataset["profile"]["proposal"]["text_column"] == "text"
    assert dataset["profile"]["proposal"]["label_column"] == "label"


def test_pandas_index_kept_on_request(client: TestClient, tmp_path: Path) -> None:
    dataset = _upload(client, fixtures.pandas_export(tmp_path / "sst2_pandas.csv", 50), index_column="keep")

    assert dataset["columns"] == ["index", "text", "label"]
    assert dataset["profile"]["preview"][1]["index"] == "1"


def test_headerless_csv_gets_numbered_columns_and_a_joined_text_proposal(
    client: TestClient, tmp_path: Path
) -> None:
    # given: class,title,description rows with no header (the class number first)
    dataset = _upload(client, fixtures.headerless_news(tmp_path / "news.csv", 300))

    # then: the first row is data, not a header
    assert dataset["columns"] == ["column_1", "column_2", "column_3"]
    assert dataset["row_count"] == 300
    assert dataset["profile"]["import"]["header"] is False
    proposal = dataset["profile"]["proposal"]
    assert proposal["label_column"] == "column_1"
    assert proposal["text_column"] == "column_3"
    assert proposal["text_columns"] == ["column_2", "column_3"]


def test_headerless_csv_with_names_given(client: TestClient, tmp_path: Path) -> None:
    path = fixtures.headerless_news(tmp_path / "news.csv", 100)

    dataset = _upload(client, path, header="no", column_names="class,title,description")

    assert dataset["columns"] == ["class", "title", "description"]
    assert dataset["row_count"] == 100
    assert dataset["profile"]["proposal"]["label_column"] == "class"


def test_wrong_number_of_column_names_is_refused_with_the_fix(client: TestClient, tmp_path: Path) -> None:
    path = fixtures.headerless_news(tmp_path / "news.csv", 20)

    response = client.post(
        "/api/v1/datasets", files={"file": (path.name, path.read_bytes())}, data={"column_names": "a,b"}
    )

    assert response.status_code == 422
    assert "2 column name(s) were given" in response.json()["detail"]
    assert "the file has 3 column(s)" in response.json()["detail"]


@pytest.mark.parametrize("suffix", [".txt", ".tsv"])
def test_tab_separated_text_with_a_stray_quote(client: TestClient, tmp_path: Path, suffix: str) -> None:
    # given: headerless sentence<TAB>label lines; row 19 opens a quote that never closes
    path = fixtures.tab_txt(tmp_path / f"sentences{suffix}", 300, stray_quote_row=19)

    dataset = _upload(client, path)

    assert dataset["columns"] == ["column_1", "column_2"]
    assert dataset["row_count"] == 300
    imported = dataset["profile"]["import"]
    assert imported["delimiter"] == "\t" and imported["quotechar"] == "none" and imported["header"] is False
    assert any("Quotes" in note for note in imported["notes"])
    assert dataset["profile"]["proposal"]["text_column"] == "column_1"
    assert dataset["profile"]["proposal"]["label_column"] == "column_2"


def test_tab_separated_text_with_quoting_forced_names_the_row(client: TestClient, tmp_path: Path) -> None:
    path = fixtures.tab_txt(tmp_path / "sentences.txt", 40, stray_quote_row=19)

    response = client.post(
        "/api/v1/datasets", files={"file": (path.name, path.read_bytes())}, data={"quotechar": '"'}
    )

    assert response.status_code == 422
    assert "Row 19" in response.json()["detail"]


def test_nested_jsonl_is_flagged_then_exploded_by_reimport(client: TestClient, tmp_path: Path) -> None:
    # given: 20 tasks each holding 5 {input, output} instances
    dataset = _upload(client, fixtures.nested_jsonl(tmp_path / "tasks.jsonl", 20, 5))
    assert dataset["row_count"] == 20
    assert dataset["profile"]["import"]["nested_columns"] == {"meta": "object", "instances": "list"}
    assert "exploded" in " ".join(dataset["profile"]["import"]["notes"])

    # when: re-imported with explode (the stored original is read again)
    response = client.post(f"/api/v1/datasets/{dataset['id']}/reimport", data={"nested": "explode"})

    # then: one row per instance, objects flattened, and the file as uploaded is unchanged
    assert response.status_code == 200, response.text
    exploded = response.json()
    assert exploded["row_count"] == 100
    assert exploded["columns"] == ["id", "definition", "meta.source", "meta.split", "input", "output"]
    assert exploded["sha256"] == dataset["sha256"]
    # definition + input + output: instruction data, proposed as Alpaca
    assert exploded["profile"]["proposal"]["causal_lm"] == {
        "format": "alpaca",
        "instruction_column": "definition",
        "output_column": "output",
        "input_column": "input",
    }
    assert client.get(f"/api/v1/datasets/{dataset['id']}").json()["row_count"] == 100


def test_nested_jsonl_flattened(client: TestClient, tmp_path: Path) -> None:
    dataset = _upload(client, fixtures.nested_jsonl(tmp_path / "tasks.jsonl", 4, 2), nested="flatten")

    assert dataset["columns"] == ["id", "definition", "meta.source", "meta.split", "instances"]


def test_chat_jsonl_proposes_causal_lm_chat(client: TestClient, tmp_path: Path) -> None:
    dataset = _upload(client, fixtures.chat_jsonl(tmp_path / "chat.jsonl", 30))

    proposal = dataset["profile"]["proposal"]
    assert proposal["task"] == "causal-lm" and proposal["format"] == "chat"
    assert proposal["causal_lm"]["messages_column"] == "messages"
    assert dataset["profile"]["import"]["notes"] == []  # chat messages are readable as they are


def test_alpaca_json_proposes_alpaca(client: TestClient, tmp_path: Path) -> None:
    dataset = _upload(client, fixtures.alpaca_json(tmp_path / "alpaca.json", 30))

    proposal = dataset["profile"]["proposal"]
    assert proposal["task"] == "causal-lm" and proposal["format"] == "alpaca"
    assert proposal["causal_lm"]["input_column"] == "input"


@pytest.mark.parametrize(
    ("writer", "name"),
    [
        (fixtures.parquet_file, "trec.parquet"),
        (fixtures.arrow_file, "trec.arrow"),
        (fixtures.saved_dataset_zip, "trec_saved.zip"),
    ],
)
def test_binary_formats(client: TestClient, tmp_path: Path, writer: Any, name: str) -> None:
    dataset = _upload(client, writer(tmp_path / name, 300))

    assert dataset["columns"] == ["question", "coarse_label"]
    assert dataset["row_count"] == 300
    assert dataset["profile"]["columns"]["coarse_label"]["distinct"] == 6
    assert dataset["profile"]["proposal"]["label_column"] == "coarse_label"
    # the saved dataset's ClassLabel ids come back as their names
    assert set(dataset["profile"]["columns"]["coarse_label"]["values"]) == {
        "ABBR",
        "DESC",
        "ENTY",
        "HUM",
        "LOC",
        "NUM",
    }


def test_saved_dataset_dict_takes_train_and_reimports_another_split(
    client: TestClient, tmp_path: Path
) -> None:
    dataset = _upload(client, fixtures.saved_dataset_zip(tmp_path / "dd.zip", 300, dataset_dict=True))
    assert dataset["row_count"] == 250 and dataset["profile"]["import"]["split"] == "train"

    response = client.post(f"/api/v1/datasets/{dataset['id']}/reimport", data={"split": "test"})

    assert response.status_code == 200 and response.json()["row_count"] == 50
    missing = client.post(f"/api/v1/datasets/{dataset['id']}/reimport", data={"split": "dev"})
    assert missing.status_code == 422 and "its splits are test, train" in missing.json()["detail"]


@pytest.mark.parametrize(("encoding", "bom"), [("utf-8-sig", b""), ("utf-16", b""), ("latin-1", b"")])
def test_encodings(client: TestClient, tmp_path: Path, encoding: str, bom: bytes) -> None:
    rows = fixtures.shared_rows("trec", limit=40)
    text = "text,label\n" + "".join(
        f"Caf\u00e9 question {row['text'].replace(',', ' ')},{row['label']}\n" for row in rows
    )
    path = tmp_path / f"trec_{encoding}.csv"
    path.write_bytes(bom + text.encode(encoding))

    dataset = _upload(client, path)

    assert dataset["row_count"] == 40
    assert dataset["profile"]["preview"][0]["text"].startswith("Caf\u00e9 question")
    assert dataset["profile"]["import"]["encoding"] == encoding
    notes = " ".join(dataset["profile"]["import"]["notes"])
    assert ("Latin-1" in notes) == (encoding == "latin-1")


def test_semicolon_csv_is_detected(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "semicolon.csv"
    path.write_text("text;label\nhello, world;pos\ngoodbye;neg\nfine;pos\n", encoding="utf-8")

    dataset = _upload(client, path)

    assert dataset["columns"] == ["text", "label"] and dataset["profile"]["import"]["delimiter"] == ";"


def test_unknown_option_value_names_the_field(client: TestClient, tmp_path: Path) -> None:
    path = fixtures.pandas_export(tmp_path / "x.csv", 5)

    response = client.post(
        "/api/v1/datasets", files={"file": (path.name, path.read_bytes())}, data={"encoding": "ebcdic"}
    )

    assert response.status_code == 422
    assert response.json()["field"] == "encoding" and "Unknown encoding 'ebcdic'" in response.json()["detail"]


# ---- columns picked, labels checked, text columns joined ------------------------------------------


def test_label_column_with_too_many_classes_is_refused_with_the_reason(
    client: TestClient, tmp_path: Path
) -> None:
    # given: the headerless news file; column_2 (a title) repeats now and then, so it has value counts
    dataset = _upload(client, fixtures.headerless_news(tmp_path / "news.csv", 300))

    # when: a title column is chosen as the label
    response = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset["id"], "text_column": "column_3", "label_column": "column_2"},
    )

    # then
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert response.json()["field"] == "label_column"
    assert "distinct values in 300 rows" in detail
    assert "too many classes" in detail or "does not look like a label column" in detail


def test_share_of_distinct_labels_over_half_is_refused(client: TestClient, tmp_path: Path) -> None:
    # given: 40 rows, 30 distinct labels, each of 10 repeated once (so the column "looks like" labels)
    lines = ["text,label"] + [f"sentence number {i} here,tag{i % 30}" for i in range(40)]
    path = tmp_path / "many_tags.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = _upload(client, path)

    response = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"]})

    assert response.status_code == 422
    assert "30 distinct values in 40 rows (75% of the rows): too many classes" in response.json()["detail"]


def test_joined_text_columns_are_validated_and_read_joined(client: TestClient, tmp_path: Path) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Dataset
    from app.core.spec import JobSpec
    from worker.recipes.classification_data import classification_data

    dataset = _upload(client, fixtures.headerless_news(tmp_path / "news.csv", 120))
    bad = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset["id"], "text_columns": ["column_2", "nope"], "label_column": "column_1"},
    )
    assert bad.status_code == 422 and "'nope'" in bad.json()["detail"]
    clash = client.post(
        "/api/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "text_columns": ["column_2", "column_1"],
            "label_column": "column_1",
        },
    )
    assert clash.status_code == 422 and clash.json()["field"] == "text_columns"

    spec = JobSpec(dataset_id=dataset["id"], text_columns=["column_2", "column_3"], label_column="column_1")
    with Session(get_engine()) as session:
        row = session.get(Dataset, dataset["id"])
        assert row is not None
        data = classification_data(spec, row, None)
    first = dataset["profile"]["preview"][0]
    joined = f"{first['column_2']}\n{first['column_3']}"
    assert joined in data.train_texts + data.eval_texts


# ---- the job form: columns as dropdowns, the proposal preselected ---------------------------------


def test_job_form_offers_the_datasets_columns_and_preselects_the_proposal(
    client: TestClient, tmp_path: Path
) -> None:
    import re

    dataset = _upload(client, fixtures.headerless_news(tmp_path / "news.csv", 120))

    page = client.get(f"/jobs/new?dataset_id={dataset['id']}", headers={"accept": "text/html"}).text

    label_select = re.search(r'<select id="f-label-column".*?</select>', page, re.S)
    assert label_select is not None
    assert re.search(r'<option value="column_1" selected>', label_select.group(0))
    assert [m for m in re.findall(r'<option value="([^"]*)"', label_select.group(0))] == [
        "column_1",
        "column_2",
        "column_3",
    ]
    joined = re.search(r'<select id="f-text-columns"[^>]*multiple.*?</select>', page, re.S)
    assert joined is not None
    assert re.findall(r'<option value="([^"]*)" selected>', joined.group(0)) == ["column_2", "column_3"]


def test_column_swap_for_a_chat_dataset_proposes_causal_lm_chat(client: TestClient, tmp_path: Path) -> None:
    import re

    dataset = _upload(client, fixtures.chat_jsonl(tmp_path / "chat.jsonl", 20))

    fragment = client.get(
        f"/jobs/new/columns?dataset_id={dataset['id']}", headers={"HX-Request": "true"}
    ).text

    assert 'id="field-f-task" hx-swap-oob="true"' in fragment
    assert re.search(r'<option value="causal-lm" selected>', fragment)
    assert re.search(r'<option value="chat" selected>', fragment)
    messages = re.search(r'<select id="f-causal-lm-messages-column".*?</select>', fragment, re.S)
    assert messages is not None and '<option value="messages" selected>' in messages.group(0)


# ---- the dataset page and the upload form ------------------------------------------------------------


def test_dataset_page_shows_what_was_detected_and_reimports(client: TestClient, tmp_path: Path) -> None:
    dataset = _upload(client, fixtures.tab_txt(tmp_path / "sentences.txt", 60))

    page = client.get(f"/datasets/{dataset['id']}", headers={"accept": "text/html"}).text

    assert 'data-testid="import-delimiter">tab<' in page
    assert 'data-testid="import-header">no' in page
    assert 'data-testid="import-encoding">utf-8<' in page
    assert "do not pair up" in page
    assert 'action="/datasets/{}/reimport"'.format(dataset["id"]) in page

    # when: re-imported through the page's form with names for the columns
    response = client.post(
        f"/datasets/{dataset['id']}/reimport",
        data={"header": "no", "column_names": "sentence, label", "delimiter": "tab", "quotechar": "none"},
        headers={"accept": "text/html"},
        follow_redirects=False,
    )

    assert response.status_code == 303
    assert client.get(f"/api/v1/datasets/{dataset['id']}").json()["columns"] == ["sentence", "label"]


# ---- token lengths, the recommended max_length, truncation -------------------------------------------


def test_token_lengths_recommend_the_95th_percentile_and_count_truncation(
    client: TestClient, tmp_path: Path
) -> None:
    dataset = _upload(client, fixtures.pandas_export(tmp_path / "sst2.csv", 400))

    report = client.get(f"/api/v1/datasets/{dataset['id']}/token-lengths", params={"max_length": 16}).json()

    # SST-2 sentences: median ~20 MiniLM tokens, 95th percentile under 64, MiniLM reads 512 positions
    assert report["available"] is True and report["columns"] == ["text"] and report["measured"] == 400
    assert report["model_max_positions"] == 512
    assert report["min"] <= report["median"] <= report["p95"] <= report["max"]
    assert report["recommended_max_length"] % 8 == 0
    assert report["p95"] <= report["recommended_max_length"] < report["p95"] + 8
    assert report["truncated"] == round(report["truncated_share"] * 400)
    assert report["truncated_share"] > 0.5  # most sentences are longer than 16 tokens
    at_recommended = client.get(f"/api/v1/datasets/{dataset['id']}/token-lengths").json()
    assert at_recommended["max_length"] == at_recommended["recommended_max_length"]
    assert at_recommended["truncated_share"] <= 0.05


def test_token_lengths_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from app.core.token_lengths import tokenizer_for; "
        "tok, positions = tokenizer_for('bundled/all-MiniLM-L6-v2'); "
        "assert len(tok.encode('a fine film').ids) > 2 and positions == 512; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_job_form_warns_before_launch_what_share_would_be_truncated(
    client: TestClient, tmp_path: Path
) -> None:
    dataset = _upload(client, fixtures.pandas_export(tmp_path / "sst2.csv", 200))
    form = {"dataset_id": str(dataset["id"]), "text_column": "text", "label_column": "label"}

    short = client.post(
        "/jobs/new/lengths", data={**form, "training.max_length": "12"}, headers={"HX-Request": "true"}
    )
    long = client.post(
        "/jobs/new/lengths", data={**form, "training.max_length": "256"}, headers={"HX-Request": "true"}
    )

    assert short.status_code == 200 and 'data-testid="truncation-warning"' in short.text
    assert "would be truncated" in short.text and "At max length 12" in short.text
    assert 'data-testid="recommended-max-length"' in short.text
    assert 'data-testid="truncation-none"' in long.text


def test_windows_1252_and_bomless_utf16(client: TestClient, tmp_path: Path) -> None:
    text = "text,label\n\u201cGreat\u201d \u2013 caf\u00e9,pos\nawful,neg\nfine,pos\n"
    windows = tmp_path / "windows.csv"
    windows.write_bytes(text.encode("cp1252"))
    utf16 = tmp_path / "utf16_no_bom.csv"
    utf16.write_bytes(text.encode("utf-16-le"))

    from_windows = _upload(client, windows)
    from_utf16 = _upload(client, utf16)

    assert from_windows["profile"]["import"]["encoding"] == "cp1252"
    assert from_windows["profile"]["preview"][0]["text"] == "\u201cGreat\u201d \u2013 caf\u00e9"
    assert "Windows-1252" in from_windows["profile"]["import"]["notes"][0]
    assert from_utf16["profile"]["import"]["encoding"] == "utf-16-le"
    assert from_utf16["profile"]["preview"][0]["text"] == "\u201cGreat\u201d \u2013 caf\u00e9"


def test_quoted_line_breaks_across_the_detection_sample(client: TestClient, tmp_path: Path) -> None:
    # given: reviews with line breaks inside quoted values, longer than the rows sampled for detection
    rows = fixtures.shared_rows("sst2", limit=300)
    lines = ["review;sentiment"] + [
        f'"{row["text"]}\n\nsecond paragraph; more";{row["label"]}' for row in rows
    ]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    dataset = _upload(client, path)

    assert dataset["profile"]["import"]["delimiter"] == ";"
    assert dataset["columns"] == ["review", "sentiment"] and dataset["row_count"] == 300


def test_dataset_page_reports_token_lengths_of_the_proposed_columns(
    client: TestClient, tmp_path: Path
) -> None:
    dataset = _upload(client, fixtures.headerless_news(tmp_path / "news.csv", 100))

    page = client.get(f"/datasets/{dataset['id']}", headers={"accept": "text/html"}).text
    fragment = client.get(f"/datasets/{dataset['id']}/lengths", headers={"HX-Request": "true"}).text

    assert f'hx-get="/datasets/{dataset["id"]}/lengths"' in page
    assert "column_2 + column_3" in fragment and 'data-testid="recommended-max-length"' in fragment


def test_question_answer_csv_proposes_prompt_completion(client: TestClient, tmp_path: Path) -> None:
    rows = fixtures.shared_rows("trec", limit=30)
    path = tmp_path / "qa.csv"
    path.write_text(
        "question,answer\n" + "".join(f'"{row["text"]}","It asks for {row["label"]}."\n' for row in rows),
        encoding="utf-8",
    )

    proposal = _upload(client, path)["profile"]["proposal"]

    assert proposal["format"] == "prompt-completion"
    assert proposal["causal_lm"]["prompt_column"] == "question"
    assert proposal["causal_lm"]["completion_column"] == "answer"


def test_json_lines_saved_as_json_are_read(client: TestClient, tmp_path: Path) -> None:
    # given: DataFrame.to_json(orient="records", lines=True) written to a .json file
    path = tmp_path / "train.json"
    rows = fixtures.shared_rows("sst2", limit=50)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    dataset = _upload(client, path)

    assert dataset["row_count"] == 50 and dataset["columns"] == ["text", "label"]
    assert dataset["profile"]["import"]["json_lines"] is True
