"""Generation for the OpenAI-compatible API: a whole conversation through the adapter's chat template.

worker/generation.py renders one typed prompt (try-out and ``/v1/completions``); chat completions send a
conversation (system, user and assistant turns), so this module renders the messages with the same
template and Encoder as training and then generates exactly as try-out does, on the same warm model.
"""

from pathlib import Path
from threading import Event
from typing import Any

from app.core.formats import GenerationSettings, Message
from worker.generation import Generation, generate
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
    if messages is None:
        return generate(adapter_id, folder, settings, streamer, stop)
    return generate(
        adapter_id,
        folder,
        settings,
        streamer,
        stop,
        render=lambda tokenizer, studio: render_messages(tokenizer, studio, messages),
    )
