"""Attention per packed example: padding-free packing without a block-diagonal mask (issue 22).

A packed row holds several examples, each with position ids restarting at 0. transformers keeps them apart
under SDPA by building a block-diagonal causal mask over the whole row, so every row pays dense attention
over its full width and SDPA runs its masked kernel. This attention function (registered with transformers
as ``sdpa_varlen``, ``training.attention`` in docs/performance.md) reads the example boundaries from the
position ids instead and attends within each example only, so attention costs the sum of the squared example
lengths, not the square of the row:

* on a CUDA GPU in bf16/fp16 (no attention dropout) with PyTorch's ``varlen_attn`` (torch >= 2.10): one
  flash-attention varlen call per layer over the whole batch, without the flash-attn package;
* otherwise (CPUs, fp32): SDPA's causal kernel on each example in turn.

Either way the result is the masked attention's (tests/test_packing.py). It falls back to transformers' own
SDPA, with the mask transformers built, whenever a batch is not packed (evaluation batches, padded with an
attention mask; positions that do not restart at 0) or a call comes without position ids. The recipe switches a model to it only for packed
training, and not for models whose sliding window is shorter than an example (worker/recipes/causal_lm.py).
"""

import inspect
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"
# The attention implementations a model may be switched from: per-example SDPA is SDPA's arithmetic.
REPLACES = ("sdpa",)

Segments = list[list[tuple[int, int]]]


class _Packing:
    """Example boundaries of one position-ids tensor (every layer of a forward passes the same one)."""

    def __init__(self, width: int, segments: Segments) -> None:
        self.width = width
        self.segments = segments
        self.longest = max(end - start for row in segments for start, end in row)
        self._cumulative: torch.Tensor | None = None

    def cumulative(self, device: torch.device) -> torch.Tensor:
        """varlen's ``cu_seqlens``: where each example starts in the flattened batch, and the total (int32)."""
        if self._cumulative is None or self._cumulative.device != device:
            starts = [
                index * self.width + start for index, row in enumerate(self.segments) for start, _ in row
            ]
            total = len(self.segments) * self.width
            self._cumulative = torch.tensor([*starts, total], dtype=torch.int32, device=device)
        return self._cumulative


class _Last:
    """The packing of the last position-ids tensor seen, so a forward finds the boundaries once, not per layer."""

    def __init__(self) -> None:
        self.position_ids: torch.Tensor | None = None
        self.packing: _Packing | None = None

    def of(self, position_ids: torch.Tensor) -> _Packing | None:
        if position_ids is not self.position_ids:
            segments = example_segments(position_ids)
            self.position_ids = position_ids
            self.packing = _Packing(position_ids.shape[-1], segments) if segments is not None else None
        return self.packing


_last = _Last()


def example_segments(position_ids: torch.Tensor) -> Segments | None:
    """Per row, the (start, end) of each example: a new one wherever a position does not follow the last.

    None when no row holds more than one example (nothing packed: the masked path is the same work), or when a
    run does not start at position 0: packed examples (and the collators' padding) always do, so anything else
    (e.g. a left-padded batch's positions) is not a packed batch and keeps its mask.
    """
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    if rows.shape[-1] < 2:
        return None
    starts = rows[:, 1:] != rows[:, :-1] + 1
    if not bool(starts.any()):
        return None
    first = torch.cat([torch.ones_like(starts[:, :1]), starts], dim=1)
    if bool((rows[first] != 0).any()):
        return None
    starts = starts.cpu()
    width = rows.shape[-1]
    segments: Segments = []
    for row in starts.tolist():
        cuts = [0, *(index + 1 for index, new in enumerate(row) if new), width]
        segments.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return segments


Kernel = tuple[Callable[..., Any], frozenset[str]]


@lru_cache(maxsize=1)
def _torch_varlen() -> Kernel | None:
    """PyTorch's flash-attention varlen function and its keyword names, or None where it does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kernel(query: torch.Tensor, dropout: float, scaling: float | None = None) -> Kernel | None:
    """The varlen kernel for these inputs: CUDA, half precision, no dropout (it has none), torch >= 2.10, and a
    softmax scale it can take (torch 2.10's has no ``scale``: only the default 1/sqrt(head dim) then)."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return None
    kernel = _torch_varlen()
    if kernel is not None and scaling is not None and "scale" not in kernel[1]:
        if not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-6):
            return None
    return kernel


def _varlen_call(
    kernel: Kernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packing: _Packing,
    scaling: float | None,
) -> torch.Tensor:
    """One varlen call over the whole batch, flattened to (tokens, heads, dim); returns (batch, length, heads, dim)."""
    function, names = kernel
    batch, heads, length, dim = query.shape
    options: dict[str, Any] = {}
    if key.shape[1] != heads:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:
            key = repeat_kv(key, heads // key.shape[1])
            value = repeat_kv(value, heads // value.shape[1])
    if "window_size" in names:  # torch > 2.10: (-1, 0) is causal
        options["window_size"] = (-1, 0)
    else:  # torch 2.10
        options["is_causal"] = True
    if scaling is not None and "scale" in names:
        options["scale"] = scaling

    def flat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(1, 2).reshape(batch * length, tensor.shape[1], dim)

    cumulative = packing.cumulative(query.device)
    output = function(
        flat(query),
        flat(key),
        flat(value),
        cumulative,
        cumulative,
        packing.longest,
        packing.longest,
        **options,
    )
    return output.view(batch, length, heads, dim)


def per_example_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (batch, heads, length, dim) in, (batch, length, heads, dim) out."""
    position_ids = kwargs.get("position_ids")
    packing = None
    length = query.shape[2]
    if position_ids is not None and key.shape[2] == length > 1 and position_ids.shape[-1] == length:
        packing = _last.of(position_ids)
    if packing is None or len(packing.segments) != query.shape[0]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kernel = varlen_kernel(query, dropout, scaling)
    if kernel is not None:
        return _varlen_call(kernel, query, key, value, packing, scaling), None
    rows = []
    for index, row in enumerate(packing.segments):
        examples = [
            sdpa_attention_forward(
                module,
                query[index : index + 1, :, start:end],
                key[index : index + 1, :, start:end],
                value[index : index + 1, :, start:end],
                None,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
            )[0]
            for start, end in row
        ]
        rows.append(torch.cat(examples, dim=1))  # each (1, length, heads, dim)
    return torch.cat(rows, dim=0), None


def register() -> str:
    """Make ``sdpa_varlen`` an attention implementation transformers models can be switched to."""
    AttentionInterface.register(NAME, per_example_attention)
    # The masks it falls back on are SDPA's (evaluation batches with padding need theirs).
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
