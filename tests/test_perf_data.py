"""Batching for speed: length-grouped batches cover every example once per epoch and carry less padding."""

import random
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer

from app.core.base_models import bundled_model_path
from app.core.spec import JobSpec
from worker.recipes.classification_data import tokenize
from worker.training import training_arguments


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, **kwargs: Any) -> Any:
        return {"loss": self.linear(torch.ones(1, 1)).sum()}


def _examples(count: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    return [
        {"input_ids": [1] * rng.choice([3, 5, 8, 20, 60, 120]), "attention_mask": [], "labels": i % 2}
        for i in range(count)
    ]


def _sampler(tmp_path: Path, data: list[dict[str, Any]], group: bool, seed: int = 42) -> list[int]:
    spec = JobSpec.model_validate(
        {
            "dataset_id": 1,
            "training": {"batch_size": 8, "group_by_length": group, "seed": seed, "num_epochs": 1},
        }
    )
    args = training_arguments(spec, tmp_path / "out", has_eval=False)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data)
    sampler = trainer._get_train_sampler()
    assert sampler is not None
    return list(iter(sampler))


def _padded(data: list[dict[str, Any]], order: list[int], batch: int = 8) -> int:
    widths = [
        max(len(data[i]["input_ids"]) for i in order[s : s + batch]) for s in range(0, len(order), batch)
    ]
    return sum(w * len(order[s * batch : (s + 1) * batch]) for s, w in enumerate(widths))


def test_length_grouped_batches_cover_every_example_once(tmp_path: Path) -> None:
    from worker.batching import install

    install()  # as the recipes do
    data = _examples(203)  # not a multiple of the batch size
    for seed in (1, 2):
        order = _sampler(tmp_path, data, group=True, seed=seed)
        assert sorted(order) == list(range(len(data)))
    grouped = _sampler(tmp_path, data, group=True)
    shuffled = _sampler(tmp_path, data, group=False)
    assert sorted(shuffled) == list(range(len(data)))
    real = sum(len(example["input_ids"]) for example in data)
    # Grouping by length pads far less than random batches (here most of the random batches' tokens are pad).
    assert _padded(data, grouped) < _padded(data, shuffled)
    assert _padded(data, grouped) < 1.5 * real


def test_tokenized_once_without_padding() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    texts = ["short .", "a somewhat longer sentence about a film that goes on ."]
    examples = tokenize(tokenizer, texts, [0, 1], max_length=128)
    # Stored unpadded (each its own length), as plain lists: epochs reuse them, nothing is re-tokenized.
    assert [len(e["input_ids"]) for e in examples] == [len(tokenizer(t)["input_ids"]) for t in texts]
    batch = DataCollatorWithPadding(tokenizer)(examples)
    assert batch["input_ids"].shape == (2, max(len(e["input_ids"]) for e in examples))


def test_grouped_indices_small_and_large() -> None:
    import torch

    from worker.batching import grouped_indices

    rng = random.Random(1)
    for count, batch in ((0, 8), (5, 8), (8, 8), (128, 32), (203, 8), (5000, 32)):
        lengths = [rng.randint(1, 128) for _ in range(count)]
        order = grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(0))
        assert sorted(order) == list(range(count))
        batches = [order[s : s + batch] for s in range(0, count, batch)]
        if count >= 2 * batch:
            # the longest batch first; full batches before the partial one; spread within batches small
            assert max(lengths[i] for i in batches[0]) == max(lengths)
            assert all(len(b) == batch for b in batches[:-1])
            padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
            assert padded < 1.3 * sum(lengths)
    # different epochs (generators) give different orders
    lengths = [rng.randint(1, 128) for _ in range(256)]
    first = grouped_indices(lengths, 32, generator=torch.Generator().manual_seed(0))
    second = grouped_indices(lengths, 32, generator=torch.Generator().manual_seed(1))
    assert first != second
