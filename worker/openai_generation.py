"""Generation for the OpenAI-compatible API: a whole conversation through the adapter's chat template.

worker/generation.py renders one typed prompt (try-out and ``/v1/completions``); chat completions send a
conversation (system, user and assistant turns), so this module renders the messages with the same
template and Encoder as training and then generates exactly as try-out does, on the same warm model.
"""

from pathlib import Path
from threading import Event
from typing import Any

import torch
from transformers import StoppingCriteriaList

from app.formats import GenerationSettings, Message
from worker.generation import Generation, _plain_base, _StopWhenSet, render_prompt
from worker.inference import WARM
from worker.recipes.causal_lm_data import Encoder


def render_messages(tokenizer: Any, studio: dict[str, Any], messages: list[Message]) -> tuple[str, list[int]]:
    """The conversation as the adapter was trained to see it, ready for the assistant's turn, and its ids."""
    encoder = Encoder(tokenizer, tokenizer.chat_template, int(studio.get("max_length", 1024)), False)
    if studio.get("data_format") == "text" or not tokenizer.chat_template:
        # Continued pre-training has no turns: the conversation's texts, one after another, are the prompt.
        text = "\n".join(message["content"] for message in messages if message["role"] != "system")
        return text, encoder.prompt_ids(text)
    system = studio.get("system_prompt")
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": str(system)}, *messages]
    text = encoder.render(messages, True)
    return text, encoder.prompt_ids(text)


@torch.inference_mode()
def generate_chat(
    adapter_id: int,
    folder: Path,
    messages: list[Message] | None,
    settings: GenerationSettings,
    streamer: Any = None,
    stop: Event | None = None,
) -> Generation:
    """Answer a conversation (or, with ``messages`` None, ``settings.prompt`` as try-out does), optionally streamed.

    On an error the streamer is ended, so a reader never waits forever.
    """
    try:
        model, tokenizer, studio = WARM.model_for(adapter_id, folder)
        if messages is None:
            prompt_text, prompt_ids = render_prompt(tokenizer, studio, settings.prompt)
        else:
            prompt_text, prompt_ids = render_messages(tokenizer, studio, messages)
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
