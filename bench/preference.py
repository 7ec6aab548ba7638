"""Preference tuning: a studio DPO job against a hand-written trl script, same model, data, hyper-parameters, seed.

    python bench/preference.py                      # both runs, each in its own process; prints the ratios
    python bench/preference.py --pairs 160 --held-out 60 --steps 20 --repeat 3
    python bench/preference.py --base /path/to/model --gpu [--liger]   # the GPU check (~1B model), not run here

``studio`` runs the real worker path (``worker.engine.run_job`` on a fresh SQLite database: the dataset profiled
and validated, the ShareGPT rows rendered through the chat template, LoRA applied by the studio's method, trl's
DPOTrainer with the studio's callbacks writing metric points); ``script`` is the trl script people write from its
docs: the same rows as conversational prompt/chosen/rejected messages, ``DPOTrainer(peft_config=LoraConfig(...))``.
Both time ``train()`` without evaluation (bench/perf_train.py's timed Trainer), evaluate once on the same held-out
pairs (trl's ``eval_rewards/accuracies``: the share of pairs whose chosen answer gets the larger reward), and report
their peak memory (RSS on a CPU, CUDA peak allocated on a GPU; each run is a process). The base model is the tiny
Llama the causal-LM bench uses (bench/run_all.py: hidden 512, 4 layers, a tokenizer trained on the Alpaca demo)
unless ``--base`` names another; data is the first rows of /work/shared/data/preference/dpo_en_demo.json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
DPO_DEMO = PROJECT_ROOT.parent / "shared" / "data" / "preference" / "dpo_en_demo.json"
SEED = 42
BETA = 0.1
LORA = {"r": 8, "alpha": 16}


def demo_rows(options: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training pairs and held-out pairs: the first ``pairs`` rows of the demo, then ``held_out`` more."""
    rows = json.loads(Path(options.data).read_text(encoding="utf-8"))
    return rows[: options.pairs], rows[options.pairs : options.pairs + options.held_out]


class Meter:
    """What a timed trainer measured: train() seconds without evaluation, and the pairs its batches carried."""

    train_seconds = 0.0
    eval_seconds = 0.0
    examples = 0
    training = False
    train_peak_mib = 0.0


METER = Meter()


def timed_trainer(base: Any) -> Any:
    """A trl trainer subclass that times train() without evaluation and counts the pairs of training batches (the
    preference batches hold prompt/chosen/rejected ids, not input_ids, so bench/perf_train.py's counter does not
    fit)."""

    class TimedTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            collate = self.data_collator

            def counting(features: list[dict[str, Any]]) -> Any:
                if METER.training:
                    METER.examples += len(features)
                return collate(features)

            self.data_collator = counting

        def train(self, *args: Any, **kwargs: Any) -> Any:
            METER.training = True
            started = time.perf_counter()
            try:
                return super().train(*args, **kwargs)
            finally:
                METER.training = False
                METER.train_seconds = time.perf_counter() - started - METER.eval_seconds
                # the training peak, before any held-out evaluation's batches (the studio evaluates inside train())
                METER.train_peak_mib = METER.train_peak_mib or peak_memory_mib()

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            if METER.training and not METER.train_peak_mib:
                METER.train_peak_mib = peak_memory_mib()
            training, METER.training = METER.training, False
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                METER.eval_seconds += time.perf_counter() - started
                METER.training = training

    return TimedTrainer


