"""QLoRA: LoRA on a base model whose linear weights are quantized by bitsandbytes (4-bit NF4/FP4 or 8-bit).

The quantization happens while the base loads (``load_kwargs``), so the try-out and a fresh reload quantize
the same weights the same way. A newly initialised head is kept out of quantization: its random weights are
not in the checkpoint, and bitsandbytes cannot quantize what is not loaded (the first forward fails).

bitsandbytes 0.50 has two CPU paths for 4-bit layers. On a CPU with AVX-512 BF16 it repacks a layer's weights
for a fused bf16 kernel on the first forward in eval mode without gradients (try-out, evaluation); elsewhere
(and always in training) it dequantizes to the compute dtype. ``guard_4bit_layers`` makes both paths safe:

- A layer the fused kernel cannot take (input width not a multiple of the 64-wide quantization block, or an
  output width not a multiple of its 32-row tiles) stays 4-bit but keeps the dequantizing path: the repack
  would crash on it (``shape '[32, 0]' is invalid``). Real models have no such layers; tiny test models do.
- ``state_dict()`` of a repacked layer unpacks it in place, and bitsandbytes' inverse re-quantizes the
  double-quantized scales: every save (adapter, checkpoint) after an evaluation silently changed the frozen
  base in memory, so the trained model drifted from what a reload gives. The guard makes saving read an
  unpacked copy and leave the layer as it is.
"""

import copy
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from worker.methods import BuildContext, BuiltModel, MethodInfo, load_peft_adapter
from worker.methods.lora import LoraSettings, peft_lora_config

# Heads that stay in full precision: new classification heads (BERT, DistilBERT, Llama/GPT-2 "score") and the
# language-model head (bitsandbytes' own default, which setting llm_int8_skip_modules replaces).
UNQUANTIZED_MODULES = ["classifier", "pre_classifier", "score", "lm_head"]


class QLoraSettings(LoraSettings):
    """LoRA settings plus how the frozen base is quantized."""

    bits: Literal[4, 8] = Field(
        default=4, description="Bits per base weight: 4 (QLoRA proper) or 8 (LLM.int8)."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit data type: NF4 (normal float, best for normally distributed weights) or FP4.",
    )
    double_quant: bool = Field(
        default=True,
        description="4-bit: quantize the quantization constants too (saves ~0.4 bit per weight).",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="4-bit: dtype the weights are dequantized to for each matmul. auto: bfloat16 on a GPU "
        "that supports it, else float32 (bf16 is much slower on CPUs without AMX).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, ~30% more compute.",
    )

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_from_text(cls, value: Any) -> Any:
        # An HTML form posts the choice as text; the API sends a number.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def resolved_compute_dtype(choice: str) -> str:
    """``auto`` becomes bfloat16 on a CUDA device with bf16 support, else float32."""
    if choice != "auto":
        return choice
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def quantization_kwargs(config: BaseModel, context: BuildContext) -> dict[str, Any]:
    """The BitsAndBytesConfig the base model loads with."""
    import torch
    from transformers import BitsAndBytesConfig

    assert isinstance(config, QLoraSettings)
    if config.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant_type,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, resolved_compute_dtype(config.compute_dtype)),
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    return {"quantization_config": quantization}


# The fused CPU kernel's tiles: rows in blocks of 32, and the 4-bit quantization block along the input.
FUSED_CPU_ROW_BLOCK = 32


def fused_cpu_kernel_fits(layer: Any) -> bool:
    """True when bitsandbytes' fused AVX-512 BF16 kernel can repack this 4-bit layer's weights."""
    state = getattr(layer.weight, "quant_state", None)
    blocksize = getattr(state, "blocksize", 64)
    return layer.in_features % blocksize == 0 and layer.out_features % FUSED_CPU_ROW_BLOCK == 0


def _save_unpacked_copy(layer: Any, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
    """``Linear4bit._save_to_state_dict`` without unpacking the layer in place (see the module docstring)."""
    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        type(layer)._save_to_state_dict(layer, destination, prefix, keep_vars)
        return
    # The inverse assigns new fields to the state it is given: a shallow copy keeps the layer's own intact.
    weight, unpacked = _convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(), copy.copy(state))
    torch.nn.Module._save_to_state_dict(layer, destination, prefix, keep_vars)
    destination[prefix + "weight"] = weight
    for key, value in unpacked.as_dict(packed=True).items():
        destination[prefix + "weight." + key] = value if keep_vars else value.detach()


def guard_4bit_layers(model: Any, training: bool = False) -> int:
    """Make every 4-bit layer of ``model`` safe on both bitsandbytes CPU paths; returns how many kept the
    dequantizing path because the fused kernel cannot take them.

    ``training`` (the studio's training and its reload): every layer keeps the dequantizing path. The fused
    kernel is for inference only (it has no backward): an evaluation in the middle of training (eval mode, no
    gradients) would repack the weights, and the next training step would then run the fused kernel and fail
    (bitsandbytes adds the bias in place to its output: "a view of a leaf Variable that requires grad is being
    used in an in-place operation"). The reload uses the same path so that it reproduces the trained logits."""
    import types

    import bitsandbytes as bnb

    kept = 0
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        layer._save_to_state_dict = types.MethodType(_save_unpacked_copy, layer)  # type: ignore[method-assign]
        if getattr(layer, "support_avx512bf16_for_cpu", False) and (
            training or not fused_cpu_kernel_fits(layer)
        ):
            layer.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Prepare the quantized base for training (norms in fp32, inputs requiring grad), then add LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    assert isinstance(config, QLoraSettings)
    guard_4bit_layers(model, training=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return BuiltModel(model=get_peft_model(model, peft_lora_config(config, context.task)))


def load(base_model: Any, folder: str, adapter_name: str) -> Any:
    """Put a saved QLoRA adapter onto a freshly quantized base, on the same (dequantizing) kernel as the trained
    one, so the reloaded adapter gives the trained model's logits exactly."""
    guard_4bit_layers(base_model, training=True)
    return load_peft_adapter(base_model, folder, adapter_name)


METHOD = MethodInfo(
    name="qlora",
    quantized=True,
    title="QLoRA",
    summary="LoRA on a 4-bit (NF4/FP4, double-quant) or 8-bit frozen base: the least memory for big models.",
    config=QLoraSettings,
    build=build,
    load_kwargs=quantization_kwargs,
    load=load,
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314); "
    "8-bit: Dettmers et al. 2022, LLM.int8() (arXiv:2208.07339)",
    learning_rate=5e-4,
)
