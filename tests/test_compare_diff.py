"""Compare's settings diff (issue 19): over resolved values, so an omitted default is no difference, and shown as
text a person reads (no JSON escapes)."""

import re
from typing import Any

from app.services.compare import config_diff, display_value, headline_metric, metric_rows
from app.web.render import templates


def test_an_omitted_default_is_not_a_difference() -> None:
    # given: one job spelled out LoRA's default alpha, the other left it out; they differ in the system prompt
    spelled_out = {
        "dataset_id": 1,
        "method": "lora",
        "method_config": {"r": 8, "alpha": 16},
        "causal_lm": {"system_prompt": "Don't guess."},
    }
    omitted = {
        "dataset_id": 1,
        "method": "lora",
        "method_config": {"r": 8},
        "causal_lm": {"system_prompt": "It's fine."},
    }
    # when
    diff = config_diff([spelled_out, omitted])
    # then: only the real difference is listed
    assert diff == [{"field": "causal_lm.system_prompt", "values": ["Don't guess.", "It's fine."]}]


def test_settings_read_as_text() -> None:
    assert display_value("Don't guess.") == "Don't guess."
    assert display_value(["q_proj", "v_proj"]) == "q_proj, v_proj"
    assert display_value(0.0001) == "0.0001" and display_value(True) == "yes" and display_value(None) == "—"


def test_the_compare_page_shows_quotes_unescaped() -> None:
    # given: a diff row whose values hold apostrophes
    class FakeJob:
        def __init__(self, job_id: int) -> None:
            self.id = job_id

    comparison: Any = type(
        "C",
        (),
        {
            "jobs": [FakeJob(1), FakeJob(2)],
            "summary": [],
            "running": False,
            "diff": [{"field": "causal_lm.system_prompt", "values": ["Don't guess.", None]}],
        },
    )()
    # when
    html = templates.get_template("_compare_body.html").render(comparison=comparison, job_ids="1,2")
    # then: the text reads as written (HTML-escaped apostrophe at most, never a JSON \\u0027)
    assert "\\u0027" not in html
    assert "Don&#39;t guess." in html or "Don't guess." in html


def test_jobs_list_and_dashboard_show_each_jobs_headline_metric(client: Any) -> None:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Adapter, JobStatus
    from tests.factories import create_job, sst2_bytes

    # given: a finished classification job whose adapter kept accuracy 0.8125, and a job still queued
    dataset_id = client.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))}).json()["id"]
    with Session(get_engine()) as session:
        done = create_job(session, dataset_id=dataset_id, name="finished one")
        done.status = JobStatus.succeeded
        session.add(done)
        metrics = {"accuracy": 0.8125, "loss": 0.41, "runtime": 5.068}
        session.add(
            Adapter(
                job_id=done.id,
                name="a",
                method="lora",
                task="sequence-classification",
                base_model="m",
                storage_key="k",
                size_bytes=1,
                trainable_params=1,
                total_params=10,
                metrics=metrics,
            )
        )
        session.commit()
        create_job(session, dataset_id=dataset_id, name="queued one")
    for path in ("/jobs", "/"):
        # when
        page = client.get(path, headers={"Accept": "text/html"}).text
        # then: the finished job shows its accuracy in the Metric column, the queued one a dash
        assert "<th>Metric</th>" in page, path
        cells = re.findall(r'data-testid="job-metric">(.*?)</td>', page)
        assert any("0.812" in cell and "accuracy" in cell for cell in cells), (path, cells)
        assert any("—" in cell for cell in cells), (path, cells)


def test_headline_metric_per_task() -> None:
    assert headline_metric("causal-lm", {"perplexity": 3.2, "loss": 1.16}) == ("perplexity", 3.2)
    assert headline_metric("causal-lm", {"loss": 1.16}) == ("eval loss", 1.16)
    assert headline_metric("sequence-classification", {"train_loss": 0.3}) is None


def test_adapter_metrics_read_with_labels_and_units() -> None:
    rows = metric_rows({"runtime": 5.068, "accuracy": 0.8125, "samples_per_second": 23.68, "odd_key": 2})
    assert rows == [
        ("Eval accuracy", "0.812"),
        ("Eval time", "5.1 s"),
        ("Eval speed", "23.7 samples/s"),
        ("Odd key", "2"),
    ]
