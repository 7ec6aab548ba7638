"""HTML forms generated from pydantic models, and form posts turned back into the models' input.

The job form is built from ``JobSpec``, ``TrainingSettings`` and the chosen method's config model, so a new
field or a new method appears in the browser without touching a template, and a posted form is validated
by the very models that validate the JSON API. Hand-written rather than a form library: the libraries that
render pydantic models (e.g. for WTForms) bring their own widgets and validation, and we need neither, only
a list of inputs that a twenty-line template renders.
"""

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from app.core.method_registry import registry
from app.core.spec import JobSpec
from app.core.tasks import PREFERENCE
from app.http.errors import validation_items

InputKind = Literal["number", "checkbox", "select", "multiselect", "text", "list"]
TRUE_VALUES = ("true", "on", "1", "yes")
# Words that a plain capitalisation would spell wrongly in a label.
_LABEL_WORDS = {"lr": "LR", "lm": "LM", "rslora": "rsLoRA", "dora": "DoRA", "id": "", "f1": "F1"}


# Human labels (with units) for field names whose spelled-out name reads badly ("R", "Mlflow", "Gpu class").
# Keyed by the field's own name, so every method with an ``r`` or ``alpha`` gets the same label; a field's
# ``Field(title=...)`` still wins.
_LABELS = {
    "name": "Job name",
    "base_model": "Base model",
    "dataset_id": "Dataset",
    "validation_dataset_id": "Validation dataset",
    "validation_fraction": "Held-out share (0–1)",
    "text_columns": "Text columns to join",
    "num_epochs": "Epochs",
    "max_steps": "Max steps",
    "batch_size": "Batch size (examples per step)",
    "learning_rate": "Learning rate",
    "lr_scheduler": "Learning-rate schedule",
    "warmup_ratio": "Warm-up (share of steps)",
    "max_length": "Max length (tokens)",
    "logging_steps": "Log every (steps)",
    "eval_steps": "Evaluate every (steps)",
    "best_metric": "Keep the best by",
    "early_stopping_patience": "Early stopping patience (evaluations)",
    "auto_fields": "Settings chosen by auto",
    "seed": "Random seed",
    "disable_dropout": "Switch off dropout",
    "precision": "Arithmetic precision",
    "save_steps": "Checkpoint every (steps)",
    "save_total_limit": "Checkpoints kept",
    "format": "Data format",
    "template": "Chat template",
    "train_on_prompt": "Also learn the prompts",
    "packing": "Packing (padding-free)",
    "tensorboard": "TensorBoard",
    "mlflow": "MLflow",
    "mlflow_tracking_uri": "MLflow tracking URI",
    "mlflow_experiment": "MLflow experiment",
    "wandb": "Weights & Biases",
    "wandb_project": "Weights & Biases project",
    "accelerator": "Run on",
    "gpu_class": "GPU memory (at least)",
    "num_processes": "Training processes (one per GPU)",
    "strategy": "Multi-process strategy (DDP / FSDP)",
    "optimizer": "Optimizer",
    "liger": "Liger fused kernels (CUDA)",
    "attention": "Attention kernel (causal LM)",
    "torch_compile": "torch.compile the model",
    # method settings
    "r": "Rank (r)",
    "alpha": "Scaling (alpha)",
    "dropout": "Adapter dropout",
    "target_modules": "Target modules (layer names)",
    "bias": "Train biases",
    "use_rslora": "Rank-stabilised scaling (rsLoRA)",
    "use_dora": "Weight-decomposed LoRA (DoRA)",
    "lr_ratio": "B/A learning-rate ratio",
    "bits": "Quantisation bits",
    "quant_type": "Quantisation type",
    "double_quant": "Double quantisation",
    "compute_dtype": "Compute precision",
    "gradient_checkpointing": "Gradient checkpointing (less memory, slower)",
    "init_r": "Initial rank",
    "target_r": "Target rank",
    "tinit": "Steps before rank pruning",
    "tfinal": "Final steps at target rank",
    "deltaT": "Steps between rank updates",
    "beta1": "Sensitivity smoothing (β1)",
    "beta2": "Uncertainty smoothing (β2)",
    "orth_reg_weight": "Orthogonality regularisation weight",
    "reduction_factor": "Reduction factor (hidden size ÷ bottleneck)",
    "non_linearity": "Activation",
    "k": "Frozen lower layers",
    "feedforward_modules": "Feed-forward modules",
    "decay": "Decay per layer",
    "num_virtual_tokens": "Virtual tokens",
    "prefix_projection": "Project the prefix through an MLP",
    "encoder_hidden_size": "Encoder hidden size",
    "init": "Initialisation",
    "init_text": "Initialisation text",
    "encoder": "Prompt encoder",
}
# Option labels of selects whose values are terse ("16gb").
_CHOICE_LABELS = {"gpu_class": lambda value: value.removesuffix("gb") + " GB"}

