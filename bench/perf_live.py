"""Live-path benchmarks against a real studio (uvicorn + one Celery worker), embedded or Redis broker.

    python bench/perf_live.py embedded|redis [--jobs 5] [--steps 100] [--load-seconds 20] [--clients 100]

Measures, in one studio:
- submit → first training step: ``POST /api/v1/jobs`` until the worker logs step 1 (the first metric point's
  ``created_at``, written when the trainer logged it), after a warm-up job so the worker has the model cached;
- metric logged → received by an SSE client: a job logging every step, one ``/stream`` client; latency is
  the client's receive time minus the point's ``created_at`` (same machine, same clock);
- the API under load: ``bench/load_gen.py`` in a second process, ``--clients`` concurrent clients polling the
  job's detail and metrics for ``--load-seconds``.
With ``redis`` a private ``redis-server`` is started on a free port (no persistence) and used as the broker.
Prints one JSON line.
"""

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from tests.studio import free_port, run_studio, sst2_slice, wait_for_job  # noqa: E402


def created_at(data_dir: Path) -> dict[int, float]:
    """Metric point id → its created_at as a Unix time, read straight from the studio's SQLite database."""
    with sqlite3.connect(data_dir / "studio.db") as connection:
        rows = connection.execute("SELECT id, created_at FROM metricpoint").fetchall()
    return {int(i): datetime.fromisoformat(str(t)).replace(tzinfo=UTC).timestamp() for i, t in rows}


def first_point(data_dir: Path, job_id: int) -> float | None:
    with sqlite3.connect(data_dir / "studio.db") as connection:
        row = connection.execute(
            "SELECT created_at FROM metricpoint WHERE job_id = ? AND split = 'train' ORDER BY id LIMIT 1",
            (job_id,),
        ).fetchone()
    return datetime.fromisoformat(str(row[0])).replace(tzinfo=UTC).timestamp() if row else None


def percentiles(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    cuts = statistics.quantiles(ms, n=20) if len(ms) > 1 else [ms[0]] * 19
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(cuts[18], 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
    }


def job_spec(dataset_id: int, steps: int) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "validation_fraction": 0.0,
        "method": "lora",
        "training": {"max_steps": steps, "batch_size": 8, "logging_steps": 1, "max_length": 64},
    }


def stream_points(url: str, headers: dict[str, str], job_id: int, received: dict[int, float]) -> None:
    import httpx

    with httpx.Client(base_url=url, headers=headers, timeout=None) as http:
        with http.stream("GET", f"/api/v1/jobs/{job_id}/stream") as response:
            event = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                    if event == "end":
                        return
                elif line.startswith("data:") and event == "metric":
                    now = time.time()
                    received[int(json.loads(line.split(":", 1)[1])["id"])] = now


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("broker", choices=["embedded", "redis"])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=100)
    options = parser.parse_args()
    overrides: dict[str, str] = {}
    if os.environ.get("BENCH_THREADS"):
        overrides["PEFT_STUDIO_TORCH_THREADS"] = os.environ["BENCH_THREADS"]
    redis_process = None
    if options.broker == "redis":
        port = free_port()
        redis_process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        overrides["PEFT_STUDIO_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    result: dict[str, Any] = {"broker": options.broker}
    try:
        with (
            tempfile.TemporaryDirectory() as folder,
            run_studio(Path(folder) / "data", **overrides) as studio,
        ):
            api = studio.client(timeout=120)
            data = sst2_slice(Path(folder) / "slice.csv", 64)
            upload = api.post("/api/v1/datasets", files={"file": ("sst2.csv", data.read_bytes())})
            upload.raise_for_status()
            dataset_id = upload.json()["id"]
            warm = api.post("/api/v1/jobs", json=job_spec(dataset_id, 2)).json()  # the worker loads the model
            assert wait_for_job(api, warm["id"], timeout=300)["status"] == "succeeded"
            first_steps = []
            for _ in range(options.jobs):
                submitted = time.time()
                job = api.post("/api/v1/jobs", json=job_spec(dataset_id, 2)).json()
                done = wait_for_job(api, job["id"], timeout=300)
                assert done["status"] == "succeeded", done
                first = first_point(studio.data_dir, job["id"])
                if first is not None:
                    first_steps.append(first - submitted)
            result["submit_to_first_step"] = percentiles(first_steps)
            job = api.post("/api/v1/jobs", json=job_spec(dataset_id, options.steps)).json()
            received: dict[int, float] = {}
            reader = threading.Thread(
                target=stream_points, args=(studio.url, studio.headers, job["id"], received)
            )
            reader.start()
            reader.join(timeout=600)
            logged = created_at(studio.data_dir)
            result["sse_latency"] = percentiles([received[i] - logged[i] for i in received if i in logged])
            load = subprocess.run(
                [
                    sys.executable,
                    str(PROJECT_ROOT / "bench" / "load_gen.py"),
                    studio.url,
                    studio.token,
                    str(job["id"]),
                    "--clients",
                    str(options.clients),
                    "--seconds",
                    str(options.load_seconds),
                ],
                capture_output=True,
                text=True,
                timeout=options.load_seconds + 120,
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
            )
            line = next((x for x in load.stdout.splitlines() if x.startswith("RESULT ")), None)
            result["api_load"] = json.loads(line[7:]) if line else {"error": load.stderr[-2000:]}
            result["metric_points"] = len(api.get(f"/api/v1/jobs/{job['id']}/metrics").json())
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
