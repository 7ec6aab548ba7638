"""Multi-process training of one job (``resources.num_processes`` > 1): PyTorch DDP, or FSDP when
``resources.strategy`` asks for it (or auto finds the model too big for one GPU: worker/speed.py), launched
with torchrun.

The Celery worker that claimed the job does not train it: ``launch`` starts ``torchrun`` (one process per GPU,
or ``num_processes`` CPU processes on the gloo backend when the worker has too few GPUs), keeps the job's
heartbeat, and watches for a cancel. Each rank runs ``python -m worker.distributed <job id> <run token>``,
which calls the same training function as a single-process job (``worker.training.train``), so a
multi-process job trains exactly like one; transformers' Trainer reads torchrun's environment and wraps the
model in DistributedDataParallel. Only rank 0 reports metrics, saves checkpoints and the adapter, and finishes
the job (``train``'s ``main_process``, from ``is_main_process`` here). A cancel or a lost claim stops every
rank: the launcher terminates torchrun's whole process group, which takes its ranks with it.

torchrun rather than ``accelerate launch``: it ships with torch, and the Trainer sets up accelerate itself.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.db import session_scope
from app.core.models import Job, JobStatus
from app.core.settings import get_settings
from app.core.spec import JobSpec
from app.services.jobs import add_event
from worker.lifecycle import Claim, finish_job

if TYPE_CHECKING:
    from worker.resilience import Heartbeat

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
STOP_GRACE_SECONDS = 20.0


class DistributedTrainingFailed(RuntimeError):
    """torchrun exited with an error; the message carries the end of the ranks' output."""


def rank() -> int:
    """This process's global rank under torchrun (0 outside a distributed run)."""
    return int(os.environ.get("RANK", "0"))  # torchrun's own variable, not a studio setting


def is_main_process() -> bool:
    """True outside DDP and on rank 0: the one process that reports metrics and writes artifacts."""
    return rank() == 0


def plan(num_processes: int) -> tuple[str, int]:
    """Where the ranks run: ("cuda", GPUs per rank = 1) when the worker has a GPU per rank, else ("cpu", 0)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= num_processes:
        return "cuda", 1
    return "cpu", 0


def torchrun_command(job_id: int, run_token: str, num_processes: int, strategy: str = "ddp") -> list[str]:
    """The torchrun command line for one job on this host (a rendezvous on a free local port); ``strategy``
    (ddp or fsdp, chosen by the launcher: worker/speed.py ``choose_strategy``) is passed to every rank."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={num_processes}",
        "-m",
        "worker.distributed",
        str(job_id),
        run_token,
        strategy,
    ]


def _rank_environment(device: str, num_processes: int) -> dict[str, str]:
    env = dict(os.environ)
    settings = get_settings()
    # Share the cores between CPU ranks instead of each rank using all of them.
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // num_processes)
    env["OMP_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU: no rank may pick up a GPU it was not given
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate torchrun and every rank (one process group), then kill what is left."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path) -> str:
    try:
        with path.open("r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=LOG_TAIL_LINES))
    except OSError:
        return ""


def launch(job_id: int, claim: Claim, work_dir: Path, heartbeat: "Heartbeat") -> None:
    """Train a claimed job with ``num_processes`` DDP ranks; returns when they are done or stopped."""
    num_processes = claim.spec.resources.num_processes
    device, _ = plan(num_processes)
    if claim.spec.resources.wants_gpu and device != "cuda":
        raise DistributedTrainingFailed(
            f"the job asks for {num_processes} GPU processes but this worker has fewer GPUs; "
            "it was routed here by mistake (check the worker's queues)"
        )
    from worker.speed import choose_strategy

    strategy, why = choose_strategy(claim.spec, device)
    what = f"{num_processes} processes on " + (
        f"{num_processes} GPUs (nccl)" if device == "cuda" else "the CPU (gloo)"
    )
    what += f", {why}"
    with session_scope() as session:
        add_event(session, job_id, "status", f"distributed training: {what}")
        session.commit()
    log_path = work_dir / "ranks.log"
    poll = get_settings().cancel_poll_seconds
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            torchrun_command(job_id, claim.run_token, num_processes, strategy),
            env=_rank_environment(device, num_processes),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: a cancel stops torchrun and every rank
        )
        try:
            while process.poll() is None:
                if heartbeat.cancel.is_set() or _cancel_requested(job_id):
                    _stop(process)
                    break
                if heartbeat.lost.is_set():
                    # Lost the claim: either rank 0 just finished the job (the ranks are exiting) or another
                    # worker holds it now (stop ours).
                    if not _job_finished(job_id):
                        _stop(process)
                        break
                    try:
                        process.wait(timeout=STOP_GRACE_SECONDS)
                    except subprocess.TimeoutExpired:
                        _stop(process)
                    break
                time.sleep(poll)
        except BaseException:
            _stop(process)  # the worker itself is stopping (warm shutdown, KeyboardInterrupt)
            raise
    code = process.wait()
    status = _job_status(job_id)
    if status == JobStatus.succeeded:
        if code != 0:
            log.warning("job %s: rank 0 finished the job but torchrun exited with code %s", job_id, code)
        return
    if status is not None and status.is_terminal:
        return  # finished by someone else (e.g. cancelled while queued again): nothing to write
    if heartbeat.cancel.is_set() or _cancel_requested(job_id):
        finish_job(
            job_id, JobStatus.cancelled, "cancelled; every rank was stopped", run_token=claim.run_token
        )
        return
    if heartbeat.lost.is_set():
        log.warning("job %s: claim lost; its ranks were stopped", job_id)
        return
    if code != 0:
        raise DistributedTrainingFailed(
            f"distributed training ({what}) exited with code {code}; the ranks' last output:\n{_tail(log_path)}"
        )
    raise DistributedTrainingFailed(
        f"distributed training ended but rank 0 did not finish the job (it is {status}); the ranks' last "
        f"output:\n{_tail(log_path)}"
    )


def _job_status(job_id: int) -> "JobStatus | None":
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.status if job else None


def _job_finished(job_id: int) -> bool:
    status = _job_status(job_id)
    return status is None or status.is_terminal


def _cancel_requested(job_id: int) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job is None or job.cancel_requested


def run_rank(job_id: int, run_token: str, strategy: str = "ddp") -> None:
    """One DDP or FSDP rank: load the claimed job and run the training on it (rank 0 reports and saves)."""
    from worker.resilience import Heartbeat
    from worker.training import train

    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.run_token != run_token:
            raise SystemExit(f"job {job_id} is no longer held by this run")
        claim = Claim(spec=JobSpec.model_validate(job.spec), run_token=run_token, attempt=job.attempt)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    from app.core.storage import get_store
    from worker.resilience import remove_dir

    store = get_store()
    work_dir = store.scratch_dir(f"job-{job_id}-rank{rank()}")
    # The launcher keeps the job's heartbeat and watches for cancel; the ranks' own heartbeat only carries the
    # events the training loop reads, so it is never started.
    heartbeat = Heartbeat(job_id, run_token)
    try:
        train(job_id, claim, store, work_dir, heartbeat, main_process=is_main_process(), strategy=strategy)
    finally:
        remove_dir(work_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each rank: ``python -m worker.distributed <job id> <run token>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[2:] not in ([], ["ddp"], ["fsdp"]):
        raise SystemExit("usage: python -m worker.distributed JOB_ID RUN_TOKEN [ddp|fsdp]")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank()}] %(levelname)s %(name)s: %(message)s")
    run_rank(int(args[0]), args[1], args[2] if len(args) == 3 else "ddp")


if __name__ == "__main__":
    main()
