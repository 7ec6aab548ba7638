"""Both bitsandbytes 4-bit CPU paths, whatever CPU the tests run on.

bitsandbytes 0.50 decides per 4-bit layer, when the layer is built, whether the CPU has AVX-512 BF16
(``has_avx512bf16()``, imported into ``bitsandbytes.nn.modules``). With it, an eval-mode forward without
gradients repacks the weights (bf16 scales) for a fused kernel; without it, every forward dequantizes. The
suite once passed on one kind of CPU and failed on the other, so QLoRA tests run under ``force_cpu_path`` for
both, and no host can hide a failure of either.

Forcing the fused path on a CPU without the instructions cannot run bitsandbytes' kernel (it would be an
illegal instruction), so there ``gemv_4bit`` is replaced by ``emulated_fused_gemv``: the same packed layout,
scales and bf16 rounding, written in torch. Everything the studio controls (the repack, saving a repacked
layer, narrow layers) then runs exactly as on such a CPU; ``test_emulated_fused_kernel_matches`` checks the
emulation against the real kernel where the host has it, and against the dequantizing path everywhere.
"""

from collections.abc import Callable
from typing import Any

import pytest

FUSED = "fused-bf16"
DEQUANTIZE = "dequantize"
CPU_PATHS = [DEQUANTIZE, FUSED]


def host_has_avx512bf16() -> bool:
    """What bitsandbytes' own CPU check says about this machine."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def unpack_fused_codes(packed: Any, rows: int, columns: int, row_block: int = 32) -> Any:
    """The [rows, columns] 4-bit codes of a weight repacked by ``_convert_weight_packed_for_cpu``."""
    import torch

    pairs = packed.reshape(-1, row_block)
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)  # low nibbles are the first 32 of each 64
    codes = codes.reshape(rows // row_block, columns // 2, row_block, 2).transpose(1, 2)
    return codes.reshape(rows, columns)


def emulated_fused_gemv(original: Callable[..., Any]) -> Callable[..., Any]:
    """``bitsandbytes.functional.gemv_4bit`` for repacked weights without the AVX-512 BF16 kernel."""

    def gemv_4bit(A: Any, B: Any, out: Any = None, transposed_A: bool = False, transposed_B: bool = False,
                  state: Any = None) -> Any:  # fmt: skip
        import torch

        if state is None or not getattr(state, "packing_format_for_cpu", False):
            return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        rows, columns = state.shape
        codes = unpack_fused_codes(B.view(torch.uint8), rows, columns)
        scales = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)  # bf16 scales, [rows, K]
        weight = (state.code.float()[codes.long()] * scales).to(torch.bfloat16)
        result = (A.to(torch.bfloat16).float() @ weight.float().T).to(torch.bfloat16).to(A.dtype)
        if out is not None:
            out.copy_(result)
            return out
        return result

    return gemv_4bit


def force_cpu_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit layers built from now on in this test take ``path`` (FUSED or DEQUANTIZE) whatever this CPU has."""
    import bitsandbytes.functional as functional
    import bitsandbytes.nn.modules as modules

    fused = path == FUSED
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: fused)
    if fused and not host_has_avx512bf16():
        monkeypatch.setattr(functional, "gemv_4bit", emulated_fused_gemv(functional.gemv_4bit))


def method_params(names: list[str]) -> list[Any]:
    """``pytest.param`` rows for a method-parametrized test: QLoRA once per CPU path, the others once."""
    rows = []
    for name in names:
        paths = CPU_PATHS if name == "qlora" else [None]
        rows += [pytest.param(name, path, id=f"{name}-{path}" if path else name) for path in paths]
    return rows
