"""Real-world shaped dataset files, written at test time from ../shared/data (no copies are committed).

Each function writes one file the way a person's tools write it: pandas' ``to_csv`` (an unnamed index column),
a headerless CSV, a tab-separated ``.txt`` with a stray quote, nested and chat JSONL, Alpaca JSON, Parquet, an
Arrow file and a zipped ``datasets.save_to_disk`` folder (its layout written with pyarrow, as datasets does).
"""

import csv
import io
import json
import zipfile
from pathlib import Path

from tests.studio import SHARED_DATA


def shared_rows(name: str, split: str = "train", limit: int | None = None) -> list[dict[str, str]]:
    """Rows of ../shared/data/<name>/<split>.csv (``text``, ``label``)."""
    with (SHARED_DATA / name / f"{split}.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[:limit] if limit else rows


def _csv_text(records: list[list[str]], delimiter: str = ",") -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(records)
    return out.getvalue()


def pandas_export(path: Path, limit: int = 300) -> Path:
    """SST-2 as ``DataFrame.to_csv`` writes it: first header cell empty, then the index 0..n-1."""
    rows = shared_rows("sst2", limit=limit)
    records = [["", "text", "label"]] + [[str(i), row["text"], row["label"]] for i, row in enumerate(rows)]
    path.write_text(_csv_text(records), encoding="utf-8")
    return path


def headerless_news(path: Path, limit: int = 300) -> Path:
    """TREC as a headerless CSV shaped like AG News: ``class,title,description`` with a class number first."""
    rows = shared_rows("trec", limit=limit)
    names = sorted({row["label"] for row in rows})
    records = [
        [str(names.index(row["label"]) + 1), " ".join(row["text"].split()[:4]), row["text"]] for row in rows
    ]
    path.write_text(_csv_text(records), encoding="utf-8")
    return path


def tab_txt(path: Path, limit: int = 300, stray_quote_row: int | None = 19) -> Path:
    """SST-2 as a headerless ``sentence<TAB>label`` text file; one sentence holds a lone quote."""
    rows = shared_rows("sst2", limit=limit)
    lines = []
    for number, row in enumerate(rows, start=1):
        text = row["text"].replace("\t", " ").replace('"', "'")
        if number == stray_quote_row:
            text = '"' + text  # a quote that never closes, as in real scraped sentences
        lines.append(f"{text}\t{row['label']}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def nested_jsonl(path: Path, tasks: int = 20, per_task: int = 5) -> Path:
    """Super-NaturalInstructions-like JSONL: ``{"id", "definition", "instances": [{"input", "output"}]}``."""
    rows = shared_rows("sst2", limit=tasks * per_task)
    lines = []
    for task in range(tasks):
        chunk = rows[task * per_task : (task + 1) * per_task]
        lines.append(
            json.dumps(
                {
                    "id": f"task{task}",
                    "definition": "Say whether the review is positive or negative.",
                    "meta": {"source": "sst2", "split": "train"},
                    "instances": [
                        {"input": row["text"], "output": "positive" if row["label"] == "1" else "negative"}
                        for row in chunk
                    ],
                }
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat_jsonl(path: Path, limit: int = 60) -> Path:
    """Chat data: ``{"messages": [{role, content}, ...], "source": ...}`` per line."""
    rows = json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:limit]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["output"]},
                ],
                "source": "alpaca",
            }
        )
        for row in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def alpaca_json(path: Path, limit: int = 60) -> Path:
    """Alpaca JSON (an array of ``{instruction, input, output}``)."""
    rows = json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:limit]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _table(limit: int):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    rows = shared_rows("trec", limit=limit)
    return pa.table(
        {"question": [row["text"] for row in rows], "coarse_label": [row["label"] for row in rows]}
    )


def parquet_file(path: Path, limit: int = 300) -> Path:
    """TREC as Parquet (``question``, ``coarse_label``)."""
    import pyarrow.parquet as pq

    pq.write_table(_table(limit), path)
    return path


def arrow_file(path: Path, limit: int = 300) -> Path:
    """TREC as an Arrow IPC (Feather v2) file."""
    import pyarrow as pa

    table = _table(limit)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def saved_dataset_zip(path: Path, limit: int = 300, dataset_dict: bool = False) -> Path:
    """A zipped ``save_to_disk`` folder: Arrow stream files + dataset_info.json + state.json (per split)."""
    import pyarrow as pa

    # datasets stores a ClassLabel column as ids, with the names in the schema's "huggingface" metadata
    rows = shared_rows("trec", limit=limit)
    names = sorted({row["label"] for row in rows})
    features = {
        "question": {"dtype": "string", "_type": "Value"},
        "coarse_label": {"names": names, "_type": "ClassLabel"},
    }
    table = pa.table(
        {
            "question": [row["text"] for row in rows],
            "coarse_label": [names.index(row["label"]) for row in rows],
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    splits = (
        {"train": table.slice(0, limit - 50), "test": table.slice(limit - 50)}
        if dataset_dict
        else {"": table}
    )
    with zipfile.ZipFile(path, "w") as archive:
        if dataset_dict:
            archive.writestr("trec/dataset_dict.json", json.dumps({"splits": list(splits)}))
        for split, part in splits.items():
            folder = f"trec/{split}/" if split else "trec/"
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, part.schema) as writer:
                writer.write_table(part)
            archive.writestr(folder + "data-00000-of-00001.arrow", sink.getvalue().to_pybytes())
            archive.writestr(folder + "dataset_info.json", json.dumps({"features": {}}))
            archive.writestr(
                folder + "state.json",
                json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}),
            )
    return path
