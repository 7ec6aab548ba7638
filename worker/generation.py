"""Try-out text generation for causal-LM adapters, on the warm base model with the adapter switched in.

Runs on the web app's inference thread (app/services/generation.py). The prompt goes through the chat
template the adapter was trained with (saved with its tokenizer), generation stops at EOS, and the base-model
side of a comparison runs the same warm model inside peft's ``disable_adapter()``: nothing is reloaded.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

from app.core.base_models import resolve_base_model
from app.core.formats import GenerationSettings, prompt_messages
from worker.inference import WARM
from worker.recipes import get_recipe
from worker.recipes.causal_lm_data import Encoder


@dataclass(frozen=True)
class Generation:
    """A finished generation: the text, its token ids, why it stopped and the prompt as the model saw it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "stopped"
    prompt_text: str
    prompt_tokens: int


class TokenStreamer(AsyncTextIteratorStreamer):
    """transformers' async streamer, emitting each token's text as soon as it decodes to whole characters.

    The base class holds text back until a space or newline (so a word arrives at once); try-out shows tokens
    as they come. Only a token that ends inside a multi-byte character waits for the next one. Create it in
    the event loop (it binds to the running loop); ``put`` and ``end`` are called from the generating thread.
    """

    def put(self, value: Any) -> None:
        if len(value.shape) > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = str(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        if text.endswith("\ufffd"):
            return
        printable = text[self.print_len :]
        if text.endswith("\n"):  # start afresh, so decoding stays cheap on long answers
            self.token_cache, self.print_len = [], 0
        else:
            self.print_len = len(text)
        if printable:
            self.on_finalized_text(printable)


class _StopWhenSet(StoppingCriteria):
    """Stops generation once the event is set (the client went away)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


_PLAIN_BASES: dict[str, Any] = {}


def _plain_base(studio: dict[str, Any]) -> Any:
    """The bare base model, for adapters that cannot be switched off (one kept warm at a time)."""
    key = str(studio["base_model"])
    if key not in _PLAIN_BASES:
        _PLAIN_BASES.clear()
        base = resolve_base_model(key)
        _PLAIN_BASES[key] = get_recipe(str(studio["task"])).load_base(base, studio, {}).eval()
    return _PLAIN_BASES[key]


@torch.inference_mode()  # as in generate() and classify(): the warm model's tensors are inference tensors
def tokenizer_for(adapter_id: int, folder: Path) -> Any:
    """The adapter's tokenizer (and its warm model, loading both if needed)."""
    _, tokenizer, _ = WARM.model_for(adapter_id, folder)
    return tokenizer


def render_prompt(tokenizer: Any, studio: dict[str, Any], prompt: str) -> tuple[str, list[int]]:
    """The prompt as the adapter was trained to see it (through its chat template), and its token ids."""
    encoder = Encoder(tokenizer, tokenizer.chat_template, int(studio.get("max_length", 1024)), False)
    if studio.get("data_format") == "text" or not tokenizer.chat_template:
        return prompt, encoder.prompt_ids(prompt)
    text = encoder.render(prompt_messages(prompt, studio.get("system_prompt")), True)
    return text, encoder.prompt_ids(text)


@torch.inference_mode()
def generate(
    adapter_id: int,
    folder: Path,
    settings: GenerationSettings,
    streamer: Any = None,
    stop: Event | None = None,
    render: Callable[[Any, dict[str, Any]], tuple[str, list[int]]] | None = None,
) -> Generation:
    """Generate a response to a prompt with the adapter (or with the bare base model), optionally streamed.

    ``streamer`` is any transformers streamer (the web app passes a TokenStreamer); on an error it is ended,
    so a reader never waits forever. ``render(tokenizer, studio)`` replaces the rendering of
    ``settings.prompt`` (the OpenAI-compatible chat renders a whole conversation).
    """
    try:
        model, tokenizer, studio = WARM.model_for(adapter_id, folder)
        if render is None:
            prompt_text, prompt_ids = render_prompt(tokenizer, studio, settings.prompt)
        else:
            prompt_text, prompt_ids = render(tokenizer, studio)
        eos = studio.get("eos_token_id", tokenizer.eos_token_id)
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([prompt_ids], dtype=torch.long),
            "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long),
            "max_new_tokens": settings.max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            "streamer": streamer,
            "use_cache": True,
        }
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        if settings.use_adapter:
            output = model.generate(**kwargs)
        elif hasattr(model, "disable_adapter"):  # a peft model: the same weights, adapter switched off
            with model.disable_adapter():
                output = model.generate(**kwargs)
        else:  # a full model or one of the studio's own adapters: the base is a model of its own
            output = _plain_base(studio).generate(**kwargs)
    except BaseException:
        if streamer is not None:
            streamer.end()
        raise
    new_ids = [int(token) for token in output[0, len(prompt_ids) :].tolist()]
    if new_ids and new_ids[-1] == eos:
        finish = "eos"
    elif len(new_ids) >= settings.max_new_tokens:
        finish = "length"
    else:
        finish = "stopped"
    return Generation(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        finish_reason=finish,
        prompt_text=prompt_text,
        prompt_tokens=len(prompt_ids),
    )
