"""Training settings that default to ``auto``: one documented rule turns them into numbers (docs/defaults.md).

The rule reads only what is known before training starts: how many rows train and how many are held out, the
batch size (times the number of DDP processes), the task, the method's typical learning rate (``MethodInfo``)
and the base model's size (estimated from its ``config.json``). It is the same for every dataset: nothing here
is tuned per dataset. The web resolves it when a job is submitted (the job stores the numbers it will run with,
and ``training.auto_fields`` names the ones the rule chose); the worker resolves whatever is still ``auto`` in a
spec that did not come through the API. Pure python: no torch, so the web can import it.
"""

import math
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from app.core.spec import AUTO, JobSpec, TrainingSettings
from app.core.tasks import PREFERENCE

# Enough optimizer steps to learn: 1,000 rows at batch 32 is 29 steps, and a LoRA classifier on MiniLM stays at
# chance after them (DESIGN.md); with ~200 steps it reaches 0.8+ on the demo and 0.87 on SST-2 (one epoch).
MIN_STEPS = 200
MAX_EPOCHS = 20  # tiny sets: stop repeating them here (the best checkpoint guards against over-fitting)
WARMUP_RATIO = 0.03  # a short warm-up (6 steps of 200) keeps the high peak rate stable; see docs/defaults.md
# Evaluations together read at most this share of the examples training reads (a forward pass costs about a
# third of a training step, so evaluation stays near a tenth of the run), between one and MAX_EVALS of them.
EVAL_SHARE = 0.3
MAX_EVALS = 10
MAX_LOGGING_STEPS = 10
# Adapter methods' learning rates (MethodInfo.learning_rate) are typical for models of ~400M parameters
# (RoBERTa-large) and up; on a smaller model the same few new weights take a larger step: the rate is scaled by
# sqrt(REFERENCE_PARAMS / params), at most MAX_LR_SCALE times (a LoRA classifier on 22M-parameter MiniLM:
# 5e-4 -> 2e-3, 0.866 on SST-2 against 0.846). Methods that train the model's own weights (full, freeze, llrd:
# saved as a whole transformers model) keep their typical rate, which is already BERT-sized (5e-5 to 1e-4).
REFERENCE_PARAMS = 400_000_000
MAX_LR_SCALE = 4.0

AUTO_FIELDS = ("num_epochs", "learning_rate", "warmup_ratio", "eval_steps", "logging_steps")


@dataclass(frozen=True)
class RuleInputs:
    """What the rule looks at."""

    task: str
    method: str
    method_learning_rate: float
    model_params: int | None
    train_rows: int
    eval_rows: int
    batch_size: int
    processes: int = 1
    adapter: bool = True  # the method adds new weights (False: it trains the model's own, e.g. full)


@dataclass(frozen=True)
class Resolution:
    """The settings with every ``auto`` replaced, which fields the rule chose, and why (one line)."""

    training: TrainingSettings
    chosen: tuple[str, ...]
    explanation: str


