"""GPU check (issues 8 and 9): QLoRA and bf16 LoRA on a randomly initialised ~1.1B Llama, studio vs hand-written.

One prepared script for a lent GPU machine (no network). It builds a TinyLlama-shaped model (hidden 2048, 22
layers, intermediate 5632, vocab 32000, random weights, bf16 safetensors in /tmp) and a byte-level BPE
tokenizer trained on the alpaca demo set, then trains, with the same hyper-parameters:

* ``studio-qlora``: a real causal-LM job (alpaca, packing, method ``qlora``: 4-bit NF4, double quant, bf16
  compute) through ``worker.engine.run_job`` on a SQLite studio database (migrations run first);
* ``hf-qlora``: a hand-written ``transformers.Trainer`` + ``peft`` QLoRA script (``BitsAndBytesConfig``,
  ``prepare_model_for_kbit_training``, ``bf16=True``, the alpaca texts concatenated into max-length blocks);
* the same two with bf16 LoRA (no quantization); and, if time is left, ``hf-qlora-nobf16flag``, the
  hand-written script without ``bf16=True`` (as the studio's TrainingArguments are today).

QLoRA runs are interleaved (studio, hf, studio, hf). Each run is timed between the end of its warm-up steps and
its last step (CUDA synchronised), counting real (non-pad) tokens of exactly the batches of those steps; peak
CUDA memory is ``torch.cuda.max_memory_allocated`` from the start of training (and from before the load). Each
run is guarded, and a global time guard skips what is left after ``--budget`` seconds.

    python bench/gpu_check.py --site .gpu_site --out $OUT      # on the GPU machine (see scripts/gpu_site.sh)
    python bench/gpu_check.py --smoke                           # tiny model, CPU, a few steps: the code paths

Issue 22 (padding-free packing, Liger, FSDP): ``--issue22`` runs studio and hand-written QLoRA and LoRA once each at
sequence length 2048 (``--seq``), logging the loss every step (the 30-step curves are in gpu.json and compared in
gpu.md), with the studio on its defaults (``causal_lm.packing`` auto = padding-free, ``training.liger`` auto):

    python bench/gpu_check.py --site .gpu_site --issue22 --size 1b --budget 420
    python bench/gpu_check.py --site .gpu_site --issue22 --size 7b --batch 2 --budget 420

``--site DIR`` puts DIR first on sys.path and extracts DIR/wheels/*.whl (our pinned transformers, peft, the DB
layer) into /tmp before anything else is imported, so the job runs on our pins, not the image's.
Writes ``gpu.json`` and ``gpu.md`` into ``--out`` (default: $OUT, else /tmp/gpu_check).
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.monotonic()
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ALPACA_SHARED = PROJECT_ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


def elapsed() -> float:
    return time.monotonic() - T0


def say(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def bootstrap_site(site: Path) -> None:
    """Put the carried packages ahead of the image's: ``site`` itself and its wheels, extracted once."""
    target = Path(os.environ.get("GPU_SITE_EXTRACT", "/tmp/gpu_site_wheels"))
    target.mkdir(parents=True, exist_ok=True)
    for wheel in sorted((site / "wheels").glob("*.whl")):
        marker = target / f".done-{wheel.name}"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
            marker.touch()
    sys.path[:0] = [str(site.resolve()), str(target)]


# ---- configuration ----


LLAMA2_7B = {  # Llama-2-7B's shape (6.7 B parameters)
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}


def sizes(smoke: bool, size: str = "1b") -> dict[str, Any]:
    if size == "7b" and not smoke:
        return {**sizes(False, "1b"), **LLAMA2_7B}
    if smoke:
        return {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "max_length": 128,
            "batch_size": 2,
            "warmup_steps": 1,
            "steps": 2,
            "rows": 200,
        }
    return {  # TinyLlama-1.1B's shape with Llama-2's vocabulary size
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_length": 512,
        "batch_size": 8,
        "warmup_steps": 5,
        "steps": 30,
        "rows": None,
    }


