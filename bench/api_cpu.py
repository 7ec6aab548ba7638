"""CPU time per API request of one web app, in process (``time.process_time``, so a busy machine slows it down
but does not inflate it the way wall-clock latency under load is inflated).

    python bench/api_cpu.py [--app-root DIR] [--requests 300] [--points 200]

A queued job with ``--points`` metric points; ``--requests`` sequential requests each of job detail, metrics,
and (when the app sends an ETag) the same two with ``If-None-Match``, through Starlette's TestClient with the
admin's Bearer token (auth included). Prints one JSON line: CPU ms per request of each kind.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("BENCH_APP_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))
TOKEN = "pst_bench-api-cpu-token-00000000000000"
CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-root")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--points", type=int, default=200)
    args = parser.parse_args()
    if args.app_root:
        env = {**os.environ, "BENCH_APP_ROOT": args.app_root, "PYTHONPATH": args.app_root}
        argv = [a for a in sys.argv[1:] if a not in (args.app_root, "--app-root")]
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    os.environ["PEFT_STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-api-cpu-")
    os.environ["PEFT_STUDIO_ADMIN_TOKEN"] = TOKEN
    os.environ["PEFT_STUDIO_REAPER_INTERVAL_SECONDS"] = "0"
    os.environ["PEFT_STUDIO_WEBHOOK_POLL_SECONDS"] = "0"
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import MetricPoint
    from app.main import create_app

    out: dict[str, object] = {"app_root": str(ROOT)}
    with TestClient(create_app(), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        dataset = client.post("/api/v1/datasets", files={"file": ("b.csv", CSV)}).json()["id"]
        job_id = client.post(
            "/api/v1/jobs", json={"dataset_id": dataset, "training": {"max_steps": 10}}
        ).json()["id"]
        with Session(get_engine()) as session:
            for step in range(1, args.points + 1):
                session.add(MetricPoint(job_id=job_id, step=step, split="train", values={"loss": 1 / step}))
            session.commit()
        for name, path in (
            ("detail", f"/api/v1/jobs/{job_id}"),
            ("metrics", f"/api/v1/jobs/{job_id}/metrics"),
        ):
            first = client.get(path)
            tag = first.headers.get("etag")
            for label, headers in ((name, {}), (f"{name}_304", {"If-None-Match": tag} if tag else None)):
                if headers is None:
                    continue
                started, wall = time.process_time(), time.perf_counter()
                for _ in range(args.requests):
                    client.get(path, headers=headers)
                out[f"{label}_cpu_ms"] = round((time.process_time() - started) / args.requests * 1000, 2)
                out[f"{label}_wall_ms"] = round((time.perf_counter() - wall) / args.requests * 1000, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
