"""Error shaping for the OpenAI-compatible layer: which request parameter a problem points at, and the message.

OpenAI answers ``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the request's own
parameter; the studio's errors name native spec fields. The HTTP side (app/api/openai_compat.py) wraps these
into responses.
"""

from typing import Any

_PARAM_NAMES = {
    "base_model": "model",
    "dataset_id": "training_file",
    "validation_dataset_id": "validation_file",
    "training.num_epochs": "hyperparameters.n_epochs",
    "training.batch_size": "hyperparameters.batch_size",
    "training.learning_rate": "hyperparameters.learning_rate_multiplier",
    "training.seed": "seed",
    "method": "peft.method",
}


def openai_param(field: str | None) -> str | None:
    """The request parameter an error about a native spec field points at."""
    if field is None:
        return None
    if field in _PARAM_NAMES:
        return _PARAM_NAMES[field]
    if field.startswith("method_config"):
        return "peft.config" + field.removeprefix("method_config")
    if field.startswith(("training.", "causal_lm.")) or field == "validation_fraction":
        return f"peft.{field}"
    return field


def validation_problem(errors: list[Any]) -> tuple[str, str | None]:
    """The message and parameter of a request validation error, as OpenAI reports bad input: the first problem,
    its parameter, and how many more there are."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        message, param = "The request body is not valid JSON.", None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param + ': ' if param else ''}{message}{more}", param