def estimate_parameters(config: dict[str, Any]) -> int | None:
    """A transformer's parameter count from its config.json (embeddings + attention + MLP), or None if unknown.

    Close enough for choosing a learning rate (MiniLM-L6: 22.7M estimated, 22.7M real); no weights are read.
    """

    def first(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    layers = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if hidden is None or layers is None:
        return None
    inner = first("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff") or 4 * hidden
    vocab = first("vocab_size") or 0
    gated = str(config.get("hidden_act", config.get("activation_function", ""))).lower() in ("silu", "swiglu")
    mlp = (3 if gated else 2) * hidden * inner
    return layers * (4 * hidden * hidden + mlp) + vocab * hidden


def learning_rate_for(method_learning_rate: float, model_params: int | None, adapter: bool = True) -> float:
    """The method's typical rate; an adapter's is scaled up for models below REFERENCE_PARAMS (module notes)."""
    if not model_params or not adapter:
        return method_learning_rate
    scale = min(MAX_LR_SCALE, max(1.0, math.sqrt(REFERENCE_PARAMS / model_params)))
    return float(f"{method_learning_rate * scale:.3g}")


# Preference tuning starts from a model that already answers well and moves it a little: its auto learning rate
# is this share of the method's supervised rate (trl's DPO examples train LoRA at 5e-6 to 5e-5, about a tenth of
# the supervised LoRA rates; docs/preference.md).
PREFERENCE_LR_SHARE = 0.1


def auto_learning_rate(inputs: "RuleInputs") -> float:
    """The learning rate ``auto`` picks: the method's (scaled for small models), a tenth of it for preference."""
    rate = learning_rate_for(inputs.method_learning_rate, inputs.model_params, inputs.adapter)
    if inputs.task == PREFERENCE:
        rate = float(f"{rate * PREFERENCE_LR_SHARE:.3g}")
    return rate


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def needs_resolution(training: TrainingSettings) -> bool:
    """True when some training setting is still ``auto``."""
    return any(_is_auto(getattr(training, name)) for name in AUTO_FIELDS)


def resolve_training(training: TrainingSettings, inputs: RuleInputs) -> Resolution:
    """Replace each ``auto`` in ``training`` by the rule's value (explicit values are kept as they are)."""
    per_step = max(1, inputs.batch_size * max(1, inputs.processes))
    steps_per_epoch = max(1, math.ceil(max(1, inputs.train_rows) / per_step))
    values: dict[str, Any] = {}
    chosen: list[str] = []
    notes: list[str] = []

    epochs = training.num_epochs
    if _is_auto(epochs):
        if training.max_steps is not None:
            epochs = 1.0  # max steps decides; epochs only matter for the scheduler's bookkeeping
        else:
            epochs = float(min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS / steps_per_epoch))))
            notes.append(
                f"{epochs:g} epoch(s) of {steps_per_epoch} steps ({inputs.train_rows} rows at batch {per_step}):"
                f" at least {MIN_STEPS} steps"
            )
        values["num_epochs"] = epochs
        chosen.append("num_epochs")
    if training.max_steps is not None:
        steps = training.max_steps
    else:
        steps = max(1, math.ceil(float(epochs or 1.0) * steps_per_epoch))

    if _is_auto(training.learning_rate):
        rate = auto_learning_rate(inputs)
        values["learning_rate"] = rate
        chosen.append("learning_rate")
        size = f"{inputs.model_params / 1e6:.0f}M-parameter model" if inputs.model_params else "model"
        share = ", a tenth for preference tuning" if inputs.task == PREFERENCE else ""
        notes.append(
            f"learning rate {rate:g} ({inputs.method} typical {inputs.method_learning_rate:g}, {size}{share})"
        )
    if _is_auto(training.warmup_ratio):
        values["warmup_ratio"] = WARMUP_RATIO
        chosen.append("warmup_ratio")
    if _is_auto(training.eval_steps):
        if inputs.eval_rows > 0:
            evaluations = int(EVAL_SHARE * steps * per_step / inputs.eval_rows)
            evaluations = min(MAX_EVALS, max(1, evaluations))
            values["eval_steps"] = max(1, math.ceil(steps / evaluations))
            notes.append(f"evaluate every {values['eval_steps']} steps ({inputs.eval_rows} held-out rows)")
        else:
            values["eval_steps"] = None  # nothing to evaluate on
        chosen.append("eval_steps")
    if _is_auto(training.logging_steps):
        values["logging_steps"] = min(MAX_LOGGING_STEPS, max(1, steps // 20))
        chosen.append("logging_steps")

    resolved = training.model_copy(
        update={**values, "auto_fields": sorted(set(training.auto_fields or []) | set(chosen))}
    )
    explanation = f"auto settings for {steps} steps: " + "; ".join(notes) if notes else ""
    return Resolution(TrainingSettings.model_validate(resolved.model_dump()), tuple(chosen), explanation)


def rescale_cadence(
    training: TrainingSettings, steps_before: int, steps_after: int
) -> tuple[TrainingSettings, str]:
    """Keep the rule's evaluation and logging counts when a run has another number of steps than it counted.

    The rule counts steps from examples at submission; when the worker packs examples into rows (``packing``
    auto on a GPU), an epoch has fewer, fuller steps. The epochs stay (the same passes over the data); the
    evaluation and logging cadences the rule chose (``auto_fields``) are scaled so the job still evaluates and
    logs as many times. Explicit values are kept. Returns the settings and what changed ('' if nothing).
    """
    chosen = set(training.auto_fields or [])
    if steps_before == steps_after or steps_before < 1 or steps_after < 1:
        return training, ""
    values: dict[str, Any] = {}
    if "eval_steps" in chosen and training.eval_steps and not _is_auto(training.eval_steps):
        evaluations = max(1, math.ceil(steps_before / int(training.eval_steps)))
        values["eval_steps"] = max(1, math.ceil(steps_after / evaluations))
    if "logging_steps" in chosen and not _is_auto(training.logging_steps):
        values["logging_steps"] = min(MAX_LOGGING_STEPS, max(1, steps_after // 20))
    changed = {name: value for name, value in values.items() if value != getattr(training, name)}
    if not changed:
        return training, ""
    said = ", ".join(f"{name.removesuffix('_steps')} every {value} steps" for name, value in changed.items())
    return training.model_copy(update=changed), said


def rule_inputs_for(spec: JobSpec, train_rows: int, eval_rows: int) -> RuleInputs:
    """The rule's inputs for a spec with known row counts (the model size from its config.json)."""
    from app.core.base_models import resolve_base_model
    from app.core.method_registry import registry

    try:
        params = estimate_parameters(resolve_base_model(spec.base_model).config)
    except Exception:  # noqa: BLE001 - the spec's own validation reports a bad base model; the rule just skips it
        params = None
    method = registry()[spec.method]
    return RuleInputs(
        task=spec.task,
        method=spec.method,
        method_learning_rate=method.learning_rate,
        model_params=params,
        train_rows=train_rows,
        eval_rows=eval_rows,
        batch_size=spec.training.batch_size,
        processes=spec.resources.num_processes,
        adapter=method.saved_as != "transformers",
    )


def rule_inputs(session: Session, spec: JobSpec) -> RuleInputs:
    """The rule's inputs for a spec: row counts from the dataset rows, the model size from its config.json."""
    from app.core.models import Dataset

    dataset = session.get(Dataset, spec.dataset_id)
    rows = dataset.row_count if dataset is not None else 0
    if spec.validation_dataset_id:
        validation = session.get(Dataset, spec.validation_dataset_id)
        eval_rows = validation.row_count if validation is not None else 0
        train_rows = rows
    else:
        eval_rows = round(rows * spec.validation_fraction)  # as the recipes split it
        train_rows = rows - eval_rows
    return rule_inputs_for(spec, train_rows, eval_rows)


def resolve_spec(session: Session, spec: JobSpec) -> tuple[JobSpec, str]:
    """The spec with its ``auto`` training settings resolved, and a one-line explanation ('' if none were)."""
    if not needs_resolution(spec.training):
        return spec, ""
    resolution = resolve_training(spec.training, rule_inputs(session, spec))
    return spec.model_copy(update={"training": resolution.training}), resolution.explanation
