"""The web tier at team scale (issue 20), before and after in one run: this checkout against a baseline checkout.

    python bench/web_tier.py --baseline /tmp/base20 [--backends embedded,postgres] [--skip series]

The baseline is another checkout of the code (for issue 20: ``git worktree add --detach /tmp/base20 <main>``); both
run from this checkout's virtual environment, each with its own ``app`` (``PYTHONPATH``) and migrations, on fresh
databases. Backends: ``embedded`` (SQLite + the SQLite broker) and ``postgres`` (Postgres + Redis on 127.0.0.1).

Measured, for each code and backend, against one web process (uvicorn, no training worker: the bench writes the
metric points itself, as the worker's writer does, and publishes the Redis news the worker would):

- **idle SSE**: ``--clients`` (100) streams open on a queued job; the web process's CPU time over 10 s, as % of
  a core;
- **live SSE**: the job then logs a point every 100 ms for 8 s; metric logged → received, p95 over every point at
  every client; errors; with Postgres + Redis also ``--big-clients`` (1,000) streams (``ulimit -n`` raised);
- **API under load**: ``bench/load_gen.py`` (100 clients each polling job detail + metrics once a second, as a
  browser with its HTTP cache: ``If-None-Match``), with 1 web process and, for this checkout, ``--web-workers``;
- **series**: ``bench/dashboard.py`` (1M-point run cold / warm, compare of 10 × 10,000 points) for both codes.

SSE clients run in separate processes (``--client-procs``) so their parsing does not count as the server's
latency. Prints a table of before/after ratios and, last, one JSON line. Record the load average beside it: the
CPU measurements are only comparable within one run on a shared machine.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

THIS_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "pst_bench-web-tier-token-000000000000"
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379"
CONNECT_SPREAD_SECONDS = 5.0
CSV = b"text,label\ngood movie,pos\nbad movie,neg\nlovely film,pos\nawful film,neg\ngreat,pos\npoor,neg\n"


def raise_nofile() -> None:
    """As many open files as the hard limit allows (1,000 streams need more than the usual 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn's worker processes)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class Backend:
    """A fresh database (and broker) for one measurement."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder = kind, folder
        self.env: dict[str, str] = {}
        self.db_name = ""
        self.redis_db = 0
        if kind == "postgres":
            import sqlalchemy as sa

            self.db_name = f"bench_web_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{self.db_name}"')
            admin.dispose()
            self.redis_db = 1 + uuid.uuid4().int % 14
            import redis

            redis.Redis.from_url(f"{REDIS}/{self.redis_db}").flushdb()
            self.env = {
                "PEFT_STUDIO_DATABASE_URL": f"{POSTGRES_ADMIN.rsplit('/', 1)[0]}/{self.db_name}",
                "PEFT_STUDIO_BROKER_URL": f"{REDIS}/{self.redis_db}",
            }

    @property
    def database_url(self) -> str:
        return self.env.get("PEFT_STUDIO_DATABASE_URL") or f"sqlite:///{self.folder / 'data' / 'studio.db'}"

    def drop(self) -> None:
        if self.kind == "postgres":
            import sqlalchemy as sa

            admin = sa.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            admin.dispose()


class Web:
    """One uvicorn web app (``processes`` workers) of a checkout on a backend."""

    def __init__(self, root: Path, backend: Backend, processes: int = 1) -> None:
        self.root, self.backend = root, backend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = backend.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_STUDIO_")}
        env.update(
            PYTHONPATH=str(root),
            PEFT_STUDIO_DATA_DIR=str(data),
            PEFT_STUDIO_ADMIN_TOKEN=TOKEN,
            HF_HUB_OFFLINE="1",
            **backend.env,
        )
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            # as `peft-studio serve` runs it (app/cli.py), for both codes: idle connections outlive the client's
            "--timeout-keep-alive",
            "65",
        ]
        if processes > 1:
            args += ["--workers", str(processes)]
        self.log = (backend.folder / "web.log").open("ab")
        self.process = subprocess.Popen(
            args, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile
        )
        import httpx

        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, (backend.folder / "web.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "web did not start"
            time.sleep(0.3)
        time.sleep(2 if processes > 1 else 0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


def make_job(web: Web) -> int:
    """A dataset and a queued job through the API (the job waits: no training worker runs)."""
    import httpx

    with httpx.Client(base_url=web.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as api:
        upload = api.post("/api/v1/datasets", files={"file": ("bench.csv", CSV)})
        upload.raise_for_status()
        job = api.post(
            "/api/v1/jobs", json={"dataset_id": upload.json()["id"], "training": {"max_steps": 10}}
        )
        job.raise_for_status()
        return int(job.json()["id"])


class Points:
    """Writes metric points as the worker's writer does (one row, one commit) and publishes the Redis news."""

    def __init__(self, backend: Backend, job_id: int) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(backend.database_url)
        self.job_id = job_id
        self.redis: Any = None
        if backend.kind == "postgres":
            import redis

            self.redis = redis.Redis.from_url(f"{REDIS}/{backend.redis_db}")
        self.step = 0
        self.logged: dict[int, float] = {}

    def status(self, status: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                self.sa.text("UPDATE job SET status = :s WHERE id = :i"), {"s": status, "i": self.job_id}
            )
        if self.redis is not None:
            self.redis.publish(f"training:job:{self.job_id}", json.dumps({"kind": "status", "last_id": None}))

    def log(self, count: int = 1) -> None:
        rows = []
        for _ in range(count):
            self.step += 1
            rows.append({"j": self.job_id, "s": self.step, "v": json.dumps({"loss": 1.0 / self.step})})
        with self.engine.begin() as connection:
            now = time.time()
            ids = [
                connection.execute(
                    self.sa.text(
                        'INSERT INTO metricpoint (job_id, step, split, "values", created_at, attempt) '
                        "VALUES (:j, :s, 'train', :v, CURRENT_TIMESTAMP, 1) RETURNING id"
                    ),
                    row,
                ).scalar_one()
                for row in rows
            ]
        for point_id in ids:
            self.logged[int(point_id)] = now
        if self.redis is not None:
            self.redis.publish(
                f"training:job:{self.job_id}", json.dumps({"kind": "metric", "last_id": ids[-1]})
            )

    def close(self) -> None:
        self.engine.dispose()


# ---- SSE clients, in their own processes ---------------------------------------------------------------------


async def _client(url: str, job_id: int, received: dict[int, float], state: dict[str, int]) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    await asyncio.sleep(
        random.uniform(0, CONNECT_SPREAD_SECONDS)
    )  # people open a page over seconds, not at once
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=60)) as http:
            async with http.stream("GET", f"{url}/api/v1/jobs/{job_id}/stream", headers=headers) as response:
                if response.status_code != 200:
                    state["errors"] += 1
                    return
                state["connected"] += 1
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        if event == "end":
                            state["ended"] += 1
                            return
                    elif line.startswith("data:") and event == "metric":
                        received[int(json.loads(line[5:])["id"])] = time.time()
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - counted, the bench goes on
        state["errors"] += 1


