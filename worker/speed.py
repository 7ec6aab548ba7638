"""Speed and memory settings of a training run (issue 22, docs/performance.md): optimizer, gradient
checkpointing, torch.compile, Liger Kernel, and FSDP sharding across the processes of one job.

Everything here turns a job's settings into Trainer arguments or a change to the model before the method is
applied; worker/training.py calls it. Liger Kernel is optional (the ``gpu`` extra): it is applied only on CUDA,
when importable, to the architectures it patches, and the job's events say what was chosen and why.

FSDP goes through accelerate (transformers' ``fsdp`` arguments, FSDP2 ``fully_shard``). accelerate only
shards on accelerators; on a CPU it would quietly fall back to DDP, so ``ShardedTrainer`` puts the FSDP plugin
into the accelerator state itself when the ranks are CPU (gloo) ones: the same FSDP2 code path then runs on
CPUs, which is how tests/test_fsdp.py checks it. Under FSDP each rank holds a shard of every weight, so saving
first gathers the full state dict (a collective every rank joins: ``gather_state``) and rank 0 writes whole
adapters or models from it; a resumed run scatters the checkpoint's trainable tensors back the same way.
"""

import logging
from typing import Any

from app.core.spec import JobSpec

log = logging.getLogger(__name__)

# transformers' optim names for the job's optimizer setting.
OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}

# model_type values Liger Kernel patches (liger_kernel.transformers' MODEL_TYPE_TO_APPLY_LIGER_FN) among the
# families the studio supports: Llama, Mistral, Qwen, Gemma, Phi.
LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def trainer_options(spec: JobSpec) -> dict[str, Any]:
    """TrainingArguments for the job's optimizer, gradient checkpointing and torch.compile settings."""
    training = spec.training
    checkpointing = training.gradient_checkpointing == "on"
    return {
        "optim": OPTIMIZERS[training.optimizer],
        "gradient_checkpointing": checkpointing,
        # Non-reentrant: works with frozen inputs (adapters) and never needs inputs that require grad.
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "torch_compile": training.torch_compile,
    }


def liger_choice(spec: JobSpec, model: Any, cuda: bool | None = None) -> tuple[bool, str]:
    """Whether to apply Liger Kernel to this model, and the sentence the job's events show about it."""
    if spec.training.liger == "off":
        return False, "liger: off (the job's setting)"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return False, "liger: off, its Triton kernels need a CUDA GPU and this worker has none"
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in LIGER_MODEL_TYPES:
        return False, f"liger: off, it has no kernels for {model_type or 'this'} models"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return (
            False,
            "liger: off, liger-kernel is not installed on this worker (pip install 'peft-studio[gpu]')",
        )
    return True, f"liger: on ({model_type}: fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy)"


def apply_liger(model: Any) -> None:
    """Patch a loaded base model in place with Liger Kernel's modules (before the method wraps it)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


# ---- FSDP (resources.strategy) ----------------------------------------------------------------------------------------------


def fsdp_arguments(model: Any) -> dict[str, Any]:
    """TrainingArguments that shard the model with FSDP2 over the job's processes, one unit per layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(getattr(base, "_no_split_modules", None) or [])
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": True,
        # Every rank builds the same weights (same seed, same files): nothing to broadcast. accelerate's
        # broadcast also needs an accelerator device.
        "sync_module_states": False,
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT",
    }
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    return {"fsdp": "full_shard auto_wrap" if layers else "full_shard", "fsdp_config": config}


def gather_state(model: Any) -> dict[str, Any]:
    """The full state dict of an FSDP-sharded model on rank 0 (CPU tensors; empty on the other ranks).

    A collective: every rank must call it at the same point.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def scatter_state(model: Any, state: dict[str, Any]) -> None:
    """Load full tensors (every rank holds them all) into an FSDP-sharded model; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def sharded_parameters(model: Any) -> int:
    """How many of the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(param, DTensor) for param in model.parameters())


def trainable_names(model: Any) -> list[str]:
    """Names of the trainable parameters (FSDP2 keeps the module's own names)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


class GatheredState:
    """The full state dict the last save gathered (rank 0), for the studio's own checkpoint and adapter."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None


def sharded_trainer_class(base: type, gathered: GatheredState, on_cpu: bool) -> Any:
    """A Trainer class (``base``) that shards with FSDP also on CPU ranks and saves gathered weights.

    ``save_model`` (called by the Trainer at each checkpoint, on every rank) gathers the full state into
    ``gathered`` instead of writing model files the studio does not use (its own ``save_trainable`` and
    adapter folder are written from the gathered state by rank 0's checkpoint callback).
    """

    class ShardedTrainer(base):  # type: ignore[valid-type,misc]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if on_cpu and getattr(state, "fsdp_plugin", None) is None and self.args.fsdp_plugin_args:
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            gathered.state = gather_state(self.model_wrapped)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            from pathlib import Path

            from safetensors.torch import load_file

            from worker.resilience import TRAINABLE_FILE

            if model is None:  # called before wrapping; the Trainer calls again with the sharded model
                return
            path = Path(resume_from_checkpoint) / TRAINABLE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {path.parent.name} has no {TRAINABLE_FILE}; it cannot be resumed"
                )
            state = load_file(str(path))
            expected = set(trainable_names(model))
            if set(state) != expected:
                raise RuntimeError(
                    f"checkpoint {path.parent.name} does not fit the rebuilt model: "
                    f"missing {sorted(expected - set(state))[:5]}, "
                    f"unexpected {sorted(set(state) - expected)[:5]}"
                )
            scatter_state(model, state)

    return ShardedTrainer


def save_trainable_from(state: dict[str, Any], names: list[str], folder: Any) -> None:
    """``worker.resilience.save_trainable`` from a gathered state dict (same file, same names)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from worker.resilience import TRAINABLE_FILE

    save_file({name: state[name].contiguous() for name in names}, str(Path(folder) / TRAINABLE_FILE))


def save_gathered(model: Any, folder: str, state: dict[str, Any]) -> None:
    """Write a peft adapter or a transformers model from a gathered full state dict (rank 0)."""
    model.save_pretrained(folder, state_dict=state)


def choose_strategy(spec: JobSpec, device: str) -> tuple[str, str]:
    """DDP or FSDP for a multi-process job, and why (``auto``: FSDP when the estimate does not fit one GPU)."""
    chosen = spec.resources.strategy
    if chosen != "auto":
        return chosen, f"{chosen} (the job's setting)"
    if device != "cuda":
        return "ddp", "ddp (auto: CPU ranks share one host's memory, sharding saves none of it)"
    try:
        import torch

        from app.core.db import session_scope
        from app.core.models import Dataset
        from worker.estimate import estimate_job, gpu_fit

        with session_scope() as session:
            dataset = session.get(Dataset, spec.dataset_id)
            profile = dataset.profile if dataset is not None else None
        needed = gpu_fit(estimate_job(spec, profile).memory.total_bytes)["peak_bytes"]
        available = torch.cuda.get_device_properties(0).total_memory
    except Exception as exc:  # no estimate: replicate, as before this setting existed
        log.warning("no memory estimate for the strategy: %s", exc)
        return "ddp", f"ddp (auto: no memory estimate, {type(exc).__name__})"
    gb = f"about {needed / 10**9:.0f} GB per process, the GPU has {available / 10**9:.0f} GB"
    if needed > available:
        return "fsdp", f"fsdp (auto: the estimate does not fit one GPU: {gb})"
    return "ddp", f"ddp (auto: the estimate fits one GPU: {gb})"
