"""Try-out inference on a warm base: prediction overhead and adapter switching (used by bench/run_all.py).

    python bench/perf_infer.py [--calls 200] [--adapters 10]

Makes ``--adapters`` LoRA adapters for the bundled MiniLM (random, distinct B matrices: no training needed to
time inference), then, interleaved, measures
- a warm try-out prediction (``worker.inference.classify``, one sentence) against calling the same warm peft
  model directly (tokenize + forward + softmax), and
- switching the warm base between the adapters (``WarmModels.model_for``: ``set_adapter``) against loading
  the base and the adapter afresh (what a server without a warm base does for every request).
Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def make_adapters(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` LoRA adapter folders (as the engine writes them) for the bundled model, each different."""
    import torch
    from transformers import AutoTokenizer

    from app.core.base_models import resolve_base_model
    from app.core.settings import BUNDLED_MODEL_ID
    from app.core.spec import JobSpec
    from worker.methods import BuildContext, get_method
    from worker.recipes import get_recipe

    base = resolve_base_model(BUNDLED_MODEL_ID)
    method = get_method("lora")
    spec = JobSpec.model_validate({"dataset_id": 1, "method": "lora"})
    studio = {
        "format": "peft-studio-adapter/1",
        "method": "lora",
        "task": spec.task,
        "base_model": spec.base_model,
        "labels": ["0", "1"],
        "max_length": 128,
        "spec": spec.model_dump(mode="json"),
    }
    tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    settings = method.config.model_validate(spec.method_config)
    folders = []
    for index in range(count):
        torch.manual_seed(seed + index)
        model = get_recipe(spec.task).load_base(base, studio, {})
        built = method.build(model, settings, BuildContext(task=spec.task, base_model_path=str(base.path)))
        with torch.no_grad():
            for name, parameter in built.model.named_parameters():
                if "lora_B" in name or "classifier" in name:
                    parameter.normal_(0, 0.05)
        folder = root / f"adapter-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        method.save(built.model, str(folder))
        tokenizer.save_pretrained(str(folder))
        (folder / "studio.json").write_text(json.dumps(studio), encoding="utf-8")
        folders.append(folder)
    return folders


def fresh_model(folder: Path) -> Any:
    """Base + adapter loaded from disk, as without a warm cache."""
    from app.core.base_models import resolve_base_model
    from worker.methods import get_method
    from worker.recipes import get_recipe

    studio = json.loads((folder / "studio.json").read_text(encoding="utf-8"))
    base_model = get_recipe(studio["task"]).load_base(resolve_base_model(studio["base_model"]), studio, {})
    model = get_method(studio["method"]).load(base_model, str(folder), "fresh")
    model.eval()
    return model


def summary(values: list[float]) -> dict[str, float]:
    """Median and the interquartile range, in milliseconds."""
    ms = sorted(v * 1000 for v in values)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": round(q[1], 3), "p25_ms": round(q[0], 3), "p75_ms": round(q[2], 3), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--reloads", type=int, default=10)
    options = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["PEFT_STUDIO_INFERENCE_CACHE_SIZE"] = "2"
    import torch

    from worker.inference import WARM, classify

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

    text = ["a gripping , beautifully acted film that never loses its nerve ."]
    with tempfile.TemporaryDirectory() as folder:
        folders = make_adapters(Path(folder), options.adapters)
        ids = list(range(1, len(folders) + 1))
        for adapter_id, path in zip(ids, folders, strict=True):  # load all adapters onto the warm base
            classify(adapter_id, path, text)
        model, tokenizer, studio = WARM.model_for(ids[0], folders[0])

        @torch.inference_mode()
        def direct() -> list[float]:
            batch = tokenizer(text, truncation=True, max_length=128, padding=True, return_tensors="pt")
            return torch.softmax(model(**batch).logits.float(), dim=-1).tolist()[0]

        warm_times, direct_times = [], []
        for call in range(options.calls):  # interleaved, same adapter (no switch)
            order = [("warm", lambda: classify(ids[0], folders[0], text)), ("direct", direct)]
            for name, function in order if call % 2 == 0 else reversed(order):
                started = time.perf_counter()
                function()
                (warm_times if name == "warm" else direct_times).append(time.perf_counter() - started)
        switch_times, switch_predict_times, reload_times, reload_predict_times = [], [], [], []
        for round_ in range(options.reloads):
            for index in range(len(folders)):  # one round: switch through every adapter
                adapter_id, path = ids[index], folders[index]
                started = time.perf_counter()
                WARM.model_for(adapter_id, path)
                switch_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                classify(adapter_id, path, text)
                switch_predict_times.append(time.perf_counter() - started)
            path = folders[round_ % len(folders)]
            started = time.perf_counter()
            fresh = fresh_model(path)
            reload_times.append(time.perf_counter() - started)
            with torch.inference_mode():
                fresh(**tokenizer(text, return_tensors="pt"))
            reload_predict_times.append(time.perf_counter() - started)
            del fresh
        result = {
            "warm_predict": summary(warm_times),
            "direct_predict": summary(direct_times),
            "switch": summary(switch_times),
            "switch_and_predict": summary(switch_predict_times),
            "reload": summary(reload_times),
            "reload_and_predict": summary(reload_predict_times),
            "base_loads": WARM.base_loads,
            "adapters": len(folders),
            "threads": torch.get_num_threads(),
        }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
