"""Issue 22 on the CPU, in one command: FLOP rates against a GEMM, packing modes, torch.compile, studio/script.

    .venv/bin/python bench/perf_speed.py [--rounds 2] [--rows 512] [--lm-rows 200]

Each configuration is one ``bench/perf_train.py`` process (fresh interpreter and database), rounds alternate
the order, and every process also measures its own 1024³ fp32 GEMM rate, so a FLOP rate is a ratio against a
baseline taken in the same process at the same load:

* SST-2, the studio's default LoRA job (``studio --gemm``): real-token FLOP rate / GEMM (target >= 60 %).
* SST-2, studio and hand-written Trainer + peft script with the same hyper-parameters: samples/s ratio.
* Alpaca on a Llama-shaped LM (hidden 512, 4 layers, rows of 512 tokens), ``causal_lm.packing`` off / rows /
  on (padding-free): real-token FLOP rate / GEMM (target >= 80 % packed), padding share, samples/s.
  Packed rows use ``training.attention`` auto (``sdpa_varlen`` on a CPU: attention per example); the
  ``*_masked`` configurations keep SDPA's block-diagonal mask over each row, as auto did before.
* the same with ``training.torch_compile`` (packing on): kept only where it pays.

Writes bench/results/perf-speed.json and prints a Markdown table for docs/benchmarks.md. FLOPs count the Linear
layers on real tokens (4 per frozen weight, 6 per trainable weight, per token), as bench/run_all.py does.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from run_all import child, flops, load, make_tiny_llama  # noqa: E402

RESULT_FILE = ROOT / "bench" / "results" / "perf-speed.json"


def configurations(base: Path, rows: int, lm_rows: int) -> dict[str, list[str]]:
    """Name → perf_train.py arguments."""
    sst2 = ["--rows", str(rows), "--dev-rows", "64", "--no-eval", "--gemm"]
    lm = [
        "studio-lm",
        "--base",
        str(base),
        "--rows",
        str(lm_rows),
        "--max-length",
        "512",
        "--batch-size",
        "8",
    ]
    return {
        "sst2_studio_defaults": ["studio", *sst2],
        "sst2_studio_same": ["studio", "--dropout", "--no-group", *sst2],
        "sst2_script": ["script", "--dropout", "--rows", str(rows), "--dev-rows", "64", "--gemm"],
        "lm_off": [*lm, "--packing", "off", "--gemm"],
        "lm_rows": [*lm, "--packing", "rows", "--gemm"],
        "lm_on": [*lm, "--packing", "on", "--gemm"],
        "lm_on_masked": [*lm, "--packing", "on", "--attention", "sdpa", "--gemm"],
        "lm_rows_masked": [*lm, "--packing", "rows", "--attention", "sdpa", "--gemm"],
        "lm_on_compiled": [*lm, "--packing", "on", "--torch-compile", "--gemm"],
    }


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per configuration: FLOP rate / GEMM, samples/s, padding share."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        good = [r for r in results if r.get("train_seconds") and r.get("gemm_gflops")]
        if not good:
            out[name] = {"error": [r.get("error") for r in results][:1]}
            continue
        rates = [flops(r) / r["train_seconds"] / 1e9 for r in good]
        gemms = [r["gemm_gflops"]["median"] for r in good]
        out[name] = {
            "flop_rate_gflops": round(statistics.median(rates), 2),
            "gemm_gflops": round(statistics.median(gemms), 1),
            "flop_fraction": round(
                statistics.median([rate / gemm for rate, gemm in zip(rates, gemms, strict=True)]), 3
            ),
            "samples_per_second": round(statistics.median(r["samples_per_second"] for r in good), 2),
            "padding_share": round(
                statistics.median(1 - r["real_tokens"] / r["padded_tokens"] for r in good), 3
            ),
            "train_seconds": [r["train_seconds"] for r in good],
            "n": len(good),
        }
    return out


def table(stats: dict[str, Any], loads: list[list[float]]) -> str:
    """The Markdown table for docs/benchmarks.md."""

    def cell(name: str, key: str, percent: bool = False) -> str:
        value = stats.get(name, {}).get(key)
        if value is None:
            return "–"
        return f"{value * 100:.0f} %" if percent else f"{value}"

    lines = [
        "| configuration | FLOP rate / GEMM | GFLOP/s (GEMM) | samples/s | padding |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in stats:
        lines.append(
            f"| {name} | {cell(name, 'flop_fraction', True)} | {cell(name, 'flop_rate_gflops')} "
            f"({cell(name, 'gemm_gflops')}) | {cell(name, 'samples_per_second')} | "
            f"{cell(name, 'padding_share', True)} |"
        )
    same, script = stats.get("sst2_studio_same", {}), stats.get("sst2_script", {})
    if same.get("samples_per_second") and script.get("samples_per_second"):
        ratio = same["samples_per_second"] / script["samples_per_second"]
        lines.append(f"\nstudio / script samples/s (same hyper-parameters, SST-2): {ratio:.2f}")
    on, compiled = stats.get("lm_on", {}), stats.get("lm_on_compiled", {})
    if on.get("samples_per_second") and compiled.get("samples_per_second"):
        ratio = compiled["samples_per_second"] / on["samples_per_second"]
        lines.append(f"torch.compile / eager samples/s (Alpaca, packing on): {ratio:.2f}")
    lines.append(f"load average (1, 5, 15 min) before each round: {loads}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512, help="SST-2 training rows")
    parser.add_argument("--lm-rows", type=int, default=200, help="Alpaca rows")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these configurations (adds to --out)"
    )
    parser.add_argument("--out", default=None, help=f"result file (default {RESULT_FILE.relative_to(ROOT)})")
    options = parser.parse_args()
    # The random Llama is written to a temporary folder: register it as a model folder (app/core/base_models.py).
    os.environ["PEFT_STUDIO_MODEL_FOLDERS"] = json.dumps([tempfile.gettempdir()])
    runs: dict[str, list[dict[str, Any]]] = {}
    loads: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as folder:
        base = make_tiny_llama(Path(folder) / "llama")
        configs = configurations(base, options.rows, options.lm_rows)
        names = [n for n in configs if options.only is None or n in options.only]
        for number in range(options.rounds):
            loads.append(load())
            for name in names if number % 2 == 0 else list(reversed(names)):
                print(f"round {number + 1}: {name} (load {load()}) …", flush=True)
                result = child([str(ROOT / "bench" / "perf_train.py"), *configs[name]])
                runs.setdefault(name, []).append(result)
                print(f"  {json.dumps(result)[:300]}", flush=True)
    result_file = Path(options.out) if options.out else RESULT_FILE
    if result_file.exists() and options.only:  # a partial rerun adds to the earlier configurations
        earlier = json.loads(result_file.read_text())["runs"]
        runs = {**{k: v for k, v in earlier.items() if k not in runs}, **runs}
    stats = summary(runs)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps({"runs": runs, "summary": stats, "loads": loads}, indent=2))
    print(table(stats, loads))


if __name__ == "__main__":
    main()
