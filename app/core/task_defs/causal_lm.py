"""Causal-LM instruction tuning: examples in one of four formats, the response tokens carry the loss."""

from app.core.tasks import CAUSAL_LM, TaskInfo

TASK = TaskInfo(
    name=CAUSAL_LM,
    label="Causal LM (instruction tuning)",
    formats=("alpaca", "prompt-completion", "chat", "text"),
    metrics=("token_accuracy", "perplexity", "loss"),
    primary_metric="token_accuracy",
    higher_is_better=True,
    headline_metrics=(("perplexity", "perplexity"), ("loss", "eval loss")),
    best_metric="loss",
    generates_text=True,
    validate="app.services.causal_lm:validate_causal_lm_spec",
    order=1,
)
