"""Write-time roll-ups (app/core/rollups.py): the metric writer keeps per-block summaries as it writes points,
and long series are charted from them (app/services/series.py) with the same answer as from the raw points."""

import math
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


def _job() -> int:
    from app.core.db import get_engine
    from app.core.models import JobStatus
    from tests.factories import create_dataset, create_job

    with Session(get_engine()) as session:
        dataset = create_dataset(session, CSV)
        job = create_job(session, dataset_id=dataset.id, training={"max_steps": 10})
        job.status, job.run_token = JobStatus.running, "token-1"
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def _log(job_id: int, steps: range, rng: np.random.Generator) -> None:
    """Points through the worker's writer, in uneven batches: a loss random walk with spikes, a learning rate,
    a grad norm that is sometimes NaN, and an eval point every 100 steps."""
    from app.core.models import utcnow
    from worker.reporting import MetricWriter

    writer = MetricWriter(job_id, cancel_poll=0.05, run_token="token-1", attempt=1, batch=37)
    for step in steps:
        loss = float(2 + math.sin(step / 50) + rng.normal(scale=0.3)) + (40.0 if step % 997 == 0 else 0.0)
        grad = float("nan") if step % 13 == 0 else float(abs(rng.normal()))
        values = {"loss": loss, "learning_rate": 1e-3 * (1 - step / 10_000), "grad_norm": grad}
        writer.put({"point": {"step": step, "split": "train", "values": values, "created_at": utcnow()}})
        if step % 100 == 0:
            evaluation = {"loss": loss / 2, "accuracy": float(rng.uniform())}
            writer.put(
                {"point": {"step": step, "split": "eval", "values": evaluation, "created_at": utcnow()}}
            )
    writer.close()


def _raw(job_id: int) -> list[tuple[int, int, str, dict[str, Any]]]:
    from app.core.db import get_engine
    from app.core.models import MetricPoint

    with Session(get_engine()) as session:
        rows = session.exec(
            select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(col(MetricPoint.id))
        ).all()
        return [(int(r.id or 0), r.step, r.split, dict(r.values)) for r in rows]


def _blocks(job_id: int, size: int) -> list[tuple[int, int]]:
    from app.core.db import get_engine
    from app.core.models import MetricRollup

    with Session(get_engine()) as session:
        rows = session.exec(
            select(MetricRollup.first_id, MetricRollup.last_id)
            .where(MetricRollup.job_id == job_id, MetricRollup.size == size)
            .order_by(col(MetricRollup.last_id))
        ).all()
        return [(int(a), int(b)) for a, b in rows]


def _reference_units(raw: list[Any], blocks: list[tuple[int, int]], key: str) -> Any:
    """The units of one series computed from the raw points alone (independently of app/core/rollups.py)."""
    from app.services.series import _Units

    split, name = key.split(".", 1)
    units = _Units()
    block_of = {}
    for index, (first, last) in enumerate(blocks):
        for point in raw:
            if first <= point[0] <= last:
                block_of[point[0]] = index
    grouped: list[tuple[int | None, list[tuple[float, float]]]] = []
    for point_id, step, point_split, values in raw:
        value = values.get(name)
        if point_split != split or not isinstance(value, float) or not math.isfinite(value):
            continue
        block = block_of.get(point_id)
        if grouped and block is not None and grouped[-1][0] == block:
            grouped[-1][1].append((float(step), value))
        else:
            grouped.append((block, [(float(step), value)]))
    for _, points in grouped:
        ys = [v for _, v in points]
        if len(points) <= 4:
            picked = list(range(len(points)))
        else:
            picked = sorted({0, int(np.argmin(ys)), int(np.argmax(ys)), len(points) - 1})
        flat = [float(len(points))]
        for i in picked:
            flat += [points[i][0], points[i][1]]
        units.add(flat)
    return units


def test_the_writer_keeps_block_summaries_as_it_writes(client: TestClient) -> None:
    job_id = _job()
    _log(job_id, range(1, 2001), np.random.default_rng(1))
    raw = _raw(job_id)
    assert len(raw) == 2020
    for size in (16, 64, 256):
        blocks = _blocks(job_id, size)
        assert len(blocks) == len(raw) // size  # every full block, the unfinished tail is left to the reader
        ids = [r[0] for r in raw]
        assert [b[0] for b in blocks] == ids[: len(blocks) * size : size]
        assert [b[1] for b in blocks] == ids[size - 1 : len(blocks) * size : size]


