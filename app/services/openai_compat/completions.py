"""OpenAI chat completions and completions: the request shapes, the prompt from the messages, stop strings,
finish reasons and usage, and the stop-string cut over a running generation stream.

The generation itself runs on the inference thread through app/services/generation.py (``start_stream``, the
one streaming loop); the routes are app/api/openai_compat.py.
"""

from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import InvalidSpec
from app.core.formats import GenerationSettings
from app.services.generation import GenerationStream


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # penalties, logit_bias, user, ...: accepted and not used

    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2, description="0 picks the likeliest token.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)

    def stop_strings(self) -> list[str]:
        """The non-empty stop strings asked for, at most four."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop][:4]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, le=4096)
    echo: bool = False


class ClassificationRequest(BaseModel):
    model: str = Field(min_length=1)
    input: str | list[str]


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidSpec(
                f"messages[{index}].content: only text parts are supported (got {part.get('type')!r}).",
                field=f"messages.{index}.content",
            )
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as role/content text (developer becomes system); the last message must be the user's."""
    if body.tools:
        raise InvalidSpec("tools are not supported by this server.", field="tools")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m, i)}
        for i, m in enumerate(body.messages)
    ]
    if messages[-1]["role"] != "user":
        raise InvalidSpec("The last message must come from the user.", field="messages")
    return messages


def generation_settings(
    body: _Sampling, prompt: str, max_tokens: int, use_adapter: bool
) -> GenerationSettings:
    """The studio's generation settings for one prompt of an OpenAI request."""
    return GenerationSettings(
        prompt=prompt,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        use_adapter=use_adapter,
        seed=body.seed,
    )


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def finish_reason(reason: str, stopped_by_string: bool) -> str:
    """OpenAI's finish_reason: ``length`` when the token limit ended it, else ``stop``."""
    return "length" if reason == "length" and not stopped_by_string else "stop"


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object of a response."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def pieces_until_stop(stream: GenerationStream, stops: list[str]) -> AsyncIterator[tuple[str, Any]]:
    """("text", piece) as the model writes, cut at the first stop string (which ends the generation), then
    ("done", (generation, stopped_by_string))."""
    hold = max((len(s) for s in stops), default=1) - 1  # keep back what could be the start of a stop
    buffer, stopped = "", False
    try:
        async for text in stream.pieces:
            buffer += text
            cut, stopped = cut_at_stop(buffer, stops)
            if stopped:
                if cut:
                    yield "text", cut
                stream.stop.set()
                break
            ready = buffer[: len(buffer) - hold] if hold else buffer
            if ready:
                yield "text", ready
                buffer = buffer[len(ready) :]
        if not stopped and buffer:
            yield "text", buffer
        result = await stream.result
        yield "done", (result, stopped)
    finally:
        stream.stop.set()
