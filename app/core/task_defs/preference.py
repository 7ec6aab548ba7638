"""Preference tuning (DPO, IPO, ORPO, SimPO, KTO): pairs of a better and a worse answer, or answers marked good or
bad, align a causal LM; trl's trainers compute the losses (worker/recipes/preference.py)."""

from app.core.tasks import PREFERENCE, TaskInfo

TASK = TaskInfo(
    name=PREFERENCE,
    label="Preference tuning (DPO, IPO, ORPO, SimPO, KTO)",
    formats=("pairs", "kto"),
    metrics=("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "loss"),
    primary_metric="rewards/accuracies",
    higher_is_better=True,
    headline_metrics=(("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")),
    best_metric="loss",
    generates_text=True,
    validate="app.services.preference:validate_preference_spec",
    order=2,
)