def peak_memory_mib() -> float:
    """Peak CUDA memory allocated (on a GPU) or the process's peak RSS, in MiB."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def training_values(options: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_steps": options.steps,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "max_length": options.max_length,
        "warmup_ratio": 0.0,
        "logging_steps": 5,
        "seed": SEED,
    }


def run_studio(options: argparse.Namespace) -> dict[str, Any]:
    """A DPO job through worker.engine.run_job on its own fresh database."""
    import io

    from sqlmodel import Session, select

    from app.core.db import get_engine, run_migrations
    from app.core.models import Adapter, Job
    from app.core.spec import JobSpec
    from app.services.datasets import create_dataset
    from worker import engine

    run_migrations()
    train_rows, held_rows = demo_rows(options)
    with Session(get_engine()) as session:
        train = create_dataset(session, io.BytesIO(json.dumps(train_rows).encode()), "dpo_train.json")
        held = create_dataset(session, io.BytesIO(json.dumps(held_rows).encode()), "dpo_held_out.json")
        spec = JobSpec.model_validate(
            {
                "task": "preference",
                "base_model": options.base,
                "dataset_id": train.id,
                "validation_dataset_id": held.id,
                "method": "lora",
                "method_config": LORA,
                "training": {
                    **training_values(options),
                    "eval_steps": options.steps,
                    "save_steps": 0,
                    # like the script: Liger's kernels only in the --liger round (auto would apply them on CUDA)
                    "liger": "auto" if options.liger else "off",
                },
                "preference": {"loss": "dpo", "beta": BETA, "prompt_column": "conversations"},
            }
        )
        job = Job(name="bench", spec=spec.model_dump(mode="json"), method="lora", base_model=options.base)
        job.dataset_id = train.id
        session.add(job)
        session.commit()
        session.refresh(job)
        job_id = job.id
    from worker.recipes import preference

    setup = preference.trainer_setup

    def timed_setup(spec: Any) -> Any:
        trainer_class, config_class, values = setup(spec)
        if options.liger:  # the GPU check: trl's Liger-kernel DPO loss (needs liger-kernel on the GPU host)
            values["use_liger_kernel"] = True
        return timed_trainer(trainer_class), config_class, values

    preference.trainer_setup = timed_setup  # type: ignore[assignment]
    engine.run_job(job_id)
    with Session(get_engine()) as session:
        finished = session.get(Job, job_id)
        assert finished is not None
        if finished.status != "succeeded":
            raise SystemExit(f"job {job_id} {finished.status}: {finished.error}")
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).one()
        metrics = dict(adapter.metrics)
    return {
        "train_seconds": METER.train_seconds,
        "examples": METER.examples,
        "reward_accuracy": metrics.get("rewards/accuracies"),
        "reward_margin": metrics.get("rewards/margins"),
    }


def run_script(options: argparse.Namespace) -> dict[str, Any]:
    """The hand-written trl script: conversational pairs, DPOTrainer with a LoraConfig, the same settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train_rows, held_rows = demo_rows(options)
    role = {"human": "user", "gpt": "assistant", "system": "system"}

    def conversational(rows: list[dict[str, Any]]) -> Dataset:
        def message(turn: dict[str, str]) -> dict[str, str]:
            return {"role": role[turn["from"]], "content": turn["value"]}

        return Dataset.from_list(
            [
                {
                    "prompt": [message(turn) for turn in row["conversations"]],
                    "chosen": [message(row["chosen"])],
                    "rejected": [message(row["rejected"])],
                }
                for row in rows
            ]
        )

    tokenizer = AutoTokenizer.from_pretrained(options.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(options.base, dtype=dtype)
    values = training_values(options)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo-script-"),
        per_device_train_batch_size=values["batch_size"],
        per_device_eval_batch_size=max(values["batch_size"], 32),
        learning_rate=values["learning_rate"],
        max_steps=values["max_steps"],
        warmup_steps=0,
        lr_scheduler_type="linear",
        logging_steps=values["logging_steps"],
        max_length=values["max_length"],
        beta=BETA,
        seed=SEED,
        data_seed=SEED,
        gradient_checkpointing=False,
        bf16=torch.cuda.is_available(),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_liger_kernel=options.liger,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    trainer = timed_trainer(DPOTrainer)(
        model=model,
        args=args,
        train_dataset=conversational(train_rows),
        eval_dataset=conversational(held_rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    metrics = trainer.evaluate()
    return {
        "train_seconds": METER.train_seconds,
        "examples": METER.examples,
        "reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "reward_margin": metrics.get("eval_rewards/margins"),
    }


def child(options: argparse.Namespace) -> None:
    """One run in this process: print its result as one JSON line."""
    import torch

    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    result = run_studio(options) if options.mode == "studio" else run_script(options)
    result.update(
        mode=options.mode,
        # pairs the optimizer steps saw (steps x batch); "examples" counts what the collator was handed
        samples_per_second=round(options.steps * options.batch_size / result["train_seconds"], 3),
        peak_memory_mib=peak_memory_mib(),
        train_peak_memory_mib=METER.train_peak_mib,
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    print("RESULT " + json.dumps(result), flush=True)


def make_tiny_llama(folder: Path) -> Path:
    """The causal-LM bench's tiny Llama (bench/run_all.py)."""
    from bench.run_all import make_tiny_llama as make

    return make(folder / "llama")


def run_child(mode: str, options: argparse.Namespace, base: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"pref-{mode}-") as folder:
        env = {
            **os.environ,
            "PEFT_STUDIO_DATA_DIR": str(Path(folder) / "data"),
            "HF_HUB_OFFLINE": "1",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            # the studio trains only on models inside folders the admin registered
            "PEFT_STUDIO_MODEL_FOLDERS": json.dumps([str(Path(base).parent)]),
        }
        for name in ("PEFT_STUDIO_DATABASE_URL", "PEFT_STUDIO_BROKER_URL", "PEFT_STUDIO_ARTIFACT_ROOT"):
            env.pop(name, None)
        command = [sys.executable, __file__, "--mode", mode, "--base", base, *passthrough(options)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
        return result


def passthrough(options: argparse.Namespace) -> list[str]:
    values = [
        "--pairs", str(options.pairs), "--held-out", str(options.held_out), "--steps", str(options.steps),
        "--batch-size", str(options.batch_size), "--max-length", str(options.max_length),
        "--learning-rate", str(options.learning_rate), "--threads", str(options.threads),
    ]  # fmt: skip
    return values + ["--data", str(options.data)] + (["--liger"] if options.liger else [])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["both", "studio", "script"], default="both")
    parser.add_argument("--base", default=None, help="a causal-LM folder; default: the bench's tiny Llama")
    parser.add_argument("--data", default=str(DPO_DEMO), help="a ShareGPT DPO JSON file (default: the demo)")
    parser.add_argument("--pairs", type=int, default=96, help="training pairs (the demo's first rows)")
    parser.add_argument("--held-out", type=int, default=48, help="held-out pairs after them")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a shared CPU)")
    parser.add_argument("--repeat", type=int, default=2, help="alternate studio/script runs this many times")
    parser.add_argument("--gpu", action="store_true", help="the GPU check: needs --base (~1B model) and CUDA")
    parser.add_argument("--liger", action="store_true", help="trl's Liger-kernel DPO loss (use_liger_kernel)")
    options = parser.parse_args()
    if options.mode != "both":
        child(options)
        return
    if options.gpu:
        import torch

        if not torch.cuda.is_available() or not options.base:
            raise SystemExit("--gpu needs a CUDA device and --base (a ~1B causal LM folder)")
    with tempfile.TemporaryDirectory(prefix="pref-bench-") as folder:
        base = options.base or str(make_tiny_llama(Path(folder)))
        runs: dict[str, list[dict[str, Any]]] = {"studio": [], "script": []}
        for number in range(options.repeat):
            # interleaved, the order reversed every other round (the load of a shared machine drifts)
            for mode in ("studio", "script") if number % 2 == 0 else ("script", "studio"):
                runs[mode].append(run_child(mode, options, base))
                print(json.dumps(runs[mode][-1]), flush=True)
    rounds = list(zip(runs["studio"], runs["script"], strict=True))
    speed = sorted(studio["samples_per_second"] / script["samples_per_second"] for studio, script in rounds)
    memory = sorted(studio["peak_memory_mib"] / script["peak_memory_mib"] for studio, script in rounds)
    train_memory = sorted(
        studio["train_peak_memory_mib"] / script["train_peak_memory_mib"] for studio, script in rounds
    )
    summary = {
        "samples_per_second_ratio": round(speed[len(speed) // 2], 3),  # the median round
        "samples_per_second_ratios": [round(r, 3) for r in speed],
        "peak_memory_ratio": round(memory[len(memory) // 2], 3),
        "peak_memory_ratios": [round(r, 3) for r in memory],
        "train_peak_memory_ratio": round(train_memory[len(train_memory) // 2], 3),
        "reward_accuracy": {mode: [r["reward_accuracy"] for r in results] for mode, results in runs.items()},
        "load_average": os.getloadavg(),
        "liger": options.liger,
    }
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
