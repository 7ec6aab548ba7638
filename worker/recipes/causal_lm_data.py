"""Causal-LM data: rows to token ids with loss masks, packing, and the collators that batch them.

Shared by training (worker/recipes/causal_lm.py) and the job preview in the web app, so the preview shows
exactly what the model trains on. Needs a tokenizer object but imports neither torch nor transformers at
module level.

Packing (``causal_lm.packing``, docs/performance.md): examples are concatenated with ``position_ids``
restarting at 0 for every example and no attention mask. transformers 5 builds a block-diagonal causal mask
from such position ids for the eager and SDPA attention of every model that builds its mask with
``masking_utils.create_causal_mask`` (``find_packed_sequence_indices``), and flash-attention turns them into
varlen ``cu_seqlens``, as long as no KV cache is in play, so the recipe turns ``use_cache`` off for training;
tests/test_causal_lm.py checks that an example's logits are the same packed or alone. Two ways:

* ``on`` (padding-free, ``PaddingFreeCollator``): each batch's examples are concatenated when the batch is
  made, so a step sees exactly the examples (and the loss) it would unpacked, minus the padding. Under
  flash-attention varlen the whole batch is one row (attention costs the sum of the squared example lengths);
  under SDPA/eager the mask is dense, so the examples are bin-packed into rows of at most ``max_length``
  tokens instead of one ``batch × length`` long row whose attention would cost its square; under per-example
  SDPA (``sdpa_varlen``) into rows of up to 2,048 tokens (recipes/causal_lm.py: ``padding_free_row_tokens``).
* ``rows`` (the original packing, ``pack``): the whole training set is bin-packed once into rows of
  ``max_length`` tokens, and the batch size counts rows: fewer, fuller steps.
"""

import bisect
import random
from dataclasses import dataclass
from typing import Any

from app.core.chat_templates import resolve_template
from app.core.datasets_io import load_rows
from app.core.errors import InvalidDataset
from app.core.formats import Example, Segment, example_from_row, render_segments
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store
from worker.batching import install as install_length_grouping

IGNORE = -100


