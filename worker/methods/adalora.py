"""AdaLoRA (Zhang et al. 2023) via peft: LoRA in SVD form whose rank budget moves to the layers that need it.

peft leaves the budget schedule to the training loop (``update_and_allocate`` after every optimizer step);
transformers' Trainer does not call it, so the method brings a TrainerCallback that does.
"""

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.tasks import CAUSAL_LM, CLASSIFICATION
from worker.methods import BuildContext, BuiltModel, MethodInfo
from worker.methods._common import CHECKPOINT_STATE, CheckpointState, peft_task_type

STATE_TENSORS = "studio_adalora_state.safetensors"
STATE_PATTERN = "studio_adalora_rank_pattern.json"
ALLOCATOR_DICTS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoraSettings(BaseModel):
    """Initial and target rank, the three-phase budget schedule, and the importance smoothing."""

    model_config = ConfigDict(extra="forbid")

    init_r: int = Field(default=12, ge=1, le=1024, description="Rank every adapted matrix starts with.")
    target_r: int = Field(
        default=8, ge=1, le=1024, description="Average rank left per matrix when the budget schedule ends."
    )
    tinit: int = Field(
        default=0, ge=0, description="Warm-up steps at the initial rank before any rank is pruned."
    )
    tfinal: int = Field(
        default=0, ge=0, description="Final steps at the allocated ranks, after pruning has stopped."
    )
    deltaT: int = Field(default=1, ge=1, description="Steps between two budget re-allocations.")
    beta1: float = Field(
        default=0.85, ge=0, lt=1, description="EMA coefficient smoothing the importance (sensitivity) scores."
    )
    beta2: float = Field(
        default=0.85, ge=0, lt=1, description="EMA coefficient of the importance scores' uncertainty."
    )
    alpha: float = Field(default=32, gt=0, description="Scaling numerator of the updates (as in LoRA).")
    orth_reg_weight: float = Field(
        default=0.5, ge=0, description="Weight of the regulariser keeping P and Q orthogonal (SVD form)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description='Linear layers to adapt (suffix match), or ["all-linear"] for every linear layer except '
        "the output head.",
    )

    @model_validator(mode="after")
    def _target_below_init(self) -> "AdaLoraSettings":
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r: AdaLoRA only prunes ranks")
        return self


def check_schedule(settings: AdaLoraSettings, total_steps: int) -> None:
    """AdaLoRA needs a budgeting phase between the warm-up and the final phase."""
    if settings.tinit >= total_steps - settings.tfinal:
        raise ValueError(
            f"AdaLoRA: tinit ({settings.tinit}) + tfinal ({settings.tfinal}) leave no steps for rank "
            f"allocation in a {total_steps}-step run; lower them or train longer."
        )


def peft_adalora_config(settings: AdaLoraSettings, task: str, total_steps: int) -> Any:
    """The peft AdaLoraConfig for these settings."""
    from peft import AdaLoraConfig

    check_schedule(settings, total_steps)
    targets: Any = settings.target_modules
    return AdaLoraConfig(
        task_type=peft_task_type(task),
        init_r=settings.init_r,
        target_r=settings.target_r,
        tinit=settings.tinit,
        tfinal=settings.tfinal,
        deltaT=settings.deltaT,
        beta1=settings.beta1,
        beta2=settings.beta2,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; any float works
        orth_reg_weight=settings.orth_reg_weight,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        total_step=total_steps,
    )


def budget_callback(settings: AdaLoraSettings) -> Any:
    """A TrainerCallback that runs AdaLoRA's rank allocation after each optimizer step (before zero_grad)."""
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            # The schedule must span the steps the Trainer will really run.
            if model is not None and state.max_steps > 0:
                check_schedule(settings, state.max_steps)
                model.peft_config[model.active_adapter].total_step = state.max_steps

        def on_optimizer_step(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if model is not None:
                model.base_model.update_and_allocate(state.global_step)

    return AdaLoraBudget()


def build(model: Any, config: BaseModel, context: BuildContext) -> BuiltModel:
    """Wrap the base with AdaLoRA adapters and hand the Trainer the callback that allocates ranks."""
    from peft import get_peft_model

    assert isinstance(config, AdaLoraSettings)
    total_steps = context.total_steps or config.tinit + config.tfinal + 1
    peft_model = get_peft_model(model, peft_adalora_config(config, context.task, total_steps))
    # ``ranknum`` is a constant; peft re-wraps it as a trainable Parameter when it moves the adapter to
    # another device (GPU, meta), so pin it frozen for the same count everywhere.
    for name, param in peft_model.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    return BuiltModel(model=peft_model, callbacks=[budget_callback(config)])


def save_allocator_state(model: Any, folder: Path) -> None:
    """Write the rank allocator's state next to a checkpoint's tensors: the rank pattern (peft keeps it in the
    adapter config; None until the first budget mask) and the three importance averages (the sensitivity, its
    EMA and the uncertainty EMA, one tensor per LoRA matrix). Without them a resumed run past
    ``total_step - tfinal`` finds no rank pattern (peft crashes), and one before restarts its importance scores.
    """
    from safetensors.torch import save_file

    allocator = model.base_model.rankallocator
    tensors = {
        f"{kind}/{name}": tensor.detach().to("cpu").clone().contiguous()
        for kind in ALLOCATOR_DICTS
        for name, tensor in getattr(allocator, kind).items()
    }
    save_file(tensors, str(folder / STATE_TENSORS))
    pattern = model.peft_config[model.active_adapter].rank_pattern
    (folder / STATE_PATTERN).write_text(json.dumps(pattern), encoding="utf-8")


def load_allocator_state(model: Any, folder: Path) -> None:
    """Put a checkpoint's rank pattern and importance averages into a freshly built AdaLoRA model."""
    from safetensors.torch import load_file

    tensors_path, pattern_path = folder / STATE_TENSORS, folder / STATE_PATTERN
    if not tensors_path.is_file() or not pattern_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {folder.name} has no AdaLoRA allocator state ({STATE_TENSORS}, {STATE_PATTERN}); "
            "it cannot be resumed"
        )
    allocator = model.base_model.rankallocator
    devices = {name: param.device for name, param in model.base_model.model.named_parameters()}
    restored: dict[str, dict[str, Any]] = {kind: {} for kind in ALLOCATOR_DICTS}
    for key, tensor in load_file(str(tensors_path)).items():
        kind, name = key.split("/", 1)
        if name not in devices:
            raise RuntimeError(f"checkpoint {folder.name}: AdaLoRA state for {name!r}, not in the model")
        restored[kind][name] = tensor.to(devices[name])
    for kind, values in restored.items():
        setattr(allocator, kind, values)
    model.peft_config[model.active_adapter].rank_pattern = json.loads(
        pattern_path.read_text(encoding="utf-8")
    )


METHOD = MethodInfo(
    name="adalora",
    title="AdaLoRA",
    summary="LoRA whose rank budget is re-allocated during training to the matrices that matter most.",
    config=AdaLoraSettings,
    build=build,
    # Not preference tuning: trl's DPO/KTO trainers add a second ("ref") adapter to a peft model, and peft's
    # AdaLoRA allows only one trainable adapter per model.
    tasks=(CLASSIFICATION, CAUSAL_LM),
    paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (ICLR 2023, "
    "arXiv:2303.10512)",
    learning_rate=5e-3,
    extra={CHECKPOINT_STATE: CheckpointState(save=save_allocator_state, load=load_allocator_state)},
)
