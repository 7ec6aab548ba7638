"""One timed training run in this process, printed as one JSON line (used by bench/run_all.py).

    python bench/perf_train.py studio --rows 1000 --dev-rows 872 [--dropout] [--no-group]
    python bench/perf_train.py script --rows 1000 --dev-rows 872 [--dropout] [--padding max_length] [--group]
    python bench/perf_train.py studio-lm --rows 400 --base /tmp/lm   # causal LM on Alpaca, packed
    python bench/perf_train.py studio-lm --rows 400 --base /tmp/lm --packing on --torch-compile

``studio`` runs the real worker path (``worker.engine.run_job`` on a fresh SQLite database: data loading,
tokenizing once, the method, the StudioCallback writing metrics); ``script`` is the hand-written
``Trainer`` + ``peft`` script people write from the docs, with the same model, data and hyper-parameters.
Both time ``Trainer.train`` without the evaluation, count the real (non-pad) and the padded tokens the
training batches carried, evaluate once on the dev rows, and report their peak RSS (each run is a process).
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
DATA = PROJECT_ROOT.parent / "shared" / "data"
LORA = {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}
LEARNING_RATE = 5e-4
SEED = 42


def csv_rows(name: str, rows: int | None) -> str:
    """The header and the first ``rows`` rows of an SST-2 file."""
    lines = (DATA / "sst2" / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(lines[: 1 + rows] if rows else lines) + "\n"


class Meter:
    """What a timed Trainer measured."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.examples = 0
        self.training = False
        self.first_step_at: float | None = None


METER = Meter()


def timed_trainer(base: Any) -> Any:
    """A Trainer subclass that times train() without evaluation and counts tokens of training batches."""

    class TimedTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            collate = self.data_collator

            def counting(features: list[dict[str, Any]]) -> Any:
                batch = collate(features)
                if METER.training:
                    ids = batch["input_ids"]
                    METER.padded_tokens += int(ids.numel())
                    METER.real_tokens += sum(
                        sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"])
                        for f in features
                    )
                    METER.examples += len(features)
                return batch

            self.data_collator = counting

        def train(self, *args: Any, **kwargs: Any) -> Any:
            METER.training = True
            started = time.perf_counter()
            try:
                return super().train(*args, **kwargs)
            finally:
                METER.training = False
                METER.train_seconds = time.perf_counter() - started - METER.eval_seconds

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            training, METER.training = METER.training, False
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                METER.eval_seconds += time.perf_counter() - started
                METER.training = training

    return TimedTrainer


def linear_params(model: Any) -> tuple[int, int]:
    """Weights of every Linear layer (frozen, trainable) outside the embeddings: the GEMM work per token."""
    import torch

    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return frozen, trainable


def run_studio(options: argparse.Namespace) -> dict[str, Any]:
    """A job through worker.engine.run_job on its own fresh database."""
    import io

    from sqlmodel import Session

    from app.core.db import get_engine, run_migrations
    from app.core.models import Job
    from app.core.spec import JobSpec
    from app.services.datasets import create_dataset
    from worker import engine, training

    run_migrations()
    training.Trainer = timed_trainer(training.Trainer)  # type: ignore[attr-defined]
    captured: dict[str, Any] = {}
    build = training.build_trainable

    def capturing_build(spec: Any, *args: Any) -> Any:
        result = build(spec, *args)
        captured["model"] = result[2]
        return result

    training.build_trainable = capturing_build  # type: ignore[assignment]
    with Session(get_engine()) as session:
        if options.mode == "studio-lm":
            data = (DATA / "alpaca" / "alpaca_en_demo.json").read_bytes()
            rows = json.loads(data)[: options.rows]
            train = create_dataset(session, io.BytesIO(json.dumps(rows).encode()), "alpaca.json")
            spec_fields: dict[str, Any] = {
                "task": "causal-lm",
                "base_model": options.base,
                "dataset_id": train.id,
                "validation_fraction": 0.0,
                "method": "lora",
                "training": {
                    "num_epochs": 1,
                    "batch_size": options.batch_size,
                    "max_length": options.max_length,
                    "learning_rate": 1e-3,
                    "logging_steps": 10,
                    "torch_compile": options.torch_compile,
                    "save_steps": options.save_steps,
                    "attention": options.attention,
                },
                "causal_lm": {"format": "alpaca", "packing": options.packing},
            }
        else:
            train = create_dataset(session, io.BytesIO(csv_rows("train.csv", options.rows).encode()), "t.csv")
            dev = create_dataset(session, io.BytesIO(csv_rows("dev.csv", options.dev_rows).encode()), "d.csv")
            spec_fields = {
                "dataset_id": train.id,
                "validation_dataset_id": None if options.no_eval else dev.id,
                "validation_fraction": 0.0,
                "method": "lora",
                "method_config": {**LORA, "dropout": 0.1 if options.dropout else 0.0},
                "training": {
                    "num_epochs": options.epochs,
                    "batch_size": options.batch_size,
                    "learning_rate": LEARNING_RATE,
                    "max_length": options.max_length,
                    "logging_steps": options.logging_steps,
                    "disable_dropout": not options.dropout,
                    "group_by_length": not options.no_group,
                    "save_steps": options.save_steps,
                    "seed": SEED,
                    "torch_compile": options.torch_compile,
                },
            }
        spec = JobSpec.model_validate(spec_fields)
        job = Job(
            name="bench",
            spec=spec.model_dump(mode="json"),
            method=spec.method,
            base_model=spec.base_model,
            dataset_id=train.id,
        )
        session.add(job)
        session.commit()
        session.refresh(job)
        job_id = job.id
    engine.run_job(job_id)
    from app.core.models import Adapter

    with Session(get_engine()) as session:
        finished = session.get(Job, job_id)
        assert finished is not None
        if finished.status != "succeeded":
            raise SystemExit(f"job {job_id} {finished.status}: {finished.error}")
        adapter = session.exec(__import__("sqlmodel").select(Adapter).where(Adapter.job_id == job_id)).first()
        metrics = dict(adapter.metrics) if adapter else {}
    frozen, trainable = linear_params(captured["model"])
    return {"accuracy": metrics.get("accuracy"), "frozen_linear": frozen, "trainable_linear": trainable}