@pytest.mark.parametrize("max_points", [40, 200, 2000])
def test_series_from_rollups_equal_series_from_raw_points(client: TestClient, max_points: int) -> None:
    from app.services.series import chart_units, get_cache, get_rollup_cache, rollups_for_chart

    get_cache().clear()
    get_rollup_cache().clear()
    # given: a run logged by two writers (a worker restart: the first writer's unfinished blocks are a gap)
    job_id = _job()
    rng = np.random.default_rng(max_points)
    _log(job_id, range(1, 1201), rng)
    _log(job_id, range(1201, 4001), rng)
    raw = _raw(job_id)
    # when: the chart is asked for
    answer = client.get(f"/api/v1/jobs/{job_id}/series?max_points={max_points}").json()
    with Session(__import__("app.core.db", fromlist=["get_engine"]).get_engine()) as session:
        entry = rollups_for_chart(session, job_id, max_points)
    if max_points == 2000:
        assert entry is None  # 4,040 points: too short for roll-ups at this budget, the raw path answers
    else:
        assert entry is not None
        blocks = _blocks(job_id, entry.size)
        assert len(blocks) >= (max_points - 2) // 2
    assert answer["points"] == len(raw) and answer["cursor"] == raw[-1][0]
    for key in ("train.loss", "train.grad_norm", "train.learning_rate", "eval.accuracy", "eval.loss"):
        split, name = key.split(".", 1)
        points = [
            (float(r[1]), float(r[3][name]))
            for r in raw
            if r[2] == split and isinstance(r[3].get(name), float) and math.isfinite(r[3][name])
        ]
        xs, ys = answer["series"][key]["x"], answer["series"][key]["y"]
        # then: the same answer as computed from the raw points with the same blocks
        if entry is not None:
            want_x, want_y, total = chart_units(_reference_units(raw, blocks, key).arrays(), max_points)
            assert xs == want_x.tolist() and ys == want_y.tolist(), key
            assert total == len(points) == answer["series"][key]["total"]
        # and what a min/max chart promises: bounded, first, last, every extreme, only real points, in order
        lookup = dict(points)
        assert len(xs) <= max_points
        assert (xs[0], ys[0]) == points[0] and (xs[-1], ys[-1]) == points[-1]
        assert min(ys) == min(v for _, v in points) and max(ys) == max(v for _, v in points)
        assert all(lookup[x] == y for x, y in zip(xs, ys, strict=True))
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
        if len(points) <= max_points:
            assert xs == [p[0] for p in points]  # a short series (the eval points) comes whole


def test_summary_stats_from_rollups_match_the_raw_points(client: TestClient) -> None:
    from app.services.series import get_cache, get_rollup_cache, series_stats

    job_id = _job()
    _log(job_id, range(1, 1501), np.random.default_rng(3))
    from_rollups = series_stats(Session(__import__("app.core.db", fromlist=["x"]).get_engine()), job_id)
    get_cache().clear()
    get_rollup_cache().clear()
    raw = _raw(job_id)
    for key, stats in from_rollups.items():
        split, name = key.split(".", 1)
        values = [float(r[3][name]) for r in raw if r[2] == split and isinstance(r[3].get(name), float)]
        values = [v for v in values if math.isfinite(v)]
        assert stats == {
            "min": min(values),
            "max": max(values),
            "last": values[-1],
            "count": float(len(values)),
        }
    assert set(from_rollups) == {
        "train.loss",
        "train.learning_rate",
        "train.grad_norm",
        "eval.loss",
        "eval.accuracy",
    }


def test_a_resume_drops_the_blocks_of_replaced_points(client: TestClient, tmp_path: Any) -> None:
    from app.core.db import get_engine
    from app.core.models import Checkpoint, MetricRollup
    from app.core.storage import get_store
    from app.services import checkpoints
    from app.services.series import job_series
    from worker.resilience import prepare_resume

    job_id = _job()
    _log(job_id, range(1, 1001), np.random.default_rng(4))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    key = checkpoints.checkpoint_key(job_id, 500)
    get_store().put_dir(tmp_path / "ckpt", key)
    with Session(get_engine()) as session:
        before = job_series(session, job_id, 40)
        session.add(Checkpoint(job_id=job_id, step=500, storage_key=key))
        session.commit()
    prepare_resume(job_id, get_store(), tmp_path / "work")
    raw = _raw(job_id)
    with Session(get_engine()) as session:
        rollups = session.exec(select(MetricRollup).where(MetricRollup.job_id == job_id)).all()
        assert rollups and all(r.last_id <= raw[-1][0] for r in rollups)
        after = job_series(session, job_id, 40)
    assert before["points"] == 1010 and after["points"] == len(raw) == 505
    assert max(after["series"]["train.loss"]["x"]) == 500
