"""Token lengths of a dataset's examples for a base model: percentiles, a recommended max_length, truncation.

Torch-free, so the web process can answer while the form is filled in: the model's ``tokenizer.json`` is read
with the ``tokenizers`` library directly (``transformers.AutoTokenizer`` would be the same tokenizer, but
importing transformers costs seconds and the web process never imports it). A model without a
``tokenizer.json`` (an old slow-only tokenizer) gets no report, and the form says so.

For causal-LM formats the example is the text of its columns (or its messages) joined by new lines: the chat
template adds a few tokens per turn on top, so the recommendation rounds up.
"""

import math
import random
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core.base_models import resolve_base_model
from app.core.datasets_io import load_rows
from app.core.errors import InvalidSpec
from app.core.models import Dataset
from app.core.storage import get_store
from app.core.tasks import CAUSAL_LM, PREFERENCE

# Examples tokenized for a report: a seeded sample of larger datasets (percentiles move little beyond this).
SAMPLE_ROWS = 5000
PERCENTILE = 95
# Recommendations are rounded up to a multiple of this (tensor shapes, and headroom for template tokens).
ROUND_TO = 8


@lru_cache(maxsize=8)
def _tokenizer(path: str, modified: float) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenizer_for(base_model: str) -> tuple[Any | None, int | None]:
    """The model's fast tokenizer (None when it has no tokenizer.json) and its maximum positions."""
    model = resolve_base_model(base_model)
    path = Path(model.path) / "tokenizer.json"
    if not path.is_file():
        return None, model.max_positions
    return _tokenizer(str(path), path.stat().st_mtime), model.max_positions


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # chat messages
        return "\n".join(
            str(item.get("content", item.get("value", ""))) if isinstance(item, dict) else str(item)
            for item in value
        )
    return str(value)


def example_texts(dataset: Dataset, columns: Sequence[str], seed: int = 0) -> tuple[list[str], int]:
    """The joined text of ``columns`` for (a sample of) the rows, and how many rows the dataset has."""
    missing = [column for column in columns if column not in dataset.columns]
    if missing:
        raise InvalidSpec(
            f"Column(s) {', '.join(map(repr, missing))} are not in dataset {dataset.id}; its columns are "
            f"{', '.join(map(repr, dataset.columns))}.",
            field="text_column",
        )
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    total = len(rows)
    if total > SAMPLE_ROWS:
        rows = random.Random(seed).sample(rows, SAMPLE_ROWS)
    return ["\n".join(_text(row.get(column)) for column in columns) for row in rows], total


def _percentile(ordered: list[int], share: float) -> int:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share / 100 * len(ordered)) - 1))]


def length_report(
    dataset: Dataset, base_model: str, columns: Sequence[str], max_length: int | None = None
) -> dict[str, Any]:
    """Token lengths of the examples, the recommended max_length and the share truncated at ``max_length``.

    The recommendation is the 95th percentile rounded up to a multiple of 8, capped by the model's position
    embeddings; ``truncated_share`` is the share of examples longer than ``max_length`` (the recommendation
    when none is given).
    """
    tokenizer, max_positions = tokenizer_for(base_model)
    report: dict[str, Any] = {
        "base_model": base_model,
        "columns": list(columns),
        "model_max_positions": max_positions,
    }
    if tokenizer is None:
        report["available"] = False
        report["reason"] = f"{base_model!r} has no tokenizer.json, so lengths are measured at training time."
        return report
    texts, total = example_texts(dataset, columns)
    lengths = sorted(len(encoding.ids) for encoding in tokenizer.encode_batch(texts))
    p95 = _percentile(lengths, PERCENTILE)
    recommended = max(8, math.ceil(p95 / ROUND_TO) * ROUND_TO)
    if max_positions:
        recommended = min(recommended, max_positions)
    limit = max_length or recommended
    truncated = sum(1 for length in lengths if length > limit)
    report.update(
        available=True,
        rows=total,
        measured=len(lengths),
        min=lengths[0],
        median=_percentile(lengths, 50),
        p95=p95,
        max=lengths[-1],
        recommended_max_length=recommended,
        max_length=limit,
        truncated=truncated,
        truncated_share=round(truncated / len(lengths), 4),
    )
    return report


def columns_for(values: Mapping[str, Any], dataset: Dataset) -> list[str]:
    """The columns an example is made of, from job-spec-shaped values (task, text columns, causal_lm)."""
    from app.core.formats import required_columns
    from app.core.spec import CausalLMSettings

    if values.get("task") == PREFERENCE:  # the prompt and both answers (KTO: the conversation)
        from app.core.formats import preference_columns
        from app.core.spec import PreferenceSettings

        preference = PreferenceSettings.model_validate(values.get(PREFERENCE) or {})
        wanted = [c for f, c in preference_columns(preference).items() if f != "preference.label_column"]
        return [column for column in wanted if column in dataset.columns] or wanted
    if values.get("task") == CAUSAL_LM:
        settings = CausalLMSettings.model_validate(values.get("causal_lm") or {})
        columns = list(required_columns(settings, str(values.get("text_column") or "text")).values())
        return [column for column in columns if column in dataset.columns] or columns
    joined = [str(column) for column in values.get("text_columns") or [] if column]
    return joined or [str(values.get("text_column") or "text")]
