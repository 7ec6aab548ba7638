"""Evaluate an adapter on a dataset file, on a worker: batched predictions, metrics and a predictions CSV.

The adapter is loaded the way try-out loads it (worker/inference.py ``WarmModels``), into a cache of its own
that is dropped when the evaluation ends, so a training worker does not keep an extra model in memory.

- Sequence classification: class probabilities for every row (length-sorted batches, so little padding is
  computed); with a label column, accuracy, macro-F1, per-class precision/recall/F1/support and the
  confusion matrix, computed by scikit-learn on exactly the predictions written to the CSV.
- Causal LM: the rows are formatted and masked as in training (worker/recipes/causal_lm_data.py); loss and
  perplexity are the mean negative log-likelihood of the response tokens (as the training metrics), and a
  few examples get a greedy response, bounded by ``max_new_tokens``.
- Preference: DPO's implicit rewards against the reference, reward accuracy and margin, DPO's loss
  (worker/recipes/preference_eval.py, which loads the adapter itself: trl's trainer needs it outside inference mode).

An evaluation owns its status transitions here: queued -> running -> succeeded | failed.
"""

import csv
import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import update
from sqlmodel import col

from app.core.datasets_io import load_rows
from app.core.db import session_scope
from app.core.errors import InvalidDataset, StudioError
from app.core.formats import example_from_row, prompt_and_response
from app.core.models import Adapter, Dataset, Evaluation, EvaluationStatus, utcnow
from app.core.settings import get_settings
from app.core.spec import CausalLMSettings, JobSpec
from app.core.storage import get_store
from app.core.tasks import CAUSAL_LM, PREFERENCE
from app.services.evaluations import predictions_key
from worker.failures import explain
from worker.inference import WarmModels
from worker.recipes.causal_lm import preprocess_logits
from worker.recipes.causal_lm_data import IGNORE, EncodedExample, Encoder, encode_all
from worker.resilience import free_memory, remove_dir

log = logging.getLogger(__name__)

# Batches hold up to this many tokens (rows x longest row; rows sorted by length, so little is padding) and at
# most MAX_BATCH_ROWS rows. Bigger batches than training's pay here: on this 2-core CPU the SST-2 dev set
# (872 rows) classified in 40-50 s in batches of 128 against 69-79 s in batches of 32 (a loaded machine).
# Causal LM: the logits (tokens x vocabulary, float32) bound the batch, so far fewer tokens.
CLASSIFICATION_TOKENS = {"cpu": 8192, "cuda": 65536}
CAUSAL_TOKENS = {"cpu": 2048, "cuda": 16384}
MAX_BATCH_ROWS = 256
TEXT_SAMPLE_PROMPT_TOKENS = 32  # plain-text data: the sample continues the first tokens of the text


class EvaluationSkipped(Exception):
    """The evaluation is no longer waiting for a worker (finished, or deleted)."""


@dataclass
class Outcome:
    """What an evaluation found: metrics, details for the page, rows read, and the predictions CSV written."""

    metrics: dict[str, float]
    details: dict[str, Any]
    row_count: int
    predictions_csv: Path


# ---- status transitions -----------------------------------------------------------------------


def _start(evaluation_id: int, worker_name: str) -> tuple[Evaluation, Adapter, Dataset]:
    """Claim the evaluation and read what it needs.

    A running evaluation may be claimed again: a message is only redelivered when the worker that held it
    died, and an evaluation is safe to run twice (it rewrites its results).
    """
    with session_scope() as session:
        result = session.execute(
            update(Evaluation)
            .where(
                col(Evaluation.id) == evaluation_id,
                col(Evaluation.status).in_([EvaluationStatus.queued, EvaluationStatus.running]),
            )
            .values(status=EvaluationStatus.running, worker=worker_name, started_at=utcnow(), error=None)
        )
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise EvaluationSkipped(f"evaluation {evaluation_id} is finished or gone; nothing to do")
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None
        adapter = session.get(Adapter, evaluation.adapter_id)
        dataset = session.get(Dataset, evaluation.dataset_id)
        if adapter is None:
            raise InvalidDataset(
                f"Adapter {evaluation.adapter_id} was deleted before the evaluation started."
            )
        if dataset is None:
            raise InvalidDataset(
                f"Dataset {evaluation.dataset_id} was deleted before the evaluation started."
            )
        session.expunge_all()
        return evaluation, adapter, dataset


def _succeed(evaluation_id: int, outcome: Outcome) -> None:
    key = predictions_key(evaluation_id)
    get_store().put_file(outcome.predictions_csv, key)
    with session_scope() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        if evaluation is None:
            return
        evaluation.status = EvaluationStatus.succeeded
        evaluation.metrics = outcome.metrics
        evaluation.details = outcome.details
        evaluation.row_count = outcome.row_count
        evaluation.predictions_key = key
        evaluation.finished_at = utcnow()
        session.add(evaluation)
        session.commit()