async def _clients_main(url: str, job_id: int, count: int) -> None:
    raise_nofile()
    state = {"connected": 0, "ended": 0, "errors": 0}
    received: list[dict[int, float]] = [{} for _ in range(count)]
    tasks = [asyncio.create_task(_client(url, job_id, received[i], state)) for i in range(count)]
    while state["connected"] + state["errors"] < count:
        await asyncio.sleep(0.1)
    print("READY", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    print("RESULT " + json.dumps({"state": state, "received": received}), flush=True)


def sse_run(web: Web, backend: Backend, clients: int, procs: int) -> dict[str, Any]:
    """Idle CPU with ``clients`` streams open, then latency of live points; the job ends the streams."""
    job_id = make_job(web)
    points = Points(backend, job_id)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "_clients", web.url, str(job_id), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=raise_nofile,
        )
        for n in per
        if n
    ]
    outputs: list[list[str]] = []
    readers = []
    for child in children:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("READY"), line
        # The rest is read on a thread through the same buffered file (communicate() would read the raw pipe
        # and lose what readline already buffered).
        outputs.append([])
        reader = threading.Thread(
            target=lambda c=child, o=outputs[-1]: o.append(c.stdout.read()), daemon=True
        )
        reader.start()
        readers.append(reader)
    time.sleep(2)  # connections settle
    before, started = cpu_seconds(web.process.pid), time.monotonic()
    time.sleep(10)
    idle = (cpu_seconds(web.process.pid) - before) / (time.monotonic() - started) * 100
    points.status("running")
    before, started = cpu_seconds(web.process.pid), time.monotonic()
    for _ in range(80):
        points.log()
        time.sleep(0.1)
    live_cpu = (cpu_seconds(web.process.pid) - before) / (time.monotonic() - started) * 100
    time.sleep(3)
    points.status("succeeded")
    latencies: list[float] = []
    state = {"connected": 0, "ended": 0, "errors": 0, "missing": 0}
    for child, reader, output in zip(children, readers, outputs, strict=True):
        reader.join(timeout=300)
        child.wait(timeout=30)
        assert child.stderr is not None
        out, err = "".join(output), child.stderr.read()
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(
                f"an SSE client process gave no result (exit {child.returncode}): {err[-800:]}"
            )
        result = json.loads(line[7:])
        for name in ("connected", "ended", "errors"):
            state[name] += result["state"][name]
        for got in result["received"]:
            got = {int(k): v for k, v in got.items()}
            state["missing"] += sum(1 for point_id in points.logged if point_id not in got)
            latencies += [got[i] - t for i, t in points.logged.items() if i in got]
    points.close()
    ms = sorted(v * 1000 for v in latencies)
    cuts = statistics.quantiles(ms, n=20) if len(ms) > 1 else [float("nan")] * 19
    return {
        "clients": clients,
        "idle_cpu_percent": round(idle, 1),
        "live_cpu_percent": round(live_cpu, 1),
        "latency_median_ms": round(statistics.median(ms), 1) if ms else None,
        "latency_p95_ms": round(cuts[18], 1),
        "points": len(points.logged),
        **state,
    }


