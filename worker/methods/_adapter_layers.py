"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) and the Hadamard adapter (Chen et al. 2023)
for transformers models: add them, save them, load them.

peft has neither kind, and the ``adapters`` library pins transformers ~=4.57, so they are written here, small.
This file depends only on torch and safetensors and is copied into every adapter folder of these methods as
``studio_adapters.py``, so a downloaded adapter loads without PEFT Studio::

    from transformers import AutoModelForSequenceClassification
    from studio_adapters import load_adapter

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=2)
    model = load_adapter(base, "path/to/adapter-folder").eval()

An adapter folder holds ``adapter_config.json`` (kind, sizes, where the adapters sit) and
``adapter_model.safetensors`` (adapter weights and the trained classification head, named as in the model).

Placement: an adapter wraps the output projection of a transformer sub-block (attention: BERT's
``attention.output.dense``, Llama's ``self_attn.o_proj``; feed-forward: ``output.dense``,
``mlp.down_proj``), so it acts on the sub-block's output before the residual connection and layer norm,
where Houlsby et al. put it.
It is attached with a forward hook: the base model's own modules and parameter names stay untouched.
"""

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "peft-studio-adapter-layers/1"
CHILD = "studio_adapter"

# Output projections of the attention and feed-forward sub-blocks, relative to one transformer layer.
ATTENTION_OUTPUTS = (
    "attention.output.dense",  # BERT, RoBERTa, ELECTRA, MiniLM
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma
    "attn.c_proj",  # GPT-2
    "attention.out_lin",  # DistilBERT
    "self_attn.out_proj",  # OPT, BART
    "self_attention.dense",  # Falcon, BLOOM
    "attention.dense",  # GPT-NeoX, Pythia
)
FFN_OUTPUTS = (
    "output.dense",  # BERT family
    "mlp.down_proj",  # Llama family
    "mlp.c_proj",  # GPT-2
    "ffn.lin2",  # DistilBERT
    "fc2",  # OPT, BART
    "mlp.dense_4h_to_h",  # Falcon, BLOOM, GPT-NeoX
)
POSITIONS = {"attention": ATTENTION_OUTPUTS, "ffn": FFN_OUTPUTS}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """x + up(f(down(x))). The up projection starts at zero, so the adapter starts as the identity."""

    def __init__(self, hidden: int, size: int, non_linearity: str, like: torch.Tensor) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(hidden, size, **factory)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, hidden, **factory)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class Hadamard(nn.Module):
    """w ⊙ x + b, element-wise over the hidden features; starts as the identity (w = 1, b = 0)."""

    def __init__(self, hidden: int, like: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, device=like.device, dtype=like.dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList of same-class modules holding the most parameters."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer layers (no nn.ModuleList)")
    return best[0], best[1]


def find_output(layer: nn.Module, position: str) -> str:
    """The name, inside one layer, of the projection ending the given sub-block ("attention" or "ffn")."""
    names = dict(layer.named_modules())
    for candidate in POSITIONS[position]:
        if candidate in names:
            return candidate
    raise ValueError(
        f"no known {position} output projection in {type(layer).__name__}; known names: "
        f"{', '.join(POSITIONS[position])}"
    )


def _features(module: nn.Module) -> tuple[int, torch.Tensor]:
    """Output width of a projection (nn.Linear, or GPT-2's Conv1D) and a tensor to take device/dtype from."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    if not isinstance(width, int) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"cannot tell the output width of {type(module).__name__}")
    like = weight if weight.is_floating_point() else torch.empty(0, device=weight.device)
    return width, like


def _apply_adapter(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, CHILD)(output)


def add_adapters(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """Attach the adapters a config describes (see ``adapter_config``); returns the wrapped modules' names."""
    layers_name, layers = layer_stack(model)
    wrapped = []
    for index, layer in enumerate(layers):
        for position in config["positions"]:
            name = find_output(layer, position)
            target = layer.get_submodule(name)
            hidden, like = _features(target)
            if config["kind"] == "hadamard":
                adapter: nn.Module = Hadamard(hidden, like)
            else:
                size = max(1, hidden // int(config["reduction_factor"]))
                adapter = Bottleneck(hidden, size, config["non_linearity"], like)
            target.add_module(CHILD, adapter)
            target.register_forward_hook(_apply_adapter)
            wrapped.append(f"{layers_name}.{index}.{name}")
    return wrapped


def adapter_config(
    kind: str, positions: list[str], reduction_factor: int = 16, non_linearity: str = "relu"
) -> dict:
    """The JSON-able description of an adapter: kind ("bottleneck" or "hadamard"), sub-block positions and,
    for bottlenecks, hidden size / reduction factor and the non-linearity."""
    config: dict[str, Any] = {"format": FORMAT, "kind": kind, "positions": positions}
    if kind == "bottleneck":
        config.update(reduction_factor=reduction_factor, non_linearity=non_linearity)
    return config


def save_adapter(model: nn.Module, folder: str | Path, config: dict[str, Any]) -> None:
    """Write the config and every trainable tensor (adapters and the trained head) to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    base_name = getattr(getattr(model, "config", None), "name_or_path", None)
    full = {**config, "base_model_name_or_path": base_name, "tensors": sorted(tensors)}
    (folder / CONFIG_FILE).write_text(json.dumps(full, indent=2), encoding="utf-8")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach a saved adapter to a freshly loaded base model, load its weights (and head); returns the model.

    The base must be the one the adapter was trained on (same architecture and, for classification, the same
    number of labels). Every tensor in the file must match a parameter of the model, and every adapter layer
    and listed tensor must be in the file, or this raises.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a PEFT Studio adapter-layers config")
    add_adapters(model, config)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"the adapter has tensors the model lacks (another base model?): {unknown[:5]}")
    # Every adapter layer just added, and every tensor the config lists, must come from the file: a missing
    # one would silently stay at its initial value (an identity adapter, an untrained head).
    needed = {name for name in params if f".{CHILD}." in name} | set(config.get("tensors") or ())
    missing = sorted(needed - set(tensors))
    if missing:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} lacks {len(missing)} tensor(s) the adapter needs (an incomplete or edited "
            f"file?): {missing[:5]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} in the adapter, {tuple(params[name].shape)} "
                    "in the model (another base model or label count?)"
                )
            params[name].copy_(tensor)
    return model