def mark_failed(evaluation_id: int, error: str) -> None:
    """Record a failure with a readable error (never over a finished evaluation)."""
    with session_scope() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        if evaluation is None or evaluation.status.is_terminal:
            return
        evaluation.status = EvaluationStatus.failed
        evaluation.error = error
        evaluation.finished_at = utcnow()
        session.add(evaluation)
        session.commit()


def describe_failure(exc: BaseException) -> str:
    """The message stored on a failed evaluation: a data problem as it was worded, else the worker's explanation."""
    if isinstance(exc, StudioError):
        return exc.message
    return explain(exc)


def run_evaluation(evaluation_id: int, worker_name: str = "worker") -> None:
    """Run one evaluation end to end; a failure is recorded on the row and propagates to the task."""
    try:
        evaluation, adapter, dataset = _start(evaluation_id, worker_name)
    except EvaluationSkipped as reason:
        log.info("skipping evaluation %s: %s", evaluation_id, reason)
        return
    except Exception as exc:
        mark_failed(evaluation_id, describe_failure(exc))
        raise
    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    work_dir = get_store().scratch_dir(f"evaluation-{evaluation_id}")
    started = time.perf_counter()
    try:
        outcome = evaluate(evaluation, adapter, dataset, work_dir)
        outcome.metrics["seconds"] = round(time.perf_counter() - started, 3)
        _succeed(evaluation_id, outcome)
    except Exception as exc:
        log.error("evaluation %s failed:\n%s", evaluation_id, traceback.format_exc())
        mark_failed(evaluation_id, describe_failure(exc))
        traceback.clear_frames(exc.__traceback__)  # the frames hold the model: let it go now
        raise
    finally:
        remove_dir(work_dir)
        free_memory()