# The basic part of the job form: what to train on, with what, and the handful of settings people change.
# Everything else is in the folded "Advanced settings" (job_new.html). The method's basic setting is its size
# knob, whichever of these it has (LoRA's rank, prompt tuning's virtual tokens, ...).
BASIC_FIELDS = (
    "name",
    "dataset_id",
    "base_model",
    "task",
    "text_column",
    "label_column",
    "method",
    "training.num_epochs",
    "training.learning_rate",
    "training.batch_size",
    "training.max_length",
)
_ADVANCED_TITLES = {
    "job": "Data and evaluation",
    "training": "Training",
    "causal_lm": "Causal-LM data",
    PREFERENCE: "Preference tuning",
    "tracking": "Experiment tracking",
    "resources": "Where it runs",
}
BASIC_METHOD_FIELDS = ("r", "init_r", "num_virtual_tokens", "reduction_factor", "k")


@dataclass(frozen=True)
class Choice:
    """One option of a select input."""

    value: str
    label: str


@dataclass
class FormField:
    """One input of a generated form, named by its dotted path in the model's input (``training.seed``)."""

    name: str
    label: str
    kind: InputKind
    help: str
    value: str = ""
    checked: bool = False
    required: bool = False
    nullable: bool = False
    step: str | None = None
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    choices: list[Choice] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def dom_id(self) -> str:
        """An id for the input element (dots are awkward in CSS selectors)."""
        return "f-" + self.name.replace(".", "-").replace("_", "-")


@dataclass
class FormSection:
    """A group of fields with a title (the job, the method, training)."""

    key: str
    title: str
    fields: list[FormField]
    summary: str = ""
    only_for_task: str | None = None


