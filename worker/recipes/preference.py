"""Preference tuning: DPO (and IPO), ORPO, SimPO and KTO through trl's trainers, on any method of the studio.

The studio renders the examples through the job's chat template (worker/recipes/preference_data.py) and hands
trl the prompt, chosen and rejected texts; trl tokenizes them, masks the prompt and computes the loss and the
rewards it logs (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/*``), which the studio's reporting callback writes as metric points like any other logged value.

The reference model (DPO, IPO, KTO; ORPO and SimPO need none): for a method that makes a peft adapter, the base
with the adapter switched off (trl's ``use_adapter(None)``), so no second copy of the weights is loaded; a job
that continues a supervised adapter keeps that adapter's starting weights as trl's ``ref`` adapter (a copy of the
adapter only), so the reference is the supervised model. Other methods (full fine-tuning, freeze, layer-wise
rates, the studio's own adapters) change the base's own weights, so a frozen reference copy of the base model is
loaded explicitly: one more set of base weights in memory (the estimate counts it).
"""

import logging
from typing import Any

from app.core.base_models import ResolvedModel
from app.core.db import session_scope
from app.core.models import Adapter, Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store
from app.core.tasks import PREFERENCE
from worker.recipes import Prepared, Recipe
from worker.recipes.causal_lm import _load_kwargs
from worker.recipes.causal_lm_data import load_tokenizer
from worker.recipes.preference_data import job_renderer, preference_data

log = logging.getLogger(__name__)

REFERENCE_FREE = ("orpo", "simpo")


def needs_reference_copy(spec: JobSpec) -> bool:
    """True when the job loads a frozen copy of the base as its reference: a loss with a reference model and a
    method that changes the base's own weights (not a peft adapter, which can be switched off)."""
    from worker.methods import get_method

    return spec.preference.loss not in REFERENCE_FREE and get_method(spec.method).saved_as != "peft"


def trainer_setup(spec: JobSpec) -> tuple[Any, Any, dict[str, Any]]:
    """trl's Trainer class, its config class and the config values of the job's loss."""
    settings = spec.preference
    beta = settings.resolved_beta()
    common: dict[str, Any] = {
        "max_length": spec.training.max_length,
        "disable_dropout": spec.training.disable_dropout,
        "gradient_checkpointing": False,
        "dataset_num_proc": None,
    }
    if settings.loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        loss_type = ["sigmoid"] if settings.loss == "dpo" else ["ipo"]
        extra = {"loss_type": loss_type, "beta": beta, "label_smoothing": settings.label_smoothing}
        return DPOTrainer, DPOConfig, {**common, **extra}
    if settings.loss == "kto":
        from trl import KTOConfig, KTOTrainer

        extra = {
            "beta": beta,
            "desirable_weight": settings.desirable_weight,
            "undesirable_weight": settings.undesirable_weight,
            # KTO's KL estimate pairs each answer with its neighbours in a fixed-order batch (trl requires it).
            "train_sampling_strategy": "sequential",
        }
        return KTOTrainer, KTOConfig, {**common, **extra}
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in trl 1.x
    common.pop("gradient_checkpointing")
    common.pop("dataset_num_proc")
    common["max_completion_length"] = spec.training.max_length
    if settings.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, {**common, "beta": beta, "gradient_checkpointing": False}
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # SimPO is CPO's simpo loss with the behaviour-cloning term off (cpo_alpha 0), as trl documents it.
    simpo = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": beta, "simpo_gamma": settings.simpo_gamma}
    return CPOTrainer, CPOConfig, {**common, **simpo, "gradient_checkpointing": False}


def _adapter_folder(adapter_id: int) -> tuple[Adapter, str]:
    with session_scope() as session:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None:
            raise ValueError(f"adapter {adapter_id} (preference.continue_from_adapter_id) was deleted")
        session.expunge(adapter)
    return adapter, str(get_store().local_dir(adapter.storage_key))


