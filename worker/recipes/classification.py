"""Sequence classification: texts and labels in, a classifier head on the base model, accuracy and F1 out."""

from typing import Any

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
)

from app.core.base_models import ResolvedModel
from app.core.models import Dataset
from app.core.safety import model_load_kwargs, remote_code_allowed
from app.core.spec import JobSpec
from app.core.tasks import CLASSIFICATION
from worker.recipes import Prepared, Recipe
from worker.recipes.classification_data import classification_data, tokenize


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or predictions."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = float(np.sum((predicted == label) & (truth == label)))
        fp = float(np.sum((predicted == label) & (truth != label)))
        fn = float(np.sum((predicted != label) & (truth == label)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _predicted_and_truth(prediction: EvalPrediction) -> tuple[np.ndarray, np.ndarray]:
    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    return np.asarray(logits).argmax(axis=-1), np.asarray(prediction.label_ids)


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 of argmax predictions."""
    predicted, truth = _predicted_and_truth(prediction)
    return {"accuracy": float((predicted == truth).mean()), "f1_macro": macro_f1(truth, predicted)}


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> list[list[int]]:
    """Counts of (true class, predicted class): rows are true labels, columns predictions."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix.tolist()


class ClassificationMetrics:
    """Accuracy and macro-F1 for the Trainer; keeps the latest confusion matrix in ``last_structured``
    (the Trainer logs only numbers; worker/telemetry.py stores the matrix on the job)."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = list(labels)
        self.last_structured: dict[str, object] | None = None

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        predicted, truth = _predicted_and_truth(prediction)
        self.last_structured = {
            "confusion_matrix": {
                "labels": self.labels,
                "matrix": confusion_matrix(truth, predicted, len(self.labels)),
            }
        }
        return {"accuracy": float((predicted == truth).mean()), "f1_macro": macro_f1(truth, predicted)}


def without_dropout(config: Any) -> Any:
    """Set every dropout probability in a model config to zero (names vary by architecture)."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    return config


def _model_config(base: ResolvedModel, labels: list[str]) -> Any:
    return AutoConfig.from_pretrained(
        str(base.path),
        trust_remote_code=remote_code_allowed(base.model_id),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def prepare(
    spec: JobSpec,
    base: ResolvedModel,
    train: Dataset,
    validation: Dataset | None,
    load_kwargs: dict[str, Any],
) -> Prepared:
    """Tokenize once (no padding), load the base model with a head sized to the labels."""
    data = classification_data(spec, train, validation)
    tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    config = _model_config(base, data.labels)
    if spec.training.disable_dropout:
        config = without_dropout(config)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base.path), config=config, **{**model_load_kwargs(base.model_id), **load_kwargs}
    )
    max_length = spec.training.max_length
    return Prepared(
        tokenizer=tokenizer,
        model=model,
        train_dataset=tokenize(tokenizer, data.train_texts, data.train_labels, max_length),
        eval_dataset=tokenize(tokenizer, data.eval_texts, data.eval_labels, max_length),
        collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=ClassificationMetrics(data.labels),
        labels=data.labels,
    )


def load_base(base: ResolvedModel, studio: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    """The base model with a head of the adapter's label count, for inference."""
    return AutoModelForSequenceClassification.from_pretrained(
        str(base.path),
        config=_model_config(base, list(studio["labels"])),
        **{**model_load_kwargs(base.model_id), **load_kwargs},
    )


RECIPE = Recipe(task=CLASSIFICATION, prepare=prepare, load_base=load_base)
