"""Sequence classification: text (one or several joined columns) in, one of a few labels out."""

from app.core.tasks import CLASSIFICATION, TaskInfo

TASK = TaskInfo(
    name=CLASSIFICATION,
    label="Sequence classification",
    formats=("classification",),
    metrics=("accuracy", "f1_macro", "loss"),
    primary_metric="accuracy",
    higher_is_better=True,
    headline_metrics=(("accuracy", "accuracy"), ("loss", "eval loss")),
    best_metric="f1_macro",
    generates_text=False,
    validate="app.services.classification:validate_classification_spec",
    order=0,
)
