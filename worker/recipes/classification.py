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

from app.base_models import ResolvedModel
from app.models import Dataset
from app.spec import JobSpec
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


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 of argmax predictions."""
    logits = (
        prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    )
    predicted = np.asarray(logits).argmax(axis=-1)
    truth = np.asarray(prediction.label_ids)
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
    model = AutoModelForSequenceClassification.from_pretrained(str(base.path), config=config, **load_kwargs)
    max_length = spec.training.max_length
    return Prepared(
        tokenizer=tokenizer,
        model=model,
        train_dataset=tokenize(tokenizer, data.train_texts, data.train_labels, max_length),
        eval_dataset=tokenize(tokenizer, data.eval_texts, data.eval_labels, max_length),
        collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        labels=data.labels,
    )


def load_base(base: ResolvedModel, studio: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    """The base model with a head of the adapter's label count, for inference."""
    return AutoModelForSequenceClassification.from_pretrained(
        str(base.path), config=_model_config(base, list(studio["labels"])), **load_kwargs
    )


RECIPE = Recipe(task="sequence-classification", prepare=prepare, load_base=load_base)
