"""LoRA (Hu et al. 2021) through peft, with the rsLoRA and DoRA switches."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import peft_task_type


class LoraSettings(BaseModel):
    """Low-rank adapters on the chosen linear layers."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(default=16, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input. Off by default: on CPUs it costs more time than it buys "
        "accuracy.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description='Names of the linear layers to adapt (suffix match), or ["all-linear"] for every linear '
        "layer except the output head. Names per architecture: BERT query, key, value, dense; Llama q_proj, "
        "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2 c_attn, c_proj, c_fc.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train.")
    use_rslora: bool = Field(default=False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = Field(default=False, description="DoRA: learn magnitude and direction separately.")


def peft_lora_config(settings: LoraSettings, task: str) -> Any:
    """The peft LoraConfig for these settings (shared by the LoRA family)."""
    from peft import LoraConfig

    targets: Any = settings.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type=peft_task_type(task),
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; any float works
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias=settings.bias,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
    )


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base model with LoRA adapters; only they (and a new classification head) train."""
    from peft import get_peft_model

    assert isinstance(config, LoraSettings)
    return BuiltModel(model=get_peft_model(model, peft_lora_config(config, context.task)))


METHOD = MethodInfo(
    name="lora",
    title="LoRA",
    summary="Low-rank update matrices on chosen linear layers; small, fast, mergeable.",
    config=LoraSettings,
    build=build,
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685); "
    "rsLoRA: Kalajdzievski 2023 (arXiv:2312.03732); DoRA: Liu et al. 2024 (arXiv:2402.09353)",
    learning_rate=5e-4,
)
