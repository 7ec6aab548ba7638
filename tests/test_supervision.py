"""``serve`` supervises its worker (issue 15), with real processes and real signals.

- kill -9 the worker of a running ``serve``: a new worker (new pid, new name) appears on /api/v1/workers, the
  dead one is reaped (no zombie), and a job submitted afterwards runs.
- kill -9 ``serve``: its worker exits (polled, no timing asserted); a new ``serve`` on the same data folder
  names its worker differently.
- The supervisor itself on stand-in processes: restart with back-off, reaping, parent-death signal.
- A job held by a worker that still heartbeats is not requeued by a newly started worker of the same name.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from app.supervisor import FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS, WorkerSupervisor, next_backoff
from tests.factories import create_dataset, create_job, sst2_bytes
from tests.studio import PROJECT_ROOT, RunningStudio, run_studio, studio_env, wait_for_job

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def gone(pid: int) -> bool:
    """True when the process no longer runs: no such pid, or a zombie nobody reaped (not running either)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def poll(predicate: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] = str) -> Any:
    """The first truthy value of ``predicate()``, polled every 0.2 s for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.2)


def live_workers(studio: RunningStudio) -> list[dict[str, Any]]:
    with studio.client(timeout=30) as http:
        return list(http.get("/api/v1/workers").json()["data"])


FAST = {"PEFT_STUDIO_WORKER_HEARTBEAT_SECONDS": "1", "PEFT_STUDIO_TORCH_THREADS": "1"}


# ---- the real serve ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_killed_worker_is_replaced_and_the_next_job_runs(tmp_path: Path) -> None:
    with run_studio(tmp_path / "data", **FAST) as studio:
        # given the serve's worker, connected
        (first,) = poll(lambda: live_workers(studio), 120, "the first worker", studio.log)
        assert first["name"].startswith("worker1-")

        # when it is killed with SIGKILL
        os.kill(first["pid"], signal.SIGKILL)

        # then serve reaps it and starts another: new pid, new name, on the workers list
        def replaced() -> list[dict[str, Any]]:
            return [w for w in live_workers(studio) if w["pid"] != first["pid"]]

        (second,) = poll(replaced, 120, "a replacement worker", studio.log)
        assert second["name"] != first["name"] and second["name"].startswith("worker1-")
        assert gone(first["pid"])
        assert not os.path.exists(f"/proc/{first['pid']}"), "the killed worker stays a zombie"
        assert "starting another in 1 s" in studio.log()

        # and a job submitted afterwards runs on it
        with studio.client() as http:
            dataset = http.post("/api/v1/datasets", files={"file": ("d.csv", sst2_bytes(40))})
            assert dataset.status_code == 201, dataset.text
            spec = {
                "dataset_id": dataset.json()["id"],
                "method_config": {"r": 2},
                "training": {"max_steps": 2, "batch_size": 8, "max_length": 32},
            }
            job = http.post("/api/v1/jobs", json=spec)
            assert job.status_code == 201, job.text
            done = wait_for_job(http, job.json()["id"], timeout=300)
        assert done["status"] == "succeeded", (done["error"], studio.log()[-3000:])
        assert done["worker"] == second["name"]


@pytest.mark.e2e
def test_killing_serve_ends_its_worker_and_a_new_serve_names_its_own(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with run_studio(data_dir, **FAST) as first:
        (worker,) = poll(lambda: live_workers(first), 120, "the worker", first.log)

        # when serve is killed with SIGKILL (it cannot stop its worker itself)
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)

        # then its worker exits too
        poll(lambda: gone(worker["pid"]), 60, "the orphaned worker to exit", first.log)

        # and a new serve on the same data folder runs one worker, under a name of its own
        with run_studio(data_dir, **FAST) as second:

            def new_worker() -> list[dict[str, Any]]:
                return [w for w in live_workers(second) if w["pid"] != worker["pid"]]

            (replacement,) = poll(new_worker, 120, "the new serve's worker", second.log)
            assert replacement["name"] != worker["name"]
            # and the killed serve's worker drops off the live list once three heartbeats are missed
            poll(lambda: [w["name"] for w in live_workers(second)] == [replacement["name"]], 60,
                 "only the new worker to be listed", second.log)  # fmt: skip


# ---- the supervisor on stand-in processes ------------------------------------------------------


def test_backoff_doubles_to_a_minute() -> None:
    waits = [FIRST_BACKOFF_SECONDS]
    for _ in range(8):
        waits.append(next_backoff(waits[-1]))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60] and MAX_BACKOFF_SECONDS == 60


def test_the_supervisor_reaps_and_restarts_with_backoff_and_stops_its_workers() -> None:
    now = [1000.0]
    names: list[str] = []

    def command(name: str) -> list[str]:
        names.append(name)
        return SLEEPER

    supervisor = WorkerSupervisor(2, command, clock=lambda: now[0])
    supervisor.check()  # starts both (driven by hand here; serve runs check() from its thread)
    first_pids = supervisor.pids()
    assert len(first_pids) == 2 and len(set(names)) == 2
    try:
        # when one dies at once: it is reaped and restarted after 1 s, then 2 s, ...
        victim = supervisor.slots[0]
        for expected_wait in (1.0, 2.0, 4.0):
            pid = victim.process.pid if victim.process else 0
            os.kill(pid, signal.SIGKILL)
            poll(
                lambda victim=victim: victim.process is not None and victim.process.poll() is not None,
                10,
                "death",
            )
            supervisor.check()
            assert victim.process is None and gone(pid) and not os.path.exists(f"/proc/{pid}")
            now[0] += expected_wait - 0.1
            supervisor.check()
            assert victim.process is None  # still waiting
            now[0] += 0.2
            supervisor.check()
            assert victim.process is not None and victim.process.pid != pid
        # after a minute of good health the back-off starts over
        now[0] += 61
        supervisor.check()
        assert victim.backoff == FIRST_BACKOFF_SECONDS and victim.restarts == 3
        assert supervisor.slots[1].process is not None and supervisor.slots[1].process.pid == first_pids[1]
        assert len(set(names)) == len(names) == 5  # every start got its own name
    finally:
        supervisor._stop_workers()
    assert all(gone(pid) for pid in supervisor.pids())


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    # given a stand-in serve: a process whose supervisor runs two workers (sleepers), printing their pids
    script = textwrap.dedent(
        f"""
        import sys, time
        from app.supervisor import WorkerSupervisor
        supervisor = WorkerSupervisor(2, lambda name: {SLEEPER!r}).start()
        print(*supervisor.pids(), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=studio_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(pid) for pid in pids)

        # when the parent is killed with SIGKILL
        parent.kill()
        parent.wait(timeout=30)

        # then the kernel ends its workers
        poll(lambda: all(gone(pid) for pid in pids), 30, "the workers to end")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_worker_watchdog_exits_when_its_parent_changes(tmp_path: Path) -> None:
    # the fallback where the kernel's parent-death signal is not available: a grandchild watches its parent
    child_script = tmp_path / "child.py"
    child_script.write_text(
        "import os, time\n"
        "from worker.tasks import watch_parent\n"
        "watch_parent(os.getppid(), interval=0.1)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent_script = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child_script)!r}], stdout=sys.stdout)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script],
        cwd=PROJECT_ROOT,
        env=studio_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait(timeout=30)
        poll(lambda: gone(child), 60, "the watched worker to exit")
    finally:
        if parent.poll() is None:
            parent.kill()


# ---- recovery never takes a job from a worker that still heartbeats ----------------------------


@pytest.fixture
def quick_heartbeats(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PEFT_STUDIO_HEARTBEAT_SECONDS", "0.2")
    yield


def test_a_job_held_by_a_heartbeating_worker_is_not_requeued_by_a_new_worker_of_the_same_name(
    quick_heartbeats: None, studio_settings: Path
) -> None:
    from app.core.db import get_engine
    from app.core.models import Job, JobStatus, utcnow
    from worker.resilience import Heartbeat
    from worker.tasks import _recover

    # given a job running on "worker1@host", whose holder (an orphan of an earlier serve) still heartbeats
    with Session(get_engine()) as session:
        dataset = create_dataset(session, sst2_bytes(20))
        job = create_job(session, dataset_id=dataset.id, training={"max_steps": 1})
        job.status, job.worker, job.run_token = JobStatus.running, "worker1@host", "held"
        job.started_at = job.heartbeat_at = utcnow()
        session.add(job)
        session.commit()
        job_id = job.id or 0
    heartbeat = Heartbeat(job_id, "held", interval=0.2).start()
    try:
        # when a new worker of the same name starts (what its worker_ready handler runs)
        _recover("worker1@host")

        # then the job stays with its holder
        with Session(get_engine()) as session:
            held = session.get(Job, job_id)
            assert held is not None and held.status == JobStatus.running and held.run_token == "held"
    finally:
        heartbeat.stop()

    # and once the holder is silent, the same start-up recovery requeues it (resuming from a checkpoint)
    _recover("worker1@host")
    with Session(get_engine()) as session:
        requeued = session.get(Job, job_id)
        assert requeued is not None and requeued.status == JobStatus.queued and requeued.run_token != "held"


def test_the_standalone_worker_command_names_workers_uniquely(monkeypatch: pytest.MonkeyPatch) -> None:
    from app import cli

    commands: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, args: commands.append(list(args)))
    cli.worker(queues="training", hostname=None)
    cli.worker(queues="training", hostname=None)
    cli.worker(queues="training", hostname="gpu1@%h")
    names = [next(arg for arg in command if arg.startswith("--hostname=")) for command in commands]
    assert (
        names[0] != names[1]
        and names[0].startswith("--hostname=worker-")
        and names[2] == "--hostname=gpu1@%h"
    )