def _continued(model: Any, spec: JobSpec, adapter_id: int) -> Any:
    """The base model with a saved supervised adapter loaded as the trainable ``default`` adapter."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from worker.methods import get_method

    _, folder = _adapter_folder(adapter_id)
    if get_method(spec.method).quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


def _drop_reference_adapter(trainer: Any) -> None:
    """A new adapter's reference is the base with it switched off: drop trl's copy of the fresh adapter."""
    model = trainer.model
    config = getattr(model, "peft_config", None)
    if config and "ref" in config:
        try:
            model.delete_adapter("ref")
        except (AttributeError, ValueError, NotImplementedError) as exc:  # prompt learning: keep trl's copy
            log.info("kept trl's reference adapter copy: %s", exc)


def prepare(
    spec: JobSpec,
    base: ResolvedModel,
    train: Dataset,
    validation: Dataset | None,
    load_kwargs: dict[str, Any],
) -> Prepared:
    """Render the examples, load the base model (and a frozen reference copy where the method needs one)."""
    from datasets import Dataset as HFDataset
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.core.safety import remote_code_allowed
    from worker.recipes.classification import without_dropout

    tokenizer = load_tokenizer(str(base.path))
    renderer, template_name = job_renderer(spec, tokenizer)
    data = preference_data(spec, train, validation, renderer)
    config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=remote_code_allowed(base.model_id))
    if spec.training.disable_dropout:
        config = without_dropout(config)
    config.use_cache = False
    kwargs = _load_kwargs(load_kwargs, base)
    model = AutoModelForCausalLM.from_pretrained(str(base.path), config=config, **kwargs)
    settings = spec.preference
    continued = settings.continue_from_adapter_id is not None
    if continued:
        model = _continued(model, spec, int(settings.continue_from_adapter_id or 0))
    trainer_kwargs: dict[str, Any] = {}
    if needs_reference_copy(spec):
        reference = AutoModelForCausalLM.from_pretrained(str(base.path), config=config, **kwargs)
        reference.eval()
        for param in reference.parameters():
            param.requires_grad_(False)
        trainer_kwargs["ref_model"] = reference
    trainer_class, args_class, args_extra = trainer_setup(spec)
    # trl's datasets hold prompt/answer ids, not input_ids: transformers' length grouping cannot read them.
    args_extra.setdefault("train_sampling_strategy", "random")
    train_records = [example.record() for example in data.train]
    eval_records = [example.record() for example in data.eval]
    return Prepared(
        tokenizer=tokenizer,
        model=model,
        train_dataset=HFDataset.from_list(train_records),
        eval_dataset=HFDataset.from_list(eval_records) if eval_records else [],
        collator=None,
        compute_metrics=None,
        trainer_class=trainer_class,
        args_class=args_class,
        args_extra=args_extra,
        trainer_kwargs=trainer_kwargs,
        after_trainer=None if continued else _drop_reference_adapter,
        trainable=continued,
        metadata={
            "template": template_name,
            "data_format": settings.format,
            "system_prompt": settings.system_prompt,
            "eos_token_id": tokenizer.eos_token_id,
            "preference_loss": settings.loss,
            "beta": settings.resolved_beta(),
            "reference": "none (reference-free loss)"
            if settings.loss in REFERENCE_FREE
            else f"a frozen copy of the base model ({_size(trainer_kwargs['ref_model'])} more memory)"
            if "ref_model" in trainer_kwargs
            else f"supervised adapter {settings.continue_from_adapter_id}"
            if continued
            else "the base model (adapter switched off)",
            "continue_from_adapter_id": settings.continue_from_adapter_id,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
            "truncated_examples": data.truncated,
            "dropped_examples": data.dropped,
        },
    )


def _size(model: Any) -> str:
    """A model's weights in MB or GB."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{size / 10**9:.2f} GB" if size >= 10**9 else f"{size / 10**6:.1f} MB"


def load_base(base: ResolvedModel, studio: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    """The base model for inference (with its KV cache), as for causal LM."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base.path), **_load_kwargs(load_kwargs, base))


RECIPE = Recipe(task=PREFERENCE, prepare=prepare, load_base=load_base)