# --variants: studio settings over the defaults (training.*), each measured against the same hand-written runs
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "gc": {"gradient_checkpointing": "on"},
    "flex": {"attention": "flex_attention"},
    "compile": {"torch_compile": True},
    "noliger": {"liger": "off"},
    "flex-noliger": {"attention": "flex_attention", "liger": "off"},
    "gc-flex": {"gradient_checkpointing": "on", "attention": "flex_attention"},
    "flex-compile": {"attention": "flex_attention", "torch_compile": True},
    # per-example attention: torch's flash-attention varlen kernel on a packed batch (worker/packed_attention.py)
    "varlen": {"attention": "sdpa_varlen"},
    "varlen-noliger": {"attention": "sdpa_varlen", "liger": "off"},
}

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]}
LEARNING_RATE = 2e-4
SEED = 42


# ---- measuring ----


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - elapsed()


def make_timed_trainer(base: Any, record: dict[str, Any], cfg: dict[str, Any], budget: Budget) -> Any:
    """A Trainer subclass that counts tokens per batch and times the steps after the warm-up."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    counts: list[tuple[int, int]] = []
    times: dict[int, float] = {}

    class CountingCollator:
        def __init__(self, inner: Callable[[Any], Any], pad_id: int | None) -> None:
            self.inner, self.pad_id = inner, pad_id

        def __call__(self, features: list[dict[str, Any]]) -> Any:
            batch = self.inner(features)
            ids = batch["input_ids"]
            if "attention_mask" in batch:
                real = int(batch["attention_mask"].sum())
            elif self.pad_id is not None:
                real = int((ids != self.pad_id).sum())
            else:
                real = ids.numel()
            counts.append((real, ids.numel()))
            return batch

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                record["memory_at_train_begin_gib"] = torch.cuda.memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            times[0] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times[state.global_step] = time.perf_counter()
            if budget.left() < 0:
                record["stopped_early"] = f"time budget spent at step {state.global_step}"
                control.should_training_stop = True

    class TimedTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            tokenizer = kwargs.get("processing_class")
            pad_id = getattr(tokenizer, "pad_token_id", None)
            kwargs["data_collator"] = CountingCollator(kwargs["data_collator"], pad_id)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StepTimer()]
            super().__init__(*args, **kwargs)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            model = self.model
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record.update(
                trainable_params=trainable,
                bf16_flag=bool(self.args.bf16),
                lm_head_dtype=str(model.get_output_embeddings().weight.dtype),
                trainable_dtypes=sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
                frozen_dtypes=sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
                model_class=type(model).__name__,
                device=str(next(model.parameters()).device),
            )
            try:
                return super().train(*args, **kwargs)
            finally:
                warm, last = cfg["warmup_steps"], max(times) if times else 0
                record["steps_done"] = last
                if last > warm and warm in times:
                    seconds = times[last] - times[warm]
                    window = counts[warm:last]
                    tokens = sum(real for real, _ in window)
                    record.update(
                        timed_steps=last - warm,
                        timed_seconds=round(seconds, 3),
                        tokens_per_s=round(tokens / seconds, 1),
                        padded_tokens_per_s=round(sum(total for _, total in window) / seconds, 1),
                        samples_per_s=round((last - warm) * cfg["batch_size"] / seconds, 2),
                        step_ms=round(1000 * seconds / (last - warm), 1),
                        real_token_fraction=round(tokens / max(1, sum(t for _, t in window)), 4),
                    )
                losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
                record["losses"] = [round(float(loss), 4) for loss in losses]
                if cuda:
                    record["peak_train_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    record["peak_train_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)

    return TimedTrainer


def measured(label: str, results: list[dict[str, Any]], budget: Budget, run: Callable[[dict], None]) -> None:
    """Run one measurement; record its numbers or its error; never raise."""
    import torch

    record: dict[str, Any] = {"run": label}
    results.append(record)
    if budget.left() < 20:
        record["skipped"] = f"time guard: {elapsed():.0f}s elapsed"
        say(f"skip {label}: {record['skipped']}")
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        record["memory_at_start_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    say(f"start {label}")
    started = time.perf_counter()
    try:
        run(record)
    except Exception as error:  # noqa: BLE001 - one failure must not lose the other measurements
        record["error"] = f"{type(error).__name__}: {error}"[:800]
        record["traceback"] = traceback.format_exc()[-3000:]
        print(record["traceback"], flush=True)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    if torch.cuda.is_available():
        record["peak_incl_load_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shown = {k: v for k, v in record.items() if k != "traceback"}
    say(f"done {label}: {json.dumps(shown)}")


# ---- the model ----


def alpaca_rows(path: Path, limit: int | None) -> list[dict[str, str]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return rows[:limit] if limit else rows


def build_model(folder: Path, rows: list[dict[str, str]], cfg: dict[str, Any]) -> dict[str, Any]:
    """A random Llama of the configured shape, saved (bf16 on CUDA) with a BPE tokenizer trained on the data."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from worker.tiny_lm import train_tokenizer

    texts = [value for row in rows for value in row.values() if isinstance(value, str) and value.strip()]
    # A small BPE vocabulary keeps alpaca's token count realistic (a 32k one fitted to 1k rows is not); the
    # embedding and head still have ``vocab_size`` rows, as a real Llama's do.
    tokenizer = train_tokenizer(texts, vocab_size=min(cfg["vocab_size"], 8192))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(
        vocab_size=max(cfg["vocab_size"], len(tokenizer)),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"parameters": params, "tokenizer_vocab": len(tokenizer), "dtype": str(dtype), **config.to_dict()}


