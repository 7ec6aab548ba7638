"""Server-side downsampling of metric series, the series endpoint and the full downloads."""

import csv
import io
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert

from app.services.series import downsample


def _check_downsampled(x: np.ndarray, y: np.ndarray, max_points: int) -> None:
    xs, ys = downsample(x, y, max_points)
    assert len(ys) <= max_points
    assert xs[0] == x[0] and ys[0] == y[0]  # first
    assert xs[-1] == x[-1] and ys[-1] == y[-1]  # last
    assert ys.min() == y.min() and ys.max() == y.max()  # extremes
    assert x[int(np.argmin(y))] in xs and x[int(np.argmax(y))] in xs
    assert np.all(np.diff(xs) > 0)  # still in step order, no repeats
    # every kept point is a real point
    lookup = dict(zip(x.tolist(), y.tolist(), strict=True))
    assert all(lookup[a] == b for a, b in zip(xs.tolist(), ys.tolist(), strict=True))


@pytest.mark.parametrize("n", [5, 999, 1000, 1001, 12_345, 200_000])
@pytest.mark.parametrize("max_points", [4, 10, 11, 1000])
def test_downsampling_keeps_first_last_min_max_and_bounds_the_count(n: int, max_points: int) -> None:
    rng = np.random.default_rng(n + max_points)
    x = np.arange(n, dtype=np.float64) * 2 + 1
    y = np.cumsum(rng.normal(size=n))
    y[n // 3] = 1e6  # a spike
    y[n // 2] = -1e6  # a dip
    _check_downsampled(x, y, max_points)


def test_short_series_are_returned_whole() -> None:
    x, y = np.arange(50.0), np.arange(50.0) ** 2
    xs, ys = downsample(x, y, 2000)
    assert xs.tolist() == x.tolist() and ys.tolist() == y.tolist()


def test_extremes_at_the_edges_and_constant_series() -> None:
    x = np.arange(10_000.0)
    y = np.linspace(0, 1, 10_000)  # min is first, max is last
    _check_downsampled(x, y, 100)
    _check_downsampled(x, np.ones(10_000), 100)


@pytest.mark.parametrize("max_points", [10, 101, 1000, 2000])
def test_long_series_keep_extremes_through_block_summaries_as_points_arrive(max_points: int) -> None:
    from app.services.series import BLOCK, _Column

    # given: a series long enough for the block path, arriving in uneven pieces (a live run)
    rng = np.random.default_rng(max_points)
    n = BLOCK * max_points * 5 + 12_345
    x = np.arange(1, n + 1, dtype=np.float64)
    y = np.cumsum(rng.normal(size=n))
    y[n // 5] = 1e9
    y[n - 7] = -1e9  # in the last, partial block
    column = _Column()
    cuts = sorted(rng.choice(np.arange(1, n), size=40, replace=False).tolist())
    for start, end in zip([0, *cuts], [*cuts, n], strict=True):
        column.append(x[start:end], y[start:end])
        xs, ys = column.chart(max_points)
        # then: at every moment the chart is bounded and keeps the first, last, min and max so far
        assert len(ys) <= max_points
        assert xs[0] == 1 and xs[-1] == end
        assert ys.min() == y[:end].min() and ys.max() == y[:end].max()
        assert np.all(np.diff(xs) > 0)
    assert column.arrays()[1].tolist() == y.tolist()
    assert len(column.chart(max_points)[1]) > max_points * 0.85  # the budget is used, not squandered


# ---- the endpoint -----------------------------------------------------------------------------


def _job_with_points(train_losses: list[float], eval_every: int = 0) -> int:
    """A job row with one train point per step (loss, lr) and an eval point every ``eval_every`` steps."""
    from app.core.db import session_scope
    from app.core.models import Job, MetricPoint

    with session_scope() as session:
        job = Job(
            name="series",
            spec={"task": "sequence-classification"},
            method="lora",
            base_model="m",
            status="succeeded",
        )
        session.add(job)
        session.commit()
        assert job.id is not None
        rows: list[dict[str, Any]] = []
        for step, loss in enumerate(train_losses, 1):
            rows.append(
                {
                    "job_id": job.id,
                    "step": step,
                    "split": "train",
                    "values": {"loss": loss, "learning_rate": 1e-3},
                }
            )
            if eval_every and step % eval_every == 0:
                rows.append(
                    {
                        "job_id": job.id,
                        "step": step,
                        "split": "eval",
                        "values": {"loss": loss / 2, "accuracy": 0.5},
                    }
                )
        session.execute(insert(MetricPoint), rows)
        session.commit()
        return job.id


def test_series_endpoint_downsamples_and_reports_totals(client: Any) -> None:
    # given: 20,000 train points with a spike, and eval every 100 steps
    rng = np.random.default_rng(0)
    losses = (2 + np.cumsum(rng.normal(scale=0.01, size=20_000))).tolist()
    losses[7777] = 99.0
    job_id = _job_with_points(losses, eval_every=100)

    # when
    response = client.get(f"/api/v1/jobs/{job_id}/series", params={"max_points": 500})

    # then
    assert response.status_code == 200
    body = response.json()
    assert body["points"] == 20_000 + 200
    assert set(body["series"]) == {"train.loss", "train.learning_rate", "eval.loss", "eval.accuracy"}
    loss = body["series"]["train.loss"]
    assert loss["total"] == 20_000 and len(loss["y"]) <= 500
    assert loss["x"][0] == 1 and loss["x"][-1] == 20_000
    assert max(loss["y"]) == 99.0 and min(loss["y"]) == min(losses)
    assert body["series"]["eval.loss"]["total"] == 200 and len(body["series"]["eval.loss"]["y"]) == 200

    # when: only some series are asked for
    picked = client.get(f"/api/v1/jobs/{job_id}/series", params={"keys": "eval.accuracy"}).json()
    assert list(picked["series"]) == ["eval.accuracy"]


def test_series_follow_new_points_and_deleted_points(client: Any) -> None:
    from sqlmodel import col, delete

    from app.core.db import session_scope
    from app.core.models import MetricPoint

    job_id = _job_with_points([3.0, 2.0, 1.0])
    first = client.get(f"/api/v1/jobs/{job_id}/series").json()
    assert first["series"]["train.loss"]["y"] == [3.0, 2.0, 1.0]

    # when: more points are logged, the next request includes them (read after the cursor)
    with session_scope() as session:
        session.add(MetricPoint(job_id=job_id, step=4, split="train", values={"loss": 0.5}))
        session.commit()
    second = client.get(f"/api/v1/jobs/{job_id}/series").json()
    assert second["series"]["train.loss"]["y"] == [3.0, 2.0, 1.0, 0.5]
    assert second["cursor"] > first["cursor"]

    # when: a resume deletes the points after step 2 and logs a new step 3, the series is read again
    with session_scope() as session:
        session.execute(
            delete(MetricPoint).where(col(MetricPoint.job_id) == job_id, col(MetricPoint.step) > 2)
        )
        session.add(MetricPoint(job_id=job_id, step=3, split="train", values={"loss": 1.5}))
        session.commit()
    third = client.get(f"/api/v1/jobs/{job_id}/series").json()
    assert third["series"]["train.loss"]["x"] == [1, 2, 3]
    assert third["series"]["train.loss"]["y"] == [3.0, 2.0, 1.5]
    assert third["points"] == 3


def test_series_endpoint_errors(client: Any) -> None:
    assert client.get("/api/v1/jobs/999/series").status_code == 404
    job_id = _job_with_points([1.0])
    response = client.get(f"/api/v1/jobs/{job_id}/series", params={"max_points": 0})
    assert response.status_code == 422
    assert "max_points" in response.text


def test_full_series_downloads_as_csv_and_json(client: Any) -> None:
    # given
    losses = [float(i) for i in range(2500, 0, -1)]
    job_id = _job_with_points(losses, eval_every=1000)

    # when: CSV
    response = client.get(f"/api/v1/jobs/{job_id}/metrics/download", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))

    # then: every point, not downsampled, one column per metric
    assert len(rows) == 2500 + 2
    train = [row for row in rows if row["split"] == "train"]
    assert [float(row["loss"]) for row in train] == losses
    assert {"id", "step", "epoch", "split", "created_at", "loss", "learning_rate", "accuracy"} <= set(rows[0])
    evals = [row for row in rows if row["split"] == "eval"]
    assert [row["accuracy"] for row in evals] == ["0.5", "0.5"] and evals[0]["learning_rate"] == ""

    # when: JSON
    points = client.get(f"/api/v1/jobs/{job_id}/metrics/download", params={"format": "json"}).json()
    assert len(points) == 2502
    assert [p["values"]["loss"] for p in points if p["split"] == "train"] == losses
    assert client.get(f"/api/v1/jobs/{job_id}/metrics/download", params={"format": "xml"}).status_code == 422