def evaluate(evaluation: Evaluation, adapter: Adapter, dataset: Dataset, work_dir: Path) -> Outcome:
    """Load the adapter (as try-out does) and run it over the dataset's rows."""
    store = get_store()
    try:
        folder = store.local_dir(adapter.storage_key)
    except FileNotFoundError:
        raise InvalidDataset(
            f"The files of adapter {adapter.id} are missing from the artifact store."
        ) from None
    _, rows = load_rows(  # with the options it was imported with (delimiter, header, encoding, ...)
        store.local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    target = work_dir / "predictions.csv"
    if evaluation.task == PREFERENCE:
        return _evaluate_preference(evaluation, folder, rows, target, work_dir)
    models = WarmModels()  # a cache of its own: released with this evaluation
    try:
        model, tokenizer, studio = models.model_for(adapter.id or 0, folder)
        model = _on_best_device(model)
        if evaluation.task == CAUSAL_LM:
            return evaluate_causal_lm(model, tokenizer, studio, rows, evaluation.settings, target)
        return evaluate_classification(model, tokenizer, studio, rows, evaluation.settings, target)
    finally:
        models.models.clear()


def _evaluate_preference(
    evaluation: Evaluation, folder: Path, rows: list[dict[str, Any]], target: Path, work_dir: Path
) -> Outcome:
    """A preference adapter's rewards against its reference (worker/recipes/preference_eval.py)."""
    from worker.recipes.preference_eval import evaluate_preference

    start_folder = None
    start_id = evaluation.settings.get("reference_adapter_id")
    if start_id:  # the supervised adapter the job continued: its reference in training
        with session_scope() as session:
            start = session.get(Adapter, int(start_id))
            key = start.storage_key if start is not None else None
        if key is None:
            raise InvalidDataset(
                f"Adapter {start_id}, the reference of this preference adapter, was deleted; evaluate against "
                "the base model by starting a new evaluation."
            )
        start_folder = get_store().local_dir(key)
    metrics, details = evaluate_preference(folder, rows, evaluation.settings, target, work_dir, start_folder)
    return Outcome(metrics, details, len(rows), target)


def _on_best_device(model: Any) -> Any:
    """The model on a GPU when the worker has one (quantized models stay where their loader put them)."""
    if not torch.cuda.is_available():
        return model
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None or _device(model).type == "cuda":
        return model
    return model.to("cuda")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _max_length(studio: dict[str, Any]) -> int:
    """The max length the adapter was trained with (inputs are truncated to it, as in try-out)."""
    value = studio.get("max_length")
    return value if isinstance(value, int) and value > 0 else 512


# ---- classification ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A dataset value as text, the way training reads labels (``str``); empty for a missing value."""
    return "" if value is None else str(value)


def token_batches(lengths: list[int], budget: int, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Indices grouped into batches, shortest first, each within ``budget`` padded tokens and ``max_rows`` rows."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending, so this row is the longest of the batch so far: the padded size if it joins.
        if current and ((len(current) + 1) * lengths[index] > budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def class_probabilities(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, token_budget: int
) -> np.ndarray:
    """Softmax probabilities per text (rows in the texts' order), in length-sorted, token-bounded batches."""
    device = _device(model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    result: np.ndarray | None = None
    for chosen in token_batches(lengths, token_budget):
        batch = tokenizer(
            [texts[i] for i in chosen],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        probabilities = torch.softmax(model(**batch).logits.float(), dim=-1).cpu().numpy()
        if result is None:
            result = np.zeros((len(texts), probabilities.shape[1]), dtype=np.float64)
        result[chosen] = probabilities
    return result if result is not None else np.zeros((0, 0))


def classification_metrics(
    truth: list[str], predicted: list[str], labels: list[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """scikit-learn's accuracy and macro-F1, and per-class scores and the confusion matrix over ``labels``.

    Macro-F1 averages over the classes present in the truth or the predictions (scikit-learn's default, and
    what training reports), so a class the file never mentions does not count as a zero.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }
    details = {
        "labels": labels,
        "per_class": [
            {
                "label": label,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        ],
        "confusion_matrix": {
            "labels": labels,
            "matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
        },
    }
    return metrics, details


def evaluate_classification(
    model: Any,
    tokenizer: Any,
    studio: dict[str, Any],
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    target: Path,
) -> Outcome:
    """Predict every row; with a label column, score the predictions; write the predictions CSV."""
    labels: list[str] = list(studio["labels"])
    text_columns: list[str] = settings.get("text_columns") or [settings["text_column"]]
    label_column: str | None = settings.get("label_column")
    # As training reads them (worker/recipes/classification_data.py): stripped, several joined one per line.
    texts = ["\n".join(_cell(row.get(column)).strip() for column in text_columns) for row in rows]
    truth: list[str] | None = None
    if label_column is not None:
        truth = [_cell(row.get(label_column)) for row in rows]
        known = set(labels)
        for number, label in enumerate(truth, start=1):
            if label not in known:
                raise InvalidDataset(
                    f"Row {number}: label {label!r} in column {label_column!r} is not one the adapter knows "
                    f"({', '.join(map(repr, labels))}).",
                    row=number,
                )
    budget = CLASSIFICATION_TOKENS.get(_device(model).type, CLASSIFICATION_TOKENS["cpu"])
    probabilities = class_probabilities(model, tokenizer, texts, _max_length(studio), budget)
    predicted = [labels[int(i)] for i in probabilities.argmax(axis=1)] if len(texts) else []
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        header = ["row", "text", *(["label"] if truth is not None else []), "predicted_label"]
        writer.writerow(header + [f"probability_{label}" for label in labels])
        for index, text in enumerate(texts):
            given = [truth[index]] if truth is not None else []
            scores = [f"{p:.6f}" for p in probabilities[index]]
            writer.writerow([index + 1, text, *given, predicted[index], *scores])
    counts = {label: predicted.count(label) for label in labels}
    details: dict[str, Any] = {"labels": labels, "predicted_counts": counts}
    metrics: dict[str, float] = {}
    if truth is not None and texts:
        metrics, scored = classification_metrics(truth, predicted, labels)
        details.update(scored)
    if len(texts):
        metrics["mean_confidence"] = float(probabilities.max(axis=1).mean())
    return Outcome(metrics, details, len(rows), target)


# ---- causal LM --------------------------------------------------------------------------------


def _encoder(tokenizer: Any, studio: dict[str, Any], settings: CausalLMSettings) -> Encoder:
    """The training encoder: the adapter's saved tokenizer carries the chat template it was trained with."""
    from worker.recipes.causal_lm_data import job_encoder

    trained = JobSpec.model_validate(studio["spec"])
    spec = trained.model_copy(update={"causal_lm": settings})
    encoder, _ = job_encoder(spec, tokenizer)
    return encoder


def _padded(examples: list[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(example.input_ids) for example in examples)
    ids, masks, labels = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        ids.append([*example.input_ids, *[pad_id] * pad])
        masks.append([1] * len(example.input_ids) + [0] * pad)
        labels.append([*example.labels, *[IGNORE] * pad])
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(masks, dtype=torch.long, device=device),
        "labels": torch.tensor(labels, dtype=torch.long, device=device),
    }


@torch.inference_mode()
def response_losses(
    model: Any, encoded: list[EncodedExample], pad_id: int, token_budget: int
) -> list[tuple[float, int, int]]:
    """(summed NLL, response tokens, correctly predicted tokens) per encoded example, in order."""
    device = _device(model)
    results: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(encoded)
    for chosen in token_batches([len(example.input_ids) for example in encoded], token_budget):
        batch = _padded([encoded[i] for i in chosen], pad_id, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        predicted, nll = preprocess_logits(logits, labels)  # the training metrics' own reduction
        mask = labels != IGNORE
        mask[:, 0] = False
        tokens = mask.sum(dim=1)
        correct = ((predicted == labels) & mask).sum(dim=1)
        for row, index in enumerate(chosen):
            results[index] = (float(nll[row]), int(tokens[row]), int(correct[row]))
    return results


@torch.inference_mode()
def greedy(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> str:
    """A greedy continuation of the prompt (at most ``max_new_tokens``), decoded without special tokens."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    output = model.generate(
        input_ids=torch.tensor([prompt_ids], dtype=torch.long, device=device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return str(tokenizer.decode(output[0, len(prompt_ids) :].tolist(), skip_special_tokens=True))


def evaluate_causal_lm(
    model: Any,
    tokenizer: Any,
    studio: dict[str, Any],
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    target: Path,
) -> Outcome:
    """Loss and perplexity over the responses, per-row losses in the CSV, and a few greedy samples."""
    data = CausalLMSettings.model_validate(settings["causal_lm"])
    text_column = str(settings.get("text_column") or "text")
    examples = [
        (number, example_from_row(row, data, text_column, number)) for number, row in enumerate(rows, start=1)
    ]
    encoder = _encoder(tokenizer, studio, data)
    encoded, truncated, dropped = encode_all(encoder, examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device_type = _device(model).type
    losses = response_losses(
        model, encoded, int(pad_id), CAUSAL_TOKENS.get(device_type, CAUSAL_TOKENS["cpu"])
    )
    per_row: dict[int, list[float]] = {}  # row -> [summed NLL, response tokens, correct tokens]
    for example, (nll, tokens, correct) in zip(encoded, losses, strict=True):
        totals = per_row.setdefault(example.row, [0.0, 0.0, 0.0])
        totals[0] += nll
        totals[1] += tokens
        totals[2] += correct
    total_nll = sum(t[0] for t in per_row.values())
    total_tokens = int(sum(t[1] for t in per_row.values()))
    if total_tokens == 0:
        raise InvalidDataset(
            "No example has a response token within the adapter's max_length; nothing to score."
        )
    mean_nll = total_nll / total_tokens
    metrics = {
        "loss": mean_nll,
        "perplexity": math.exp(min(mean_nll, 50.0)),
        "token_accuracy": sum(t[2] for t in per_row.values()) / total_tokens,
        "response_tokens": float(total_tokens),
        "examples": float(len(per_row)),
        "truncated_examples": float(truncated),
        "dropped_examples": float(dropped),
    }
    samples = _samples(model, tokenizer, studio, encoder, examples, settings)
    by_row = {sample["row"]: sample for sample in samples}
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "response_tokens", "loss", "perplexity", "prompt", "reference", "generated"])
        for number, _example in examples:
            row_nll, row_tokens, _ = per_row.get(number, [0.0, 0.0, 0.0])
            loss = row_nll / row_tokens if row_tokens else None
            sample = by_row.get(number, {})
            writer.writerow(
                [
                    number,
                    int(row_tokens),
                    "" if loss is None else f"{loss:.6f}",
                    "" if loss is None else f"{math.exp(min(loss, 50.0)):.6f}",
                    sample.get("prompt", ""),
                    sample.get("reference", ""),
                    sample.get("generated", ""),
                ]
            )
    return Outcome(metrics, {"samples": samples}, len(rows), target)


def _samples(
    model: Any,
    tokenizer: Any,
    studio: dict[str, Any],
    encoder: Encoder,
    examples: list[tuple[int, Any]],
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Greedy responses for the first ``samples`` examples, beside the reference response."""
    count, max_new = int(settings.get("samples", 5)), int(settings.get("max_new_tokens", 64))
    eos = studio.get("eos_token_id", tokenizer.eos_token_id)
    samples: list[dict[str, Any]] = []
    for number, example in examples[:count]:
        if example.messages is not None:
            prompt, reference = prompt_and_response(example.messages, encoder.render, tokenizer.eos_token)
            prompt_ids = encoder.prompt_ids(prompt)
        else:  # plain text: continue its first tokens
            ids = encoder.prompt_ids(example.text or "")
            prompt_ids = ids[:TEXT_SAMPLE_PROMPT_TOKENS]
            prompt = str(tokenizer.decode(prompt_ids, skip_special_tokens=True))
            reference = str(tokenizer.decode(ids[TEXT_SAMPLE_PROMPT_TOKENS:], skip_special_tokens=True))
        if tokenizer.eos_token and reference.endswith(tokenizer.eos_token):
            reference = reference[: -len(tokenizer.eos_token)]
        generated = greedy(model, tokenizer, prompt_ids, max_new, eos)
        samples.append({"row": number, "prompt": prompt, "reference": reference, "generated": generated})
    return samples