def load_run(web: Web, backend: Backend, seconds: float) -> dict[str, Any]:
    """bench/load_gen.py: 100 clients polling job detail + metrics once a second (with If-None-Match)."""
    job_id = make_job(web)
    points = Points(backend, job_id)
    points.log(200)
    points.close()
    out = subprocess.run(
        [
            sys.executable,
            str(THIS_ROOT / "bench" / "load_gen.py"),
            web.url,
            TOKEN,
            str(job_id),
            "--clients",
            "100",
            "--seconds",
            str(seconds),
            "--etag",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 180,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": out.stderr[-1500:]}


def series_run(root: Path, backend: Backend, points: int) -> dict[str, Any]:
    """bench/dashboard.py (this checkout's script) against ``root``'s app."""
    args = [
        sys.executable,
        str(THIS_ROOT / "bench" / "dashboard.py"),
        "--points",
        str(points),
        "--repeats",
        "5",
    ]
    args += ["--app-root", str(root)]
    if backend.kind == "postgres":
        args += ["--database-url", backend.database_url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": (out.stdout + out.stderr)[-1500:]}


def ratio(before: Any, after: Any) -> str:
    try:
        return f"{float(before) / float(after):.1f}x"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        asyncio.run(_clients_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="the checkout measured as 'before'")
    parser.add_argument("--backends", default="embedded,postgres")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--big-clients", type=int, default=1000)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--series-points", type=int, default=1_000_000)
    parser.add_argument("--skip", default="", help="comma-separated: sse, big, load, series")
    parser.add_argument("--codes", default="before,after", help="which of the two to measure")
    options = parser.parse_args()
    raise_nofile()
    skip = set(options.skip.split(","))
    codes = {"before": Path(options.baseline).resolve(), "after": THIS_ROOT}
    codes = {label: root for label, root in codes.items() if label in options.codes.split(",")}
    results: dict[str, Any] = {"load_average_start": list(os.getloadavg()), "cpus": os.cpu_count()}
    for kind in options.backends.split(","):
        for label, root in codes.items():
            runs: list[tuple[str, Any]] = []
            if "sse" not in skip:
                runs.append(
                    ("sse", lambda web, backend: sse_run(web, backend, options.clients, options.client_procs))
                )
            if "big" not in skip and kind == "postgres":
                runs.append(
                    (
                        "sse_big",
                        lambda web, backend: sse_run(web, backend, options.big_clients, options.client_procs),
                    )
                )
            if "load" not in skip:
                runs.append(("load_1", lambda web, backend: load_run(web, backend, options.load_seconds)))
            for name, run in runs:
                with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
                    backend = Backend(kind, Path(folder))
                    web = Web(root, backend)
                    try:
                        results[f"{kind}.{label}.{name}"] = run(web, backend)
                    except Exception as error:  # noqa: BLE001 - record and go on
                        results[f"{kind}.{label}.{name}"] = {"error": repr(error)[:500]}
                    finally:
                        web.stop()
                        backend.drop()
                print(f"{kind} {label} {name}: {json.dumps(results[f'{kind}.{label}.{name}'])}", flush=True)
            if "load" not in skip and label == "after" and options.web_workers > 1:
                with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
                    backend = Backend(kind, Path(folder))
                    web = Web(root, backend, processes=options.web_workers)
                    try:
                        results[f"{kind}.after.load_{options.web_workers}"] = load_run(
                            web, backend, options.load_seconds
                        )
                    finally:
                        web.stop()
                        backend.drop()
                print(
                    f"{kind} after load_{options.web_workers}: {results[f'{kind}.after.load_{options.web_workers}']}"
                )
            if "big" not in skip and kind == "postgres" and label == "after" and options.web_workers > 1:
                # 1,000 viewers spread over --web-workers processes (each process's reader fans out to its own)
                name = f"sse_big_{options.web_workers}"
                with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
                    backend = Backend(kind, Path(folder))
                    web = Web(root, backend, processes=options.web_workers)
                    try:
                        results[f"{kind}.after.{name}"] = sse_run(
                            web, backend, options.big_clients, options.client_procs
                        )
                    except Exception as error:  # noqa: BLE001 - record and go on
                        results[f"{kind}.after.{name}"] = {"error": repr(error)[:500]}
                    finally:
                        web.stop()
                        backend.drop()
                print(f"{kind} after {name}: {json.dumps(results[f'{kind}.after.{name}'])}", flush=True)
            if "series" not in skip:
                with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
                    backend = Backend(kind, Path(folder))
                    try:
                        results[f"{kind}.{label}.series"] = series_run(root, backend, options.series_points)
                    finally:
                        backend.drop()
                print(f"{kind} {label} series: {json.dumps(results[f'{kind}.{label}.series'])}", flush=True)
    results["load_average_end"] = list(os.getloadavg())
    print()
    rows = [
        ("sse", "idle_cpu_percent", "SSE idle, web CPU % of a core"),
        ("sse", "latency_p95_ms", "SSE logged → received p95 ms"),
        ("sse_big", "idle_cpu_percent", "1,000 SSE idle, web CPU %"),
        ("sse_big", "latency_p95_ms", "1,000 SSE p95 ms"),
        ("load_1", "p99_ms", "API load p99 ms (1 web process)"),
        ("series", "series_cold_ms", "series 1M cold ms"),
        ("series", "series_warm_median_ms", "series 1M warm ms"),
        ("series", "compare_cold_ms", "compare 10×10k cold ms"),
    ]
    for kind in options.backends.split(","):
        for run, field, title in rows:
            before = results.get(f"{kind}.before.{run}", {}).get(field)
            after = results.get(f"{kind}.after.{run}", {}).get(field)
            if before is None and after is None:
                continue
            print(
                f"{kind:9} {title:40} before {before!s:>10}  after {after!s:>10}  ratio {ratio(before, after)}"
            )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
