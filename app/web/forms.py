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

from app.spec import JobSpec
from worker.methods import registry

InputKind = Literal["number", "checkbox", "select", "multiselect", "text", "list"]
TRUE_VALUES = ("true", "on", "1", "yes")
# Words that a plain capitalisation would spell wrongly in a label.
_LABEL_WORDS = {"lr": "LR", "lm": "LM", "rslora": "rsLoRA", "dora": "DoRA", "id": "", "f1": "F1"}


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
        label=info.title or label_for(name.rsplit(".", 1)[-1]),
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
        form_field.choices = [Choice(str(option), str(option)) for option in get_args(annotation)]
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


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
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
            _set_path(data, name, _convert(form_field, raw))
    data.setdefault("method_config", {})
    return data


def validate_job_input(data: Mapping[str, Any]) -> tuple[JobSpec | None, dict[str, str]]:
    """Validate JobSpec input as the API does; errors keyed by dotted field name (``form``: the spec)."""
    try:
        return JobSpec.model_validate(data), {}
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "form"
            errors.setdefault(name, str(error["msg"]).removeprefix("Value error, "))
        return None, errors
