"""Benchmark every registered method on SST-2 with the bundled MiniLM, through the real worker path.

Same budget for all: 1 epoch, batch 32, max length 128, each method's own typical learning rate
(``MethodInfo.learning_rate``) and default settings; evaluated once on the SST-2 dev set (872 rows).
Each method runs in a child process of its own, so its peak memory (max RSS) is its own; results are appended
to a JSON-lines file as each method finishes, so partial results survive an interruption.

    python bench/methods.py                       # every method, full training set (6,920 rows)
    python bench/methods.py --train-rows 2000     # a documented subset
    python bench/methods.py lora ia3              # some methods
    python bench/methods.py hadamard:train_layer_norm=false,classifier_first_fraction=0   # a variant
    python bench/methods.py --table               # print the markdown table of the results file

Numbers depend on the machine and on what else runs on it; the script prints only what it measured.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"
RESULTS = PROJECT_ROOT / "bench" / "results" / "methods.jsonl"


def parse_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,key=value`` (values read as JSON: false, 0, 0.3, "text") -> name, settings."""
    name, _, options = label.partition(":")
    config: dict[str, Any] = {}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return name, config


def run_one(
    label: str, train_rows: int | None, batch_size: int, max_length: int, epochs: float
) -> dict[str, Any]:
    """Train one method (a registered name, or a variant ``name:key=value,...``) in this process through
    worker.engine.run_job and return what was measured."""
    name, method_config = parse_variant(label)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["PEFT_STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix=f"bench-{name}-")
    sys.path.insert(0, str(PROJECT_ROOT))
    import io

    from sqlmodel import Session, select

    from app.core.db import get_engine, run_migrations
    from app.core.models import Adapter, Job
    from app.core.spec import JobSpec
    from app.services.datasets import create_dataset
    from worker import engine, training
    from worker.methods import get_method

    run_migrations()
    method = get_method(name)
    lines = (SST2 / "train.csv").read_text(encoding="utf-8").splitlines()
    if train_rows:
        lines = lines[: 1 + train_rows]
    timings: dict[str, float] = {}

    class TimedTrainer(training.Trainer):  # type: ignore[name-defined,misc]
        def train(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return super().train(*args, **kwargs)
            finally:
                timings["train_seconds"] = time.perf_counter() - started - timings.get("eval_seconds", 0.0)

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                timings["eval_seconds"] = timings.get("eval_seconds", 0.0) + time.perf_counter() - started

    training.Trainer = TimedTrainer  # type: ignore[attr-defined,misc]
    with Session(get_engine()) as session:
        train = create_dataset(session, io.BytesIO(("\n".join(lines) + "\n").encode()), "train.csv")
        dev = create_dataset(session, io.BytesIO((SST2 / "dev.csv").read_bytes()), "dev.csv")
        train_profile = dict(train.profile)
        spec = JobSpec.model_validate(
            {
                "dataset_id": train.id,
                "validation_dataset_id": dev.id,
                "method": name,
                "method_config": method_config,
                "training": {
                    "num_epochs": epochs,
                    "batch_size": batch_size,
                    "max_length": max_length,
                    "learning_rate": method.learning_rate,
                    "logging_steps": 20,
                },
            }
        )
        job = Job(
            name=f"bench {name}",
            spec=spec.model_dump(mode="json"),
            method=name,
            base_model=spec.base_model,
            dataset_id=train.id,
        )
        session.add(job)
        session.commit()
        session.refresh(job)
        job_id = job.id
    from worker.estimate import estimate_job

    estimated = estimate_job(spec, train_profile).memory
    started_utc = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    engine.run_job(job_id)
    wall = time.perf_counter() - started
    with Session(get_engine()) as session:
        finished = session.get(Job, job_id)
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
        if adapter is None:
            raise RuntimeError(
                f"{name}: job ended {finished.status if finished else '?'}: {finished and finished.error}"
            )
        return {
            "method": label,
            "method_config": method_config,
            "started_utc": started_utc,
            "train_rows": len(lines) - 1,
            "epochs": epochs,
            "batch_size": batch_size,
            "max_length": max_length,
            "learning_rate": method.learning_rate,
            "trainable_params": adapter.trainable_params,
            "total_params": adapter.total_params,
            "trainable_percent": round(100 * adapter.trainable_params / adapter.total_params, 4),
            "adapter_bytes": adapter.size_bytes,
            "train_seconds": round(timings.get("train_seconds", float("nan")), 1),
            "eval_seconds": round(timings.get("eval_seconds", float("nan")), 1),
            "job_seconds": round(wall, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "estimated_mib": round(estimated.total_bytes / 2**20, 1),
            "dev_accuracy": adapter.metrics.get("accuracy"),
            "dev_f1_macro": adapter.metrics.get("f1_macro"),
            "train_loss": adapter.metrics.get("train_loss"),
            "torch_threads": __import__("torch").get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        }


def table(path: Path) -> str:
    """The results file as a markdown table (the last result per method wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["method"]] = row
    out = [
        "| method | trainable params | % of total | train time (s) | job time (s) | peak RSS (MiB) | dev accuracy "
        "| train rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        if "error" in row:
            out.append(f"| {name} | failed: {row['error']} | | | | | | |")
            continue
        out.append(
            f"| {name} | {row['trainable_params']:,} | {row['trainable_percent']:.3f} | {row['train_seconds']:.0f} "
            f"| {row['job_seconds']:.0f} | {row['peak_rss_mib']:.0f} | {row['dev_accuracy']:.3f} | {row['train_rows']:,} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("methods", nargs="*", help="methods to run (default: every registered method)")
    parser.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="JSON-lines file results are appended to"
    )
    parser.add_argument("--table", action="store_true", help="print the results file as a markdown table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        try:
            result = run_one(args.one, args.train_rows, args.batch_size, args.max_length, args.epochs)
        finally:
            shutil.rmtree(os.environ.get("PEFT_STUDIO_DATA_DIR", ""), ignore_errors=True)
        print(json.dumps(result))
        return
    if args.table:
        print(table(args.results))
        return
    sys.path.insert(0, str(PROJECT_ROOT))
    from worker.methods import registry

    names = args.methods or list(registry())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--epochs",
            str(args.epochs),
        ]
        if args.train_rows:
            command += ["--train-rows", str(args.train_rows)]
        print(f"== {name}", flush=True)
        child = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            tail = (child.stderr or child.stdout).strip().splitlines()[-3:]
            result = {"method": name, "error": " / ".join(tail)[:300]}
        with args.results.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    print(table(args.results))


if __name__ == "__main__":
    main()