# ---- the studio path ----


class Studio:
    """A SQLite studio in a temporary folder with the alpaca dataset uploaded once."""

    def __init__(self, data_file: Path, rows: list[dict[str, str]]) -> None:
        import io

        from sqlmodel import Session

        from app.core.db import get_engine, run_migrations
        from app.services.datasets import create_dataset

        run_migrations()
        with Session(get_engine()) as session:
            payload = json.dumps(rows).encode("utf-8")
            dataset = create_dataset(session, io.BytesIO(payload), data_file.name)
            self.dataset_id = dataset.id

    def run(
        self,
        record: dict[str, Any],
        model_dir: Path,
        method: str,
        cfg: dict[str, Any],
        budget: Budget,
        bf16_patch: bool = False,
    ) -> None:
        from sqlmodel import Session, select

        from app.core.db import get_engine
        from app.core.models import Adapter, Job
        from app.core.spec import JobSpec
        from worker import engine
        from worker import training as training_module

        cuda = __import__("torch").cuda.is_available()
        method_config: dict[str, Any] = dict(LORA)
        if method == "qlora":
            method_config.update(bits=4, quant_type="nf4", double_quant=True)
            method_config["compute_dtype"] = "bfloat16" if cuda else "float32"
        from app.core.spec import TrainingSettings

        training: dict[str, Any] = {
            "max_steps": cfg["warmup_steps"] + cfg["steps"],
            "batch_size": cfg["batch_size"],
            "learning_rate": LEARNING_RATE,
            "lr_scheduler": "constant",
            "max_length": cfg["max_length"],
            "logging_steps": cfg.get("logging_steps", 10),
            "seed": SEED,
            "group_by_length": False,
            **cfg.get("studio_training", {}),
        }
        if "save_steps" in TrainingSettings.model_fields:
            training["save_steps"] = 0  # no resumable checkpoints: the hand-written script writes none either
        spec = JobSpec.model_validate(
            {
                "name": f"gpu check {method}",
                "base_model": str(model_dir),
                "task": "causal-lm",
                "dataset_id": self.dataset_id,
                "validation_fraction": 0.0,
                "method": method,
                "method_config": method_config,
                "training": training,
                "causal_lm": {"packing": cfg.get("packing", True)},
                # FlexAttention (a variant) trains on GPUs only; on the smoke CPU run the variant is skipped
                "resources": {"accelerator": "gpu" if cuda else "any"},
            }
        )
        with Session(get_engine()) as session:
            job = Job(
                name=spec.name or method,
                spec=spec.model_dump(mode="json"),
                method=method,
                base_model=spec.base_model,
                dataset_id=self.dataset_id,
            )
            session.add(job)
            session.commit()
            session.refresh(job)
            job_id = job.id
        record.update(
            path="studio", method=method, job_id=job_id, method_config=method_config, training=training
        )
        original, original_arguments = training_module.Trainer, training_module.training_arguments
        training_module.Trainer = make_timed_trainer(original, record, cfg, budget)  # type: ignore[attr-defined,misc]
        if bf16_patch and __import__("torch").cuda.is_available():
            # What the engine would do with bf16 autocast on CUDA (today it leaves TrainingArguments.bf16 off).
            def with_bf16(*args: Any, **kwargs: Any) -> Any:
                return dataclasses.replace(original_arguments(*args, **kwargs), bf16=True)

            training_module.training_arguments = with_bf16  # type: ignore[assignment]
            record["engine_patch"] = "TrainingArguments.bf16=True"
        try:
            engine.run_job(job_id, worker_name="gpu-check")
        finally:
            training_module.Trainer = original  # type: ignore[attr-defined,misc]
            training_module.training_arguments = original_arguments  # type: ignore[assignment]
        with Session(get_engine()) as session:
            finished = session.get(Job, job_id)
            assert finished is not None
            record["job_status"] = str(
                finished.status.value if hasattr(finished.status, "value") else finished.status
            )
            adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
            if adapter is None:
                raise RuntimeError(f"studio job ended {finished.status}: {finished.error}")
            from app.core.models import JobEvent

            # what the job chose (packing, Liger, precision): its events say so
            record["job_notes"] = [
                event.message
                for event in session.exec(select(JobEvent).where(JobEvent.job_id == job_id)).all()
                if any(
                    word in event.message.lower()
                    for word in ("liger", "packing", "precision", "bf16", "attention")
                )
            ][:6]
            record["adapter_bytes"] = adapter.size_bytes
            record["train_loss"] = adapter.metrics.get("train_loss")


