"""A load generator for a running studio: N concurrent clients polling a job's detail and metrics.

    python bench/load_gen.py URL TOKEN JOB_ID [--clients 100] [--seconds 20] [--think 1.0] [--etag]

Each client, in a loop until the time is up: GET /api/v1/jobs/{id}, then GET /api/v1/jobs/{id}/metrics, then
waits ``--think`` seconds (what an open job page does). Loopback only; bounded in time. Clients start spread
over the first think interval. With ``--etag`` each client keeps what it got, as a browser's HTTP cache does,
and asks again with ``If-None-Match`` (a 304 counts as a success; a server without ETags answers 200 as before).
Prints one JSON line: request count, errors, 304s, latency percentiles (ms).
"""

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


async def client(
    http: httpx.AsyncClient,
    job_id: int,
    deadline: float,
    think: float,
    latencies: list[float],
    errors: list[str],
    etag: bool = False,
    not_modified: list[int] | None = None,
) -> None:
    await asyncio.sleep(random.uniform(0, think))
    tags: dict[str, str] = {}
    while time.monotonic() < deadline:
        for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/metrics"):
            started = time.perf_counter()
            try:
                headers = {"If-None-Match": tags[path]} if etag and path in tags else {}
                response = await http.get(path, headers=headers)
                if response.status_code == 304 and path in tags:
                    if not_modified is not None:
                        not_modified.append(1)
                elif response.status_code != 200:
                    errors.append(f"{path}: {response.status_code}")
                else:
                    response.json()
                    if "etag" in response.headers:
                        tags[path] = response.headers["etag"]
            except httpx.HTTPError as error:
                errors.append(f"{path}: {type(error).__name__}")
            latencies.append(time.perf_counter() - started)
        await asyncio.sleep(think)


async def run(
    url: str, token: str, job_id: int, clients: int, seconds: float, think: float, etag: bool = False
) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    not_modified: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30, limits=limits
    ) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                client(http, job_id, deadline, think, latencies, errors, etag, not_modified)
                for _ in range(clients)
            )
        )
    ms = sorted(v * 1000 for v in latencies)
    cuts = statistics.quantiles(ms, n=100) if len(ms) > 1 else [ms[0]] * 99
    return {
        "clients": clients,
        "seconds": seconds,
        "think_s": think,
        "requests": len(ms),
        "requests_per_second": round(len(ms) / seconds, 1),
        "errors": len(errors),
        "not_modified": len(not_modified),
        "error_sample": errors[:5],
        "p50_ms": round(cuts[49], 2),
        "p95_ms": round(cuts[94], 2),
        "p99_ms": round(cuts[98], 2),
        "max_ms": round(ms[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--think", type=float, default=1.0)
    parser.add_argument(
        "--etag", action="store_true", help="revalidate with If-None-Match, as a browser does"
    )
    options = parser.parse_args()
    result = asyncio.run(
        run(
            options.url,
            options.token,
            options.job_id,
            options.clients,
            options.seconds,
            options.think,
            options.etag,
        )
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
