"""Dashboard benchmark: serving the chart series of a 1,000,000-point run, and loading the compare view of 10 jobs.

Runs the real app in-process (FastAPI over ASGI, through Starlette's TestClient) on a fresh SQLite database in a
temporary folder. Points are inserted with one executemany (not through the API). Measured:

- series, cold: the first ``GET /api/v1/jobs/{id}/series?max_points=2000`` of a process (reads and parses every
  row once into the series cache);
- series, warm: the same request again (median of several): the cache is current, so one primary-key look-up,
  one empty range scan, and numpy downsampling of 1M values per series;
- series, live: the same while the run logs 100 new points between requests (only those are read);
- compare view of 10 jobs x 10,000 points: the page's HTML, ``/api/v1/compare`` and ten ``/series`` requests,
  as the browser makes them (sequentially here), cold and warm.

Points get the roll-up blocks the metric writer would have written beside them (app/core/rollups.py, built from
the same rows after the insert); code without roll-ups (``--app-root`` of an older tree) gets the points only.

Prints a table, then one JSON line with every number (bench/run_all.py reads the last line).
Usage: ``python bench/dashboard.py [--points 1000000] [--repeats 9] [--app-root DIR] [--database-url URL]``
(``--app-root``: measure the app of another checkout, e.g. a worktree of main as the baseline;
``--database-url``: a fresh, empty Postgres database instead of SQLite).
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("BENCH_APP_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))
TOKEN = "pst_bench-dashboard-token-0000000000"


def _insert_points(job_id: int, points: int, start_step: int = 1, eval_every: int = 1000) -> None:
    """Train points (loss, lr, grad norm, samples/s, memory) with an eval point every ``eval_every`` steps, and
    (when the app has them) the roll-up blocks the metric writer keeps beside them."""
    import sqlalchemy as sa

    from app.core.db import get_engine
    from app.core.models import MetricPoint

    created = datetime(2026, 11, 26, 4, 0, 0, tzinfo=UTC)
    rng = random.Random(job_id)
    loss = 2.5
    rows: list[dict[str, Any]] = []
    for step in range(start_step, start_step + points):
        loss = max(0.05, loss * 0.99999 + rng.gauss(0, 0.01))
        values = {
            "loss": round(loss, 6),
            "learning_rate": 5e-4 * (1 - step / (start_step + points)),
            "grad_norm": abs(rng.gauss(1, 0.3)),
            "samples_per_second": 30 + rng.random(),
            "peak_rss_mb": 900.0 + step / 10_000,
        }
        rows.append(
            {"job_id": job_id, "step": step, "split": "train", "values": values, "created_at": created}
        )
        if eval_every and step % eval_every == 0:
            evaluation = {"loss": loss, "accuracy": rng.random()}
            rows.append(
                {"job_id": job_id, "step": step, "split": "eval", "values": evaluation, "created_at": created}
            )
    table = MetricPoint.__table__  # type: ignore[attr-defined]
    engine = get_engine()
    # Raw DBAPI executemany with the JSON encoded up front: the insert is set-up, not what is measured.
    marker = "?" if engine.dialect.name == "sqlite" else "%s"
    sql = (
        f'INSERT INTO metricpoint (job_id, step, split, "values", created_at, attempt) '
        f"VALUES ({', '.join([marker] * 6)})"
    )
    stamp = created if engine.dialect.name != "sqlite" else created.strftime("%Y-%m-%d %H:%M:%S.%f")
    with engine.begin() as connection:
        newest = connection.execute(
            sa.select(sa.func.max(table.c.id)).where(table.c.job_id == job_id)
        ).scalar()
        encoded = [(job_id, r["step"], r["split"], json.dumps(r["values"]), stamp, 0) for r in rows]
        for start in range(0, len(encoded), 50_000):
            connection.exec_driver_sql(sql, encoded[start : start + 50_000])
        ids = (
            connection.execute(
                sa.select(table.c.id)
                .where(table.c.job_id == job_id, table.c.id > (newest or 0))
                .order_by(table.c.id)
            )
            .scalars()
            .all()
        )
    try:
        from app.core.models import MetricRollup
        from app.core.rollups import RawPoint, RollupBuilder
    except ImportError:  # an app from before roll-ups: points only
        return
    builder = _builders.setdefault(job_id, RollupBuilder())
    blocks = builder.add(
        RawPoint(int(i), row["step"], row["split"], row["values"]) for i, row in zip(ids, rows, strict=True)
    )
    if blocks:
        with engine.begin() as connection:
            connection.execute(sa.insert(MetricRollup.__table__), [b.row(job_id) for b in blocks])  # type: ignore[attr-defined]


_builders: dict[int, Any] = {}


def _timed(call: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return (time.perf_counter() - start) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="train points of the big run")
    parser.add_argument("--repeats", type=int, default=9, help="timed requests per warm measurement")
    parser.add_argument("--compare-jobs", type=int, default=10)
    parser.add_argument("--compare-points", type=int, default=10_000)
    parser.add_argument("--app-root", help="the checkout whose app is measured (default: this one)")
    parser.add_argument("--database-url", help="an empty database (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    if args.app_root:  # re-run this script against another checkout's app (its own imports, its migrations)
        env = {**os.environ, "BENCH_APP_ROOT": args.app_root, "PYTHONPATH": args.app_root}
        argv = [a for a in sys.argv[1:] if a != args.app_root and a != "--app-root"]
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)

    data_dir = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    os.environ["PEFT_STUDIO_DATA_DIR"] = str(data_dir)
    os.environ["PEFT_STUDIO_ADMIN_TOKEN"] = TOKEN
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.database_url:
        os.environ["PEFT_STUDIO_DATABASE_URL"] = args.database_url
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job, JobStatus
    from app.main import create_app

    results: dict[str, Any] = {"bench": "dashboard", "points": args.points, "app_root": str(ROOT)}
    with TestClient(create_app(), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        with Session(get_engine()) as session:
            jobs = [
                Job(
                    name=f"bench {i}",
                    spec={
                        "task": "sequence-classification",
                        "method": "lora",
                        "training": {"learning_rate": 1e-4 * (i + 1)},
                    },
                    method="lora",
                    base_model="m",
                    status=JobStatus.succeeded,
                )
                for i in range(1 + args.compare_jobs)
            ]
            session.add_all(jobs)
            session.commit()
            ids = [job.id for job in jobs]
        big, compared = ids[0], ids[1:]

        t0 = time.perf_counter()
        _insert_points(big, args.points)
        for job_id in compared:
            _insert_points(job_id, args.compare_points, eval_every=100)
        results["insert_seconds"] = round(time.perf_counter() - t0, 1)

        url = f"/api/v1/jobs/{big}/series?max_points=2000"
        cold, response = _timed(lambda: client.get(url))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["series"]["train.loss"]["total"] == args.points
        assert all(len(s["y"]) <= 2000 for s in body["series"].values())
        warm = [_timed(lambda: client.get(url))[0] for _ in range(args.repeats)]
        live = []
        next_step = args.points + 1
        for _ in range(args.repeats):
            _insert_points(big, 100, start_step=next_step, eval_every=0)
            next_step += 100
            elapsed, response = _timed(lambda: client.get(url))
            live.append(elapsed)
        assert response.json()["series"]["train.loss"]["total"] == next_step - 1
        results.update(
            series_cold_ms=round(cold, 1),
            series_warm_median_ms=round(statistics.median(warm), 1),
            series_live_median_ms=round(statistics.median(live), 1),
            series_bytes=len(response.content),
            series_count=len(body["series"]),
        )

        joined = ",".join(map(str, compared))

        def load_compare() -> None:
            assert client.get(f"/compare?jobs={joined}", headers={"Accept": "text/html"}).status_code == 200
            assert client.get(f"/api/v1/compare?jobs={joined}").status_code == 200
            for job_id in compared:
                assert client.get(f"/api/v1/jobs/{job_id}/series?max_points=1000").status_code == 200

        compare_cold, _ = _timed(load_compare)
        compare_warm = [_timed(load_compare)[0] for _ in range(args.repeats)]
        results.update(
            compare_jobs=len(compared),
            compare_points_per_job=args.compare_points,
            compare_cold_ms=round(compare_cold, 1),
            compare_warm_median_ms=round(statistics.median(compare_warm), 1),
        )

    print(f"series of a {args.points:,}-point run (max_points=2000, {results['series_count']} series):")
    print(f"  cold (first request, fills the cache)  {results['series_cold_ms']:>9.1f} ms")
    print(f"  warm (median of {args.repeats})                  {results['series_warm_median_ms']:>9.1f} ms")
    print(f"  live, +100 points per request (median) {results['series_live_median_ms']:>9.1f} ms")
    print(
        f"compare view, {len(compared)} jobs x {args.compare_points:,} points (HTML + summary + 10 series):"
    )
    print(f"  cold                                   {results['compare_cold_ms']:>9.1f} ms")
    print(f"  warm (median of {args.repeats})                  {results['compare_warm_median_ms']:>9.1f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
