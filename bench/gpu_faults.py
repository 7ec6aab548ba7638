"""GPU fault check (issue 6 on CUDA): out-of-memory is explained and frees the GPU, cancel frees the GPU.

Runs real studio jobs through ``worker.engine.run_job`` (as ``bench/gpu_check.py`` does, on a SQLite studio in
a temporary folder, a random TinyLlama-shaped model) on a lent GPU machine:

* ``oom``: a QLoRA job whose batch cannot fit (batch 512 × 2048 tokens on 1.1 B); the job must fail with the
  out-of-memory explanation, and the CUDA memory it held must be given back;
* ``cancel``: a long QLoRA job cancelled from another thread (as the web app does, through the database) after a
  few steps; it must stop within 5 s of the request, end ``cancelled``, and give its CUDA memory back;
* ``after``: a short job right after both, on the same process, must succeed (the worker takes the next job).

    python bench/gpu_faults.py --site .gpu_site --out $OUT     # on the GPU machine
    python bench/gpu_faults.py --smoke                          # CPU, tiny model: the code paths only
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as g  # noqa: E402


def _cuda_allocated_gib() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _job(studio: "g.Studio", model_dir: Path, cfg: dict[str, Any], **training: Any) -> int:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job
    from app.core.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "name": "gpu fault check",
            "base_model": str(model_dir),
            "task": "causal-lm",
            "dataset_id": studio.dataset_id,
            "validation_fraction": 0.0,
            "method": "qlora",
            "method_config": dict(g.LORA),
            "training": {"learning_rate": g.LEARNING_RATE, "save_steps": 0, "logging_steps": 1, **training},
            "causal_lm": {"packing": True},
        }
    )
    with Session(get_engine()) as session:
        job = Job(
            name="gpu fault check",
            spec=spec.model_dump(mode="json"),
            method="qlora",
            base_model=spec.base_model,
            dataset_id=studio.dataset_id,
        )
        session.add(job)
        session.commit()
        session.refresh(job)
        assert job.id is not None
        return job.id


def _state(job_id: int) -> dict[str, Any]:
    from sqlmodel import Session

    from app.core.db import get_engine
    from app.core.models import Job

    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return {"status": str(job.status.value), "error": job.error, "step": job.current_step}


def _run(job_id: int) -> float:
    from worker import engine, lifecycle

    started = time.monotonic()
    try:
        engine.run_job(job_id, worker_name="gpu-faults")
    except Exception as error:  # noqa: BLE001 - what the Celery task's on_failure does in production
        from worker.failures import explain

        lifecycle.mark_failed(job_id, explain(error), traceback.format_exc())
        g.say(f"run_job raised {type(error).__name__}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--site", type=Path)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_faults"))
    args = parser.parse_args()
    if args.site:
        g.bootstrap_site(args.site)
    sys.path.insert(0, str(g.PROJECT_ROOT))
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PEFT_STUDIO_DATA_DIR=tempfile.mkdtemp(prefix="gpu-faults-studio-"),
        # the random model is written to a temporary folder: register it (app/core/base_models.py)
        PEFT_STUDIO_MODEL_FOLDERS=json.dumps([tempfile.gettempdir()]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    data_file = next(
        p for p in [args.site and args.site / "data" / "alpaca.json", g.ALPACA_SHARED] if p and p.exists()
    )
    cfg = g.sizes(args.smoke)
    rows = g.alpaca_rows(data_file, cfg["rows"])
    model_dir = Path(tempfile.mkdtemp(prefix="gpu-faults-model-"))
    report: dict[str, Any] = {"versions": g.versions(), "model": g.build_model(model_dir, rows, cfg)}
    studio = g.Studio(data_file, rows)
    report["idle_allocated_gib"] = _cuda_allocated_gib()

    def write() -> None:
        (args.out / "gpu_faults.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    # 1. out of memory
    try:
        big = 8 if args.smoke else 512
        job_id = _job(studio, model_dir, cfg, max_steps=2, batch_size=big, max_length=cfg["max_length"] * 4)
        seconds = _run(job_id)
        report["oom"] = {**_state(job_id), "seconds": seconds, "allocated_after_gib": _cuda_allocated_gib()}
    except Exception as error:  # noqa: BLE001
        report["oom"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    g.say(f"oom: {json.dumps(report['oom'], default=str)[:1500]}")
    write()

    # 2. cancel a running job from another thread, through the database, as the web app does
    try:
        from sqlmodel import Session

        from app.core.db import get_engine
        from app.core.models import Job

        job_id = _job(studio, model_dir, cfg, max_steps=100_000, batch_size=cfg["batch_size"])
        requested: dict[str, float] = {}

        def cancel_after_steps() -> None:
            while _state(job_id)["step"] < 5:
                time.sleep(0.2)
            with Session(get_engine()) as session:
                job = session.get(Job, job_id)
                assert job is not None
                job.cancel_requested = True
                session.add(job)
                session.commit()
            requested["at"] = time.monotonic()
            requested["allocated_gib"] = _cuda_allocated_gib()

        canceller = threading.Thread(target=cancel_after_steps, daemon=True)
        canceller.start()
        _run(job_id)
        ended = time.monotonic()
        report["cancel"] = {
            **_state(job_id),
            "stopped_after_request_s": round(ended - requested.get("at", ended), 2),
            "allocated_while_running_gib": requested.get("allocated_gib"),
            "allocated_after_gib": _cuda_allocated_gib(),
        }
    except Exception as error:  # noqa: BLE001
        report["cancel"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    g.say(f"cancel: {json.dumps(report['cancel'], default=str)[:1500]}")
    write()

    # 3. the next job on the same worker process
    try:
        job_id = _job(studio, model_dir, cfg, max_steps=3, batch_size=cfg["batch_size"])
        seconds = _run(job_id)
        report["after"] = {**_state(job_id), "seconds": seconds, "allocated_after_gib": _cuda_allocated_gib()}
    except Exception as error:  # noqa: BLE001
        report["after"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    g.say(f"after: {json.dumps(report['after'], default=str)[:800]}")
    write()


if __name__ == "__main__":
    main()