# ---- the hand-written path ----


def handwritten(
    record: dict[str, Any],
    model_dir: Path,
    rows: list[dict[str, str]],
    method: str,
    cfg: dict[str, Any],
    budget: Budget,
    bf16_flag: bool,
) -> None:
    """What a person writes from the QLoRA/peft docs: blocks of max_length tokens, Trainer, LoraConfig."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    cuda = torch.cuda.is_available()
    record.update(path="hand-written", method=method)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [
        (ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT).format(**row)
        + row["output"]
        + tokenizer.eos_token
        for row in rows
    ]
    ids = [token for text in texts for token in tokenizer(text)["input_ids"]]
    length = cfg["max_length"]
    blocks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    dataset = [{"input_ids": b, "attention_mask": [1] * length, "labels": list(b)} for b in blocks]
    record["blocks"] = len(dataset)
    compute = torch.bfloat16 if cuda else torch.float32
    if method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            quantization_config=quantization,
            dtype=compute,
            device_map={"": 0} if cuda else {"": "cpu"},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=compute)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
        ),
    )
    out = tempfile.mkdtemp(prefix="gpu-check-hf-")
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["warmup_steps"] + cfg["steps"],
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        logging_steps=cfg.get("logging_steps", 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        bf16=bf16_flag and cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    timed = make_timed_trainer(Trainer, record, cfg, budget)
    trainer = timed(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    result = trainer.train()
    record["train_loss"] = round(float(result.training_loss), 4)
    shutil.rmtree(out, ignore_errors=True)


# ---- report ----


def versions() -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    found: dict[str, Any] = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "sqlmodel",
        "sqlalchemy",
        "pydantic",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            module = __import__(name)
            found[f"{name}_file"] = str(Path(module.__file__).parent)
        except Exception as error:  # noqa: BLE001
            found[f"{name}_file"] = f"import failed: {error}"
    found["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        found["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        found["capability"] = f"{props.major}.{props.minor}"
    else:
        found["gpu"] = None
    return found


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    def median_of(label: str, key: str) -> float | None:
        values = [
            r[key] for r in results if r["run"].startswith(label) and isinstance(r.get(key), int | float)
        ]
        return round(statistics.median(values), 3) if values else None

    summary: dict[str, Any] = {}
    for kind in ("qlora", "lora"):
        studio_tps, hf_tps = (
            median_of(f"studio-{kind}#", "tokens_per_s"),
            median_of(f"hf-{kind}#", "tokens_per_s"),
        )
        studio_mem, hf_mem = (
            median_of(f"studio-{kind}#", "peak_train_gib"),
            median_of(f"hf-{kind}#", "peak_train_gib"),
        )
        summary[kind] = {
            "studio_tokens_per_s": studio_tps,
            "hf_tokens_per_s": hf_tps,
            "tokens_per_s_ratio": round(studio_tps / hf_tps, 3) if studio_tps and hf_tps else None,
            "studio_peak_train_gib": studio_mem,
            "hf_peak_train_gib": hf_mem,
            "peak_memory_ratio": round(studio_mem / hf_mem, 3) if studio_mem and hf_mem else None,
        }
        curves = {
            path: next(
                (r["losses"] for r in results if r["run"].startswith(f"{path}-{kind}#") and r.get("losses")),
                None,
            )
            for path in ("studio", "hf")
        }
        if curves["studio"] and curves["hf"]:
            tail = min(10, len(curves["studio"]), len(curves["hf"]))
            summary[kind]["loss_last10_studio"] = round(statistics.mean(curves["studio"][-tail:]), 4)
            summary[kind]["loss_last10_hf"] = round(statistics.mean(curves["hf"][-tail:]), 4)
    variants: dict[str, Any] = {}
    for r in results:
        variant, method = r.get("variant"), r.get("method")
        if not variant or variant == "default" or not r.get("tokens_per_s"):
            continue
        hf_tps, hf_mem = (
            median_of(f"hf-{method}#", "tokens_per_s"),
            median_of(f"hf-{method}#", "peak_train_gib"),
        )
        variants[f"{variant} {method}"] = {
            "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_ratio": round(r["tokens_per_s"] / hf_tps, 3) if hf_tps else None,
            "peak_train_gib": r.get("peak_train_gib"),
            "peak_memory_ratio": round(r["peak_train_gib"] / hf_mem, 3)
            if hf_mem and r.get("peak_train_gib")
            else None,
        }
    if variants:
        summary["variants"] = variants
    return summary


def markdown(report: dict[str, Any]) -> str:
    info, model, cfg = report["versions"], report.get("model", {}), report["config"]
    lines = [
        f"GPU check on **{info.get('gpu') or 'CPU (smoke)'}** — torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
        f"transformers {info.get('transformers')}, peft {info.get('peft')}, bitsandbytes {info.get('bitsandbytes')}.",
        "",
        f"Model: random Llama, {model.get('parameters', 0) / 1e9:.2f} B parameters (hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, intermediate {cfg['intermediate_size']}, vocab {model.get('vocab_size')}); "
        f"alpaca, max length {cfg['max_length']}, batch {cfg['batch_size']}, LoRA r {LORA['r']} alpha {LORA['alpha']} "
        f"all-linear, lr {LEARNING_RATE} constant; {cfg['steps']} timed steps after {cfg['warmup_steps']} warm-up steps.",
        "",
        "| run | path | method | tokens/s | samples/s | step (ms) | peak train (GiB) | peak incl. load (GiB) | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["results"]:
        note = (
            r.get("skipped")
            or r.get("error")
            or r.get("stopped_early")
            or (
                f"bf16 flag {r.get('bf16_flag')}, lm_head {r.get('lm_head_dtype', '?').replace('torch.', '')}, "
                f"real tokens {r.get('real_token_fraction')}"
            )
        )
        lines.append(
            f"| {r['run']} | {r.get('path', '')} | {r.get('method', '')} | {r.get('tokens_per_s', '')} "
            f"| {r.get('samples_per_s', '')} | {r.get('step_ms', '')} | {r.get('peak_train_gib', '')} "
            f"| {r.get('peak_incl_load_gib', '')} | {str(note).replace('|', '/')[:160]} |"
        )
    lines += ["", "| comparison (medians) | studio | hand-written | ratio |", "| --- | ---: | ---: | ---: |"]
    for kind, s in report["summary"].items():
        if kind == "variants":
            continue
        lines.append(
            f"| {kind} tokens/s | {s['studio_tokens_per_s']} | {s['hf_tokens_per_s']} | {s['tokens_per_s_ratio']} |"
        )
        lines.append(
            f"| {kind} peak train GiB | {s['studio_peak_train_gib']} | {s['hf_peak_train_gib']} | {s['peak_memory_ratio']} |"
        )
        if "loss_last10_studio" in s:
            lines.append(
                f"| {kind} mean loss, last 10 logged steps | {s['loss_last10_studio']} | {s['loss_last10_hf']} | |"
            )
    variants = report["summary"].get("variants") or {}
    if variants:
        lines += [
            "",
            "| studio variant | tokens/s | ratio to hand-written | peak train GiB | ratio to hand-written |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, v in variants.items():
            lines.append(
                f"| {name} | {v['tokens_per_s']} | {v['tokens_per_s_ratio']} | {v['peak_train_gib']} "
                f"| {v['peak_memory_ratio']} |"
            )
    lines.append("")
    lines.append(f"Total script time {report['elapsed_s']} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU-sized, a few steps")
    parser.add_argument("--site", type=Path, help="carried packages folder (see scripts/gpu_site.sh)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_check"))
    parser.add_argument(
        "--data", type=Path, help="alpaca JSON file (default: SITE/data/alpaca.json or ../shared)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which remaining runs are skipped (default 270; 1200 with --smoke)",
    )
    parser.add_argument(
        "--reps", type=int, default=2, help="interleaved studio/hand-written QLoRA repetitions"
    )
    parser.add_argument(
        "--size", choices=["1b", "7b"], default="1b", help="model shape: TinyLlama-1.1B or Llama-2-7B"
    )
    parser.add_argument(
        "--issue22",
        action="store_true",
        help="issue 22: studio defaults (padding-free packing, liger auto) vs hand-written, QLoRA and LoRA, "
        "loss every step",
    )
    parser.add_argument(
        "--seq", type=int, default=None, help="sequence length (default 512; 2048 with --issue22)"
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8; 4 with --issue22)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="--issue22: studio with gradient checkpointing on"
    )
    parser.add_argument(
        "--variants",
        default="default",
        help="--issue22: comma-separated studio variants beside the defaults: gc (gradient checkpointing), flex "
        "(FlexAttention), compile (torch.compile), gc-flex, flex-compile; each against the same hand-written runs",
    )
    parser.add_argument(
        "--packing",
        choices=["auto", "on", "rows", "off"],
        default="auto",
        help="--issue22: the studio's causal_lm.packing (rows: batch_size counts max-length rows, as the script's "
        "blocks do)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="build the random model here and keep it (another bench, e.g. bench/preference.py --base, reuses it)",
    )
    args = parser.parse_args()

    if args.site:
        bootstrap_site(args.site)
    sys.path.insert(0, str(PROJECT_ROOT))
    data_dir = Path(tempfile.mkdtemp(prefix="gpu-check-studio-"))
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PEFT_STUDIO_DATA_DIR=str(data_dir),
        # the random model is written to a temporary folder: register it (app/core/base_models.py)
        PEFT_STUDIO_MODEL_FOLDERS=json.dumps([tempfile.gettempdir()]),
    )
    os.environ.pop("PEFT_STUDIO_DATABASE_URL", None)
    os.environ.pop("PEFT_STUDIO_BROKER_URL", None)
    args.out.mkdir(parents=True, exist_ok=True)
    data_file = args.data or next(
        (
            p
            for p in [
                args.site and args.site / "data" / "alpaca.json",
                PROJECT_ROOT / ".gpu_site" / "data" / "alpaca.json",
                ALPACA_SHARED,
            ]
            if p and p.exists()
        ),
        ALPACA_SHARED,
    )
    cfg = sizes(args.smoke, args.size)
    if args.issue22:
        cfg.update(
            max_length=args.seq or (cfg["max_length"] if args.smoke else 2048),
            batch_size=args.batch or (cfg["batch_size"] if args.smoke else 4),
            steps=cfg["steps"] if args.smoke else 30,
            warmup_steps=cfg["warmup_steps"] if args.smoke else 3,
            logging_steps=1,
            packing=args.packing,
            studio_training={
                "gradient_checkpointing": "on" if args.checkpointing else "off",
                "liger": "auto",
            },
        )
    else:
        cfg.update({k: v for k, v in (("max_length", args.seq), ("batch_size", args.batch)) if v})
    budget = Budget(args.budget or (1200.0 if args.smoke else 270.0))
    report: dict[str, Any] = {
        "config": cfg,
        "lora": LORA,
        "learning_rate": LEARNING_RATE,
        "data": str(data_file),
        "results": [],
    }
    results: list[dict[str, Any]] = report["results"]

    def write() -> None:
        report["elapsed_s"] = round(elapsed(), 1)
        report["summary"] = summarise(results)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        (args.out / "gpu.md").write_text(markdown(report), encoding="utf-8")

    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    try:
        report["versions"] = versions()
    except Exception as error:  # noqa: BLE001
        report["versions"] = {"error": f"{type(error).__name__}: {error}"}
    say(f"versions: {json.dumps(report['versions'])}")
    write()

    keep_model = args.model_dir is not None
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="gpu-check-model-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    rows = alpaca_rows(data_file, cfg["rows"])
    built: dict[str, Any] = {"run": "build-model"}

    def build(record: dict[str, Any]) -> None:
        record.update(build_model(model_dir, rows, cfg))

    measured("build-model", results, budget, build)
    built = results.pop()
    report["model"] = {
        k: built.get(k) for k in ("parameters", "tokenizer_vocab", "vocab_size", "dtype", "error", "wall_s")
    }
    write()
    if "error" in built:
        say("model build failed; nothing else to measure")
        return

    studio: Studio | None = None
    try:
        studio = Studio(data_file, rows)
    except Exception as error:  # noqa: BLE001
        report["studio_setup_error"] = f"{type(error).__name__}: {error}"
        print(traceback.format_exc(), flush=True)

    def studio_run(
        method: str, bf16_patch: bool = False, variant: str = "default"
    ) -> Callable[[dict[str, Any]], None]:
        def run(record: dict[str, Any]) -> None:
            if studio is None:
                raise RuntimeError(f"studio setup failed: {report.get('studio_setup_error')}")
            overrides = VARIANTS[variant]
            if overrides.get("attention") == "flex_attention" and not __import__("torch").cuda.is_available():
                record["skipped"] = "FlexAttention has no backward pass on CPUs"
                return
            settings = {**cfg, "studio_training": {**cfg.get("studio_training", {}), **overrides}}
            record["variant"] = variant
            studio.run(record, model_dir, method, settings, budget, bf16_patch)

        return run

    def hf_run(method: str, bf16_flag: bool = True) -> Callable[[dict[str, Any]], None]:
        return lambda record: handwritten(record, model_dir, rows, method, cfg, budget, bf16_flag)

    plan: list[tuple[str, Callable[[dict[str, Any]], None]]] = []
    if args.issue22:
        args.reps = 0
        plan += [("studio-qlora#1", studio_run("qlora")), ("hf-qlora#1", hf_run("qlora"))]
        lora_pair = [("studio-lora#1", studio_run("lora")), ("hf-lora#1", hf_run("lora"))]
        # 7 B: the variants on QLoRA before the LoRA pair (the time guard may cut what comes last)
        methods = ["qlora"] if args.size == "7b" else ["qlora", "lora"]
        if args.size != "7b":
            plan += lora_pair
        for variant in [v for v in args.variants.split(",") if v and v != "default"]:
            plan += [(f"studio-{variant}-{m}#1", studio_run(m, variant=variant)) for m in methods]
        if args.size == "7b":
            plan += lora_pair
    for rep in range(1, args.reps + 1):
        plan += [(f"studio-qlora#{rep}", studio_run("qlora")), (f"hf-qlora#{rep}", hf_run("qlora"))]
    if not args.issue22:
        plan += [("studio-lora#1", studio_run("lora")), ("hf-lora#1", hf_run("lora"))]
        plan += [("hf-qlora-nobf16flag#1", hf_run("qlora", bf16_flag=False))]
        plan += [("studio-qlora-bf16patch#1", studio_run("qlora", bf16_patch=True))]
    for label, run in plan:
        measured(label, results, budget, run)
        write()
    if not keep_model:
        shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    write()
    print(markdown(report), flush=True)
    say(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")


if __name__ == "__main__":
    main()