def run_script(options: argparse.Namespace) -> dict[str, Any]:
    """The hand-written Trainer + peft script (dynamic padding, or the tutorial's max_length padding)."""
    import csv
    import io

    import numpy as np
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from app.core.base_models import bundled_model_path

    def read(name: str, rows: int | None) -> tuple[list[str], list[int]]:
        reader = list(csv.DictReader(io.StringIO(csv_rows(name, rows))))
        return [r["text"] for r in reader], [int(r["label"]) for r in reader]

    path = str(bundled_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        **({} if options.dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.1 if options.dropout else 0.0,
        target_modules=LORA["target_modules"],
    )
    set_seed(SEED)
    model = get_peft_model(model, config)
    padding: Any = "max_length" if options.padding == "max_length" else False

    def encode(texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        enc = tokenizer(texts, truncation=True, max_length=options.max_length, padding=padding)
        return [
            {"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
        ]

    train = encode(*read("train.csv", options.rows))
    dev = encode(*read("dev.csv", options.dev_rows))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-script-"),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=max(options.batch_size, 32),
        learning_rate=LEARNING_RATE,
        num_train_epochs=options.epochs,
        logging_steps=options.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
        train_sampling_strategy="group_by_length" if options.group else "random",
        use_cpu=True,
        dataloader_num_workers=0,
    )

    def accuracy(prediction: Any) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        return {"accuracy": float((np.asarray(logits).argmax(-1) == prediction.label_ids).mean())}

    trainer = timed_trainer(Trainer)(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    frozen, trainable = linear_params(model)
    return {"accuracy": metrics.get("eval_accuracy"), "frozen_linear": frozen, "trainable_linear": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["studio", "script", "studio-lm"])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--dev-rows", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--dropout", action="store_true", help="model dropout on and LoRA dropout 0.1")
    parser.add_argument("--padding", choices=["dynamic", "max_length"], default="dynamic")
    parser.add_argument("--group", action="store_true", help="script: length-grouped batches")
    parser.add_argument("--no-group", action="store_true", help="studio: random batches")
    parser.add_argument("--save-steps", type=int, default=None, help="studio: checkpoint interval (0: none)")
    parser.add_argument("--no-eval", action="store_true", help="studio: no validation set (saves time)")
    parser.add_argument("--base", default=None, help="studio-lm: the causal LM folder")
    parser.add_argument(
        "--packing",
        choices=["auto", "on", "off", "rows"],
        default="rows",
        help="studio-lm: causal_lm.packing",
    )
    parser.add_argument("--torch-compile", action="store_true", help="studio: training.torch_compile")
    parser.add_argument(
        "--attention",
        choices=["auto", "sdpa", "sdpa_varlen"],
        default="auto",
        help="studio-lm: training.attention (sdpa: the masked kernel auto used before sdpa_varlen)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gemm", action="store_true", help="also measure this process's fp32 GEMM rate")
    options = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("PEFT_STUDIO_DATA_DIR", tempfile.mkdtemp(prefix="bench-perf-"))
    if options.base:  # the studio trains only on models inside folders the admin registered
        os.environ.setdefault(
            "PEFT_STUDIO_MODEL_FOLDERS", json.dumps([str(Path(options.base).resolve().parent)])
        )
    import torch

    threads = options.threads or int(os.environ.get("BENCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    result = run_script(options) if options.mode == "script" else run_studio(options)
    seconds = METER.train_seconds
    result.update(
        mode=options.mode,
        train_seconds=round(seconds, 3),
        eval_seconds=round(METER.eval_seconds, 3),
        examples=METER.examples,
        samples_per_second=round(METER.examples / seconds, 3) if seconds else None,
        real_tokens=METER.real_tokens,
        padded_tokens=METER.padded_tokens,
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(),
    )
    if options.gemm:
        result["gemm_gflops"] = gemm_gflops()
    print("RESULT " + json.dumps(result), flush=True)


def gemm_gflops(size: int = 1024, seconds: float = 3.0) -> dict[str, float]:
    """fp32 matrix-multiply rate of this process (size³ GEMMs for about ``seconds``): median and best."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 5:
        started = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    rates.sort()
    return {"median": round(rates[len(rates) // 2], 1), "best": round(rates[-1], 1), "n": len(rates)}


if __name__ == "__main__":
    main()