def label_for(name: str) -> str:
    """A readable label from a field name: ``lr_scheduler`` becomes ``LR scheduler``."""
    words = [_LABEL_WORDS.get(word, word) for word in name.split("_")]
    text = " ".join(word for word in words if word)
    return text[:1].upper() + text[1:]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` gives ``(X, True)``; anything else ``(annotation, False)``."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0], len(members) != len(get_args(annotation))
    return annotation, False


def _default_of(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.is_required() else info.default


def _display(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


def _field_for(name: str, info: FieldInfo, value: Any) -> FormField:
    annotation, nullable = _unwrap_optional(info.annotation)
    form_field = FormField(
        name=name,
        label=info.title or _LABELS.get(name.rsplit(".", 1)[-1]) or label_for(name.rsplit(".", 1)[-1]),
        kind="text",
        help=info.description or "",
        value=_display(value),
        required=info.is_required(),
        nullable=nullable,
    )
    if annotation is bool:
        form_field.kind, form_field.checked = "checkbox", bool(value)
    elif annotation in (int, float):
        form_field.kind, form_field.step = "number", "1" if annotation is int else "any"
    elif get_origin(annotation) is Literal:
        form_field.kind = "select"
        labeller = _CHOICE_LABELS.get(name.rsplit(".", 1)[-1], str)
        form_field.choices = [Choice(str(option), labeller(str(option))) for option in get_args(annotation)]
    elif get_origin(annotation) in (list, tuple):
        form_field.kind = "list"
    for constraint in info.metadata:
        if isinstance(constraint, annotated_types.Ge):
            form_field.min = float(constraint.ge)  # type: ignore[arg-type]
        elif isinstance(constraint, annotated_types.Gt):
            form_field.min = float(constraint.gt)  # type: ignore[arg-type]
        elif isinstance(constraint, annotated_types.Le):
            form_field.max = float(constraint.le)  # type: ignore[arg-type]
        elif isinstance(constraint, annotated_types.Lt):
            form_field.max = float(constraint.lt)  # type: ignore[arg-type]
        elif isinstance(constraint, annotated_types.MaxLen):
            form_field.max_length = constraint.max_length
    return form_field


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def model_form_fields(
    model: type[BaseModel], prefix: str = "", values: Mapping[str, Any] | None = None
) -> list[FormField]:
    """Inputs for a model's scalar and list fields (nested models and dicts are left to the caller)."""
    values = values or {}
    fields: list[FormField] = []
    for name, info in model.model_fields.items():
        annotation, _ = _unwrap_optional(info.annotation)
        if _is_model(annotation) or get_origin(annotation) is dict or annotation is dict:
            continue
        value = values[name] if name in values else _default_of(info)
        fields.append(_field_for(f"{prefix}{name}", info, value))
    return fields


# ---- the job form ------------------------------------------------------------------------------


def method_section(method: str, values: Mapping[str, Any] | None = None) -> FormSection:
    """The chosen method's own settings (``method_config.*``)."""
    info = registry()[method]
    return FormSection(
        key="method",
        title=f"{info.title} settings",
        summary=info.summary,
        fields=model_form_fields(info.config, "method_config.", values),
    )


def job_form(
    values: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[Choice]] | None = None,
    errors: Mapping[str, str] | None = None,
) -> list[FormSection]:
    """The job form's sections: the spec's own fields, the method's settings, then training settings.

    ``values`` is a (partial) JobSpec input; ``choices`` turns a field into a select (datasets, methods);
    ``errors`` maps dotted field names to messages shown under the inputs.
    """
    values = dict(values or {})
    method = str(values.get("method") or JobSpec.model_fields["method"].default)
    if method not in registry():
        method = str(JobSpec.model_fields["method"].default)
    values["method"] = method
    sections = [
        FormSection(key="job", title="Job", fields=model_form_fields(JobSpec, "", values)),
        method_section(method, values.get("method_config") or {}),
    ]
    tasks = {str(task) for task in get_args(JobSpec.model_fields["task"].annotation)}
    for name, info in JobSpec.model_fields.items():
        annotation, _ = _unwrap_optional(info.annotation)
        if _is_model(annotation):
            # A nested model named after a task (``causal_lm``) only matters for that task; the page hides it.
            task = name.replace("_", "-")
            sections.append(
                FormSection(
                    key=name,
                    title=label_for(name),
                    summary=(annotation.__doc__ or "").strip().splitlines()[0] if annotation.__doc__ else "",
                    fields=model_form_fields(annotation, f"{name}.", values.get(name) or {}),
                    only_for_task=task if task in tasks else None,
                )
            )
    for section in sections:
        for form_field in section.fields:
            if choices and form_field.name in choices:
                form_field.kind = "select"
                form_field.choices = list(choices[form_field.name])
            if errors and form_field.name in errors:
                form_field.error = errors[form_field.name]
    return sections


def basic_method_fields(section: FormSection) -> list[FormField]:
    """The method section's fields that the basic part of the form shows (its size knob, if it has one)."""
    return [f for f in section.fields if f.name.removeprefix("method_config.") in BASIC_METHOD_FIELDS]


def split_basic(sections: Sequence[FormSection]) -> tuple[list[FormField], list[FormSection]]:
    """The job form's basic fields (in BASIC_FIELDS order; the method's own basic field is rendered apart, see
    ``basic_method_fields``) and the sections without them: the advanced part."""
    by_name = _fields_by_name(sections)
    basic = [by_name[name] for name in BASIC_FIELDS if name in by_name]
    taken = {f.name for f in basic}
    method = next((section for section in sections if section.key == "method"), None)
    if method is not None:
        taken |= {f.name for f in basic_method_fields(method)}
    advanced = [
        FormSection(
            key=section.key,
            title=_ADVANCED_TITLES.get(section.key, section.title),
            summary=section.summary,
            only_for_task=section.only_for_task,
            fields=[f for f in section.fields if f.name not in taken],
        )
        for section in sections
    ]
    # The method section stays even when empty (full fine-tuning): it is where a method change swaps in.
    return basic, [s for s in advanced if s.fields or s.key == "method"]


def _fields_by_name(sections: Sequence[FormSection]) -> dict[str, FormField]:
    return {form_field.name: form_field for section in sections for form_field in section.fields}


def _convert(form_field: FormField, raw: list[str]) -> Any:
    if form_field.kind == "checkbox":
        return raw[-1].strip().lower() in TRUE_VALUES
    text = raw[-1].strip()
    if form_field.kind in ("list", "multiselect"):
        # A text input sends "a, b"; a multiple select (dataset columns) sends each chosen value.
        return [item.strip() for value in raw for item in value.split(",") if item.strip()]
    if text == "" and form_field.nullable:
        return None
    return text  # pydantic parses numbers from strings, so its messages are the API's messages


def set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``target["a"]["b"]`` for ``a.b``, creating the dicts on the way."""
    *parents, last = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def form_to_input(form: Mapping[str, list[str]]) -> dict[str, Any]:
    """A posted job form (name to submitted values) as JobSpec input; fields not posted keep their defaults.

    A checkbox is sent as a hidden ``false`` followed by the box's ``true``, so the last value wins and an
    unticked box is ``False`` rather than missing.
    """
    method = (form.get("method") or [""])[-1].strip() or str(JobSpec.model_fields["method"].default)
    sections = job_form({"method": method}) if method in registry() else job_form()
    data: dict[str, Any] = {}
    if method not in registry():
        data["method"] = method  # let JobSpec name the unknown method
    for name, form_field in _fields_by_name(sections).items():
        raw = form.get(name)
        if raw:
            set_path(data, name, _convert(form_field, raw))
    data.setdefault("method_config", {})
    return data


def validate_job_input(data: Mapping[str, Any]) -> tuple[JobSpec | None, dict[str, str]]:
    """Validate JobSpec input as the API does; errors keyed by dotted field name (``form``: the spec)."""
    try:
        return JobSpec.model_validate(data), {}
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for item in validation_items(exc.errors(), default_field="form"):
            errors.setdefault(item["field"], item["message"])
        return None, errors
