"""Bad input gets a clear error and loses nothing: every case of tests/corpus/cases.json against the real app.

Each case is one malformed dataset upload or job spec. The test checks the status (4xx, never 500), that the
message says where and what (a substring from the manifest, and the field where given), and that nothing was
kept: no new dataset, job or event rows, and no new file under the artifact folder (temp files included).
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

CORPUS = Path(__file__).parent / "corpus"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "cases.json").read_text(encoding="utf-8"))["cases"]
DEFAULT_JOB_DATASET = "valid/two_classes.csv"


def _deeply_nested_json() -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


def _huge_csv_field() -> bytes:
    return b"text,label\n" + b"y" * 140_000 + b",pos\n"


GENERATORS: dict[str, Callable[[], bytes]] = {
    "deeply_nested_json": _deeply_nested_json,
    "huge_csv_field": _huge_csv_field,
}


def _stored(data_dir: Path) -> dict[str, Any]:
    """Row counts and artifact files: what a failed request must leave exactly as it was."""
    from app.core.db import get_engine
    from app.core.models import Dataset, Job, JobEvent

    with Session(get_engine()) as session:
        counts = {
            table.__name__: session.exec(select(func.count()).select_from(table)).one()
            for table in (Dataset, Job, JobEvent)
        }
    root = data_dir / "artifacts"
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    return {"rows": counts, "files": files}


def _upload(client: TestClient, relative: str, name: str | None = None) -> int:
    path = CORPUS / relative
    data = {"name": name} if name else None
    response = client.post("/api/v1/datasets", files={"file": (path.name, path.read_bytes())}, data=data)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _substitute(value: Any, ids: dict[str, int]) -> Any:
    if isinstance(value, str) and value in ids:
        return ids[value]
    if isinstance(value, dict):
        return {key: _substitute(item, ids) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, ids) for item in value]
    return value


@pytest.fixture
def no_enqueue(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No broker runs in these tests: a spec that got as far as the queue is a test failure."""
    import app.core.queue

    def refuse(job_id: int) -> str:
        raise AssertionError(f"job {job_id} was sent to the queue; its spec should have been refused first")

    monkeypatch.setattr(app.core.queue, "enqueue_training", refuse)
    yield


def _dataset_request(client: TestClient, case: dict[str, Any]) -> Any:
    if case.get("missing_file"):
        return client.post("/api/v1/datasets", data={"name": "no file"})
    if "generate" in case:
        content = GENERATORS[case["generate"]]()
    else:
        content = (CORPUS / case["file"]).read_bytes()
    filename = case.get("filename", Path(case["file"] or "").name)
    # "options": import options given explicitly (detection would otherwise read the file another way)
    return client.post("/api/v1/datasets", files={"file": (filename, content)}, data=case.get("options"))


def _job_request(client: TestClient, case: dict[str, Any], ids: dict[str, int]) -> Any:
    spec = case["spec"]
    if isinstance(spec, str) and spec.startswith("$raw:"):
        return client.post(
            "/api/v1/jobs", content=spec.removeprefix("$raw:"), headers={"content-type": "application/json"}
        )
    return client.post("/api/v1/jobs", json=_substitute(spec, ids))


def test_corpus_is_large_and_unique() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)
    for case in CASES:
        if case.get("file"):
            assert (CORPUS / case["file"]).is_file(), case["id"]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_refused_and_nothing_is_kept(
    case: dict[str, Any],
    client: TestClient,
    studio_settings: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_enqueue: None,
) -> None:
    from app.core.settings import get_settings

    # given: the case's settings, and the datasets a job case refers to (uploaded before the snapshot)
    for name, value in case.get("settings", {}).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    ids: dict[str, int] = {}
    if case["kind"] == "dataset" and "upload_first" in case:
        _upload(client, case["file"], case["upload_first"].get("name"))
    if case["kind"] == "job":
        ids["$dataset"] = _upload(client, case.get("dataset", DEFAULT_JOB_DATASET))
        if "validation" in case:
            ids["$validation"] = _upload(client, case["validation"])
    before = _stored(studio_settings)

    # when
    if case["kind"] == "dataset":
        response = _dataset_request(client, case)
    else:
        response = _job_request(client, case, ids)

    # then: a 4xx whose message says where and what ...
    assert response.status_code == case["status"], response.text
    assert 400 <= response.status_code < 500
    body = response.json()
    assert case["message"] in body["detail"], body
    if "field" in case:
        fields = [body.get("field")] + [error["field"] for error in body.get("errors", [])]
        assert case["field"] in fields, body
    # ... and nothing half-written stays behind
    assert _stored(studio_settings) == before