@dataclass
class EncodedExample:
    """Token ids and labels of one example (labels are IGNORE where no loss is computed)."""

    input_ids: list[int]
    labels: list[int]
    row: int
    truncated: bool = False

    def features(self) -> dict[str, Any]:
        """The example as a Trainer dataset item."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": [1] * len(self.input_ids),
            "labels": self.labels,
        }

    def packable(self) -> dict[str, Any]:
        """The example as a dataset item for padding-free packing (its own position ids, no attention mask)."""
        return {
            "input_ids": self.input_ids,
            "labels": [IGNORE, *self.labels[1:]],
            "position_ids": list(range(len(self.input_ids))),
        }


@dataclass
class CausalData:
    """Encoded training and validation examples, with counts of what was cut or dropped."""

    train: list[EncodedExample]
    eval: list[EncodedExample]
    truncated: int
    dropped: int


def read_examples(dataset: Dataset, spec: JobSpec, limit: int | None = None) -> list[tuple[int, Example]]:
    """(row number, example) for the rows of a dataset, in file order."""
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    chosen = rows if limit is None else rows[:limit]
    return [
        (number, example_from_row(row, spec.causal_lm, spec.text_column, number))
        for number, row in enumerate(chosen, start=1)
    ]


def held_out_rows(row_count: int, fraction: float, seed: int) -> set[int]:
    """0-based indices of the rows held out for validation (seeded, as for classification)."""
    order = list(range(row_count))
    random.Random(seed).shuffle(order)
    return set(order[: round(row_count * fraction)])


class Encoder:
    """Turns examples into token ids and labels with a tokenizer and the job's chat template."""

    def __init__(
        self, tokenizer: Any, chat_template: str | None, max_length: int, train_on_prompt: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        bos = tokenizer.bos_token_id
        # Add BOS in front of rendered text only where the tokenizer itself would (Llama does, GPT-2 not).
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as the chat template writes it."""
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        )

    def segments(self, example: Example, row: int = 0) -> list[Segment]:
        """The example's text split into masked and trained pieces."""
        assert example.messages is not None
        try:
            return render_segments(
                example.messages, self.render, self.tokenizer.eos_token, self.train_on_prompt
            )
        except InvalidDataset:
            raise
        except Exception as exc:  # a template that raises (e.g. it refuses a system message)
            raise InvalidDataset(
                f"Row {row}: the chat template cannot render this conversation "
                f"({type(exc).__name__}: {exc}).",
                row=row or None,
            ) from None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, with BOS where the tokenizer adds one."""
        ids = self._ids(text)
        bos_text = self.tokenizer.bos_token
        if self.bos_id is not None and not (bos_text and text.startswith(bos_text)):
            ids = [self.bos_id, *ids]
        return ids

    def encode(self, example: Example, row: int) -> list[EncodedExample]:
        """One example as token ids and labels; a long plain text becomes several max-length pieces."""
        if example.messages is None:
            assert example.text is not None
            ids = [*self.prompt_ids(example.text), self.tokenizer.eos_token_id]
            pieces = [ids[start : start + self.max_length] for start in range(0, len(ids), self.max_length)]
            return [EncodedExample(piece, [IGNORE, *piece[1:]], row) for piece in pieces if len(piece) > 1]
        input_ids: list[int] = []
        labels: list[int] = []
        for index, segment in enumerate(self.segments(example, row)):
            ids = self.prompt_ids(segment.text) if index == 0 else self._ids(segment.text)
            input_ids += ids
            labels += ids if segment.trained else [IGNORE] * len(ids)
        truncated = len(input_ids) > self.max_length
        # The first token is never predicted (nothing comes before it): no loss there, whatever the mask says.
        labels[0] = IGNORE
        return [EncodedExample(input_ids[: self.max_length], labels[: self.max_length], row, truncated)]


def load_tokenizer(path: str) -> Any:
    """A model folder's tokenizer, with a pad token (EOS where it has none: padded labels are ignored)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def job_encoder(spec: JobSpec, tokenizer: Any) -> tuple[Encoder, str]:
    """The encoder of a job's examples and the name of its chat template (``tokenizer`` for the model's own).

    The tokenizer's ``chat_template`` becomes the template used, so the adapter's saved tokenizer has it.
    """
    settings = spec.causal_lm
    name, template = resolve_template(settings.template, tokenizer.chat_template)
    if settings.format != "text":
        tokenizer.chat_template = template
    return Encoder(tokenizer, template, spec.training.max_length, settings.train_on_prompt), name


def encode_all(
    encoder: Encoder, examples: list[tuple[int, Example]]
) -> tuple[list[EncodedExample], int, int]:
    """Encoded examples with at least one trained token, and how many were truncated and dropped."""
    kept: list[EncodedExample] = []
    truncated = dropped = 0
    for row, example in examples:
        for encoded in encoder.encode(example, row):
            truncated += encoded.truncated
            if any(label != IGNORE for label in encoded.labels):
                kept.append(encoded)
            else:
                dropped += 1
    return kept, truncated, dropped


def causal_data(spec: JobSpec, train: Dataset, validation: Dataset | None, encoder: Encoder) -> CausalData:
    """Read, split (seeded) and encode the data of a causal-LM job."""
    install_length_grouping()  # length-grouped batches for unpacked data (worker/batching.py)
    examples = read_examples(train, spec)
    if validation is not None:
        eval_examples = read_examples(validation, spec)
    elif spec.validation_fraction > 0:
        held_out = held_out_rows(len(examples), spec.validation_fraction, spec.training.seed)
        eval_examples = [examples[i] for i in sorted(held_out)]
        examples = [example for i, example in enumerate(examples) if i not in held_out]
    else:
        eval_examples = []
    train_encoded, truncated, dropped = encode_all(encoder, examples)
    eval_encoded, eval_truncated, eval_dropped = encode_all(encoder, eval_examples)
    if not train_encoded:
        raise InvalidDataset(
            f"No training example has a response token left within max_length {spec.training.max_length}: "
            "the prompts are longer than that. Raise training.max_length or shorten the prompts."
        )
    return CausalData(train_encoded, eval_encoded, truncated + eval_truncated, dropped + eval_dropped)


def best_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into bins of at most ``capacity`` (best fit, longest first)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        size = sizes[index]
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, bin_index = free.pop(slot)
        else:
            room, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if room - size > 0:
            bisect.insort(free, (room - size, bin_index))
    return bins


def tightest_rows(sizes: list[int], max_row: int) -> list[list[int]]:
    """Examples grouped into rows of at most ``max_row`` tokens so that the padded batch is smallest.

    The batch is rectangular (rows padded to the longest), so rows of ``max_row`` tokens can waste most of the
    last rows; trying every capacity from the longest example up to ``max_row`` at which the rows could be
    full (total / k) and keeping the one with the fewest padded tokens (then the shortest rows: attention
    costs the square of a row) leaves at most about one example's worth of padding.
    """
    longest, total = max(sizes), sum(sizes)
    capacities = {longest, max(longest, min(max_row, total))}
    capacities |= {-(-total // k) for k in range(1, len(sizes) + 1) if longest <= -(-total // k) <= max_row}
    best: tuple[int, int, list[list[int]]] | None = None
    for capacity in sorted(capacities):
        rows = best_fit(sizes, capacity)
        width = max(sum(sizes[i] for i in row) for row in rows)
        cost = (len(rows) * width, width)
        if best is None or cost < best[:2]:
            best = (*cost, rows)
    assert best is not None
    return best[2]


def pack(examples: list[EncodedExample], max_length: int) -> list[dict[str, Any]]:
    """Examples packed into rows of at most ``max_length`` tokens (best fit, longest first).

    Each row's ``position_ids`` restart at 0 for every example, which keeps examples from attending to one
    another; the first label of every example is ignored so no token learns to predict across a boundary.
    """
    rows: list[dict[str, Any]] = []
    for members in best_fit([len(example.input_ids) for example in examples], max_length):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            input_ids += example.input_ids
            labels += [IGNORE, *example.labels[1:]]
            positions += list(range(len(example.input_ids)))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return rows


class PackedCollator:
    """Batches packed rows: pads to the longest row and passes position ids instead of an attention mask.

    Written here because transformers' collators either flatten a whole batch into one row
    (``DataCollatorWithFlattening``) or pad with an attention mask, which would turn packing detection off.
    Padding gets positions of its own (0, 1, ...) after the last example, so it is a separate sequence that
    no real token attends to, and its labels are ignored.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(feature["input_ids"]) for feature in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            pad = width - len(feature["input_ids"])
            batch["input_ids"].append([*feature["input_ids"], *[self.pad_token_id] * pad])
            batch["labels"].append([*feature["labels"], *[IGNORE] * pad])
            batch["position_ids"].append([*feature["position_ids"], *range(pad)])
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


class PaddingFreeCollator:
    """Padding-free packing of one batch: its examples concatenated, position ids restarting per example.

    ``row_tokens`` None puts the whole batch in one row (for flash-attention varlen, whose cost is per example);
    a number bin-packs the examples into rows of at most that many tokens (SDPA and eager attention build a
    dense mask over a row, so a row as long as the whole batch would cost its square), at the row width that
    pads least (``tightest_rows``). Written here rather
    than using ``DataCollatorWithFlattening``, which only makes the single row. Each example's first label is
    ignored (the encoder already does so), so no token learns to predict across a boundary, and the loss is
    the unpacked batch's loss.
    """

    def __init__(self, pad_token_id: int, row_tokens: int | None) -> None:
        self.row_tokens = row_tokens
        self.padded = PackedCollator(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = [len(feature["input_ids"]) for feature in features]
        if self.row_tokens is None:
            groups = [list(range(len(features)))]
        else:
            groups = tightest_rows(sizes, self.row_tokens)
        rows = [
            {
                key: [value for index in members for value in features[index][key]]
                for key in ("input_ids", "labels", "position_ids")
            }
            for members in groups
        ]
        return self.padded(rows)
