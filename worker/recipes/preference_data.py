"""Preference data: rows to the prompt, chosen and rejected texts (or KTO's prompt, completion and label) that trl's
trainers tokenize, rendered through the job's chat template.

Shared by training (worker/recipes/preference.py) and the job preview, so the preview shows what the model trains
on: the prompt (masked: no loss there), the answers with the template applied and EOS at their end, and the
token counts trl's collator truncates at ``max_length`` (prompt and answer together, answer end cut first).
Needs a tokenizer object but imports neither torch nor transformers at module level.
"""

import random
from dataclasses import dataclass
from typing import Any

from app.core.chat_templates import resolve_template
from app.core.datasets_io import load_rows
from app.core.errors import InvalidDataset
from app.core.formats import PreferenceExample, preference_example_from_row, render_preference
from app.core.models import Dataset
from app.core.spec import JobSpec
from app.core.storage import get_store


def read_preference_examples(
    dataset: Dataset, spec: JobSpec, limit: int | None = None
) -> list[tuple[int, PreferenceExample]]:
    """(row number, example) for the rows of a dataset, in file order; InvalidDataset names a bad row."""
    _, rows = load_rows(
        get_store().local_file(dataset.storage_key), dataset.format, dataset.profile.get("import")
    )
    chosen = rows if limit is None else rows[:limit]
    return [
        (number, preference_example_from_row(row, spec.preference, number))
        for number, row in enumerate(chosen, start=1)
    ]


@dataclass
class RenderedExample:
    """One example as trl receives it: rendered prompt and answer texts (and KTO's label), with token counts."""

    row: int
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    prompt_tokens: int = 0
    answer_tokens: tuple[int, ...] = ()
    truncated: bool = False

    def record(self) -> dict[str, Any]:
        """The row of the ``datasets.Dataset`` trl's trainer takes."""
        if self.completion is not None:
            return {"prompt": self.prompt, "completion": self.completion, "label": bool(self.label)}
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


class PreferenceRenderer:
    """Renders preference examples with the tokenizer and the job's chat template into trl's text records."""

    def __init__(self, tokenizer: Any, chat_template: str, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        bos = tokenizer.bos_token
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        # trl tokenizes the texts with the tokenizer's special tokens: strip a BOS the template writes itself.
        self.strip_bos = (
            bos
            if bos and tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
            else None
        )

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        )

    def _pair(self, prompt: list[dict[str, str]], answer: list[dict[str, str]], row: int) -> tuple[str, str]:
        try:
            text, response = render_preference(prompt, answer, self._render, self.tokenizer.eos_token)
        except InvalidDataset:
            raise
        except Exception as exc:  # a template that raises (e.g. it refuses a system message)
            raise InvalidDataset(
                f"Row {row}: the chat template cannot render this conversation ({type(exc).__name__}: {exc}).",
                row=row,
            ) from None
        if self.strip_bos and text.startswith(self.strip_bos):
            text = text[len(self.strip_bos) :]
        return text, response

    def _count(self, text: str, special: bool) -> int:
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def render(self, example: PreferenceExample, row: int) -> RenderedExample:
        """The example's texts and token counts; ``truncated`` when prompt + an answer exceed max length."""
        if example.completion is not None:
            prompt, completion = self._pair(example.prompt, example.completion, row)
            prompt_tokens = self._count(prompt, True)
            answers: tuple[int, ...] = (self._count(completion, False),)
            rendered = RenderedExample(row, prompt, completion=completion, label=example.desirable)
        else:
            assert example.chosen is not None and example.rejected is not None
            prompt, chosen = self._pair(example.prompt, example.chosen, row)
            _, rejected = self._pair(example.prompt, example.rejected, row)
            prompt_tokens = self._count(prompt, True)
            answers = (self._count(chosen, False), self._count(rejected, False))
            rendered = RenderedExample(row, prompt, chosen=chosen, rejected=rejected)
        rendered.prompt_tokens = prompt_tokens
        rendered.answer_tokens = answers
        rendered.truncated = any(prompt_tokens + tokens > self.max_length for tokens in answers)
        return rendered


def job_renderer(spec: JobSpec, tokenizer: Any) -> tuple[PreferenceRenderer, str]:
    """The renderer of a job's examples and the name of its chat template; the tokenizer keeps the template, so
    the adapter's saved tokenizer (and try-out) uses the one it was trained with."""
    name, template = resolve_template(spec.preference.template, tokenizer.chat_template)
    tokenizer.chat_template = template
    return PreferenceRenderer(tokenizer, template, spec.training.max_length), name


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """0-based indices of the examples held out for validation (seeded, as for the other tasks)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[: round(count * fraction)])


def unpaired(examples: list[tuple[int, PreferenceExample]]) -> list[tuple[int, PreferenceExample]]:
    """Pairs as KTO's answers marked good or bad: each pair gives its chosen (good) and its rejected (bad)."""
    out: list[tuple[int, PreferenceExample]] = []
    for row, example in examples:
        if example.completion is not None:
            out.append((row, example))
            continue
        out.append((row, PreferenceExample(prompt=example.prompt, completion=example.chosen, desirable=True)))
        out.append(
            (row, PreferenceExample(prompt=example.prompt, completion=example.rejected, desirable=False))
        )
    return out


@dataclass
class PreferenceData:
    """Rendered training and validation examples, how many went past max length (trl truncates them), and how
    many were skipped because their prompt alone fills it."""

    train: list[RenderedExample]
    eval: list[RenderedExample]
    truncated: int
    dropped: int = 0


def preference_data(
    spec: JobSpec, train: Dataset, validation: Dataset | None, renderer: PreferenceRenderer
) -> PreferenceData:
    """Read, split (seeded) and render the data of a preference job (KTO takes pairs as good and bad answers)."""
    examples = read_preference_examples(train, spec)
    if validation is not None:
        eval_examples = read_preference_examples(validation, spec)
    elif spec.validation_fraction > 0:
        held = held_out(len(examples), spec.validation_fraction, spec.training.seed)
        eval_examples = [examples[i] for i in sorted(held)]
        examples = [example for i, example in enumerate(examples) if i not in held]
    else:
        eval_examples = []
    if spec.preference.loss == "kto":
        examples, eval_examples = unpaired(examples), unpaired(eval_examples)
    rendered = [renderer.render(example, row) for row, example in examples]
    rendered_eval = [renderer.render(example, row) for row, example in eval_examples]
    # trl drops examples whose prompt alone fills max length (no answer token would be left)
    kept = [example for example in rendered if example.prompt_tokens < renderer.max_length]
    if not kept:
        raise InvalidDataset(
            f"No training example has an answer token left within max_length {spec.training.max_length}: the "
            "prompts are longer than that. Raise training.max_length or shorten the prompts."
        )
    kept_eval = [example for example in rendered_eval if example.prompt_tokens < renderer.max_length]
    kept_all = kept + kept_eval
    truncated = sum(example.truncated for example in kept_all)
    return PreferenceData(kept, kept_eval, truncated, len(rendered) + len(rendered_eval) - len(kept_all))
