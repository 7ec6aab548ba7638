"""Causal-LM adapters in the web app: try-out generation (whole or streamed) and merge-and-download.

Generation runs on the one inference thread shared with classification try-out (app/services/adapters.py),
so the warm base model is only ever touched from that thread. Streaming uses transformers'
AsyncTextIteratorStreamer (emitting per token): the inference thread puts text into an asyncio queue owned
by the event loop, and the SSE response reads it without blocking anything. A client that goes away stops the generation.
``start_stream`` is the one streaming loop: try-out generation here and the OpenAI chat and completion streams
(app/api/openai_compat.py) both run on it.
"""

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidSpec
from app.core.files import zip_folder
from app.core.formats import GenerationSettings
from app.core.models import Adapter
from app.core.tasks import find_task
from app.services.adapters import adapter_folder, inference_thread


def _check_causal(adapter: Adapter) -> None:
    info = find_task(adapter.task)
    if info is None or not info.generates_text:
        raise InvalidSpec(
            f"Adapter {adapter.id} is a {adapter.task} adapter; generate is for causal-lm adapters (use predict).",
            field="adapter",
        )


async def generate(adapter: Adapter, settings: GenerationSettings) -> dict[str, Any]:
    """A whole response to a prompt."""
    _check_causal(adapter)
    folder = adapter_folder(adapter)

    def run() -> dict[str, Any]:
        from worker.generation import generate as generate_text  # heavy imports stay out of web start-up

        return asdict(generate_text(adapter.id or 0, folder, settings))

    return await asyncio.get_running_loop().run_in_executor(inference_thread, run)


def stream(adapter: Adapter, settings: GenerationSettings) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs: ``token`` for each piece of text in order, then ``done`` (or ``error``).

    The adapter is checked now, so a wrong one is a 4xx response rather than an error event.
    """
    _check_causal(adapter)
    return _stream(adapter.id or 0, adapter_folder(adapter), settings)


@dataclass
class GenerationStream:
    """A generation running on the inference thread: its text as it comes, its result, and a stop switch.

    Iterating ``pieces`` gives the decoded text piece by piece; ``result`` is the finished generation (it
    raises what the generation raised); setting ``stop`` ends it early (a client went away, a stop string).
    """

    pieces: AsyncIterator[str]
    result: Awaitable[Any]
    stop: threading.Event


async def start_stream(
    adapter_id: int, folder: Path, run: Callable[[Any, threading.Event], Any]
) -> GenerationStream:
    """Load the adapter's tokenizer on the inference thread (raising when that fails), then start
    ``run(streamer, stop)`` there, which generates into the streamer until done or stopped."""
    loop = asyncio.get_running_loop()

    def load() -> Any:
        from worker.generation import tokenizer_for  # heavy imports stay out of web start-up

        return tokenizer_for(adapter_id, folder)

    tokenizer = await loop.run_in_executor(inference_thread, load)
    from worker.generation import TokenStreamer  # already imported by the inference thread

    streamer = TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    future = loop.run_in_executor(inference_thread, lambda: run(streamer, stop))
    return GenerationStream(pieces=streamer, result=future, stop=stop)


async def _stream(
    adapter_id: int, folder: Path, settings: GenerationSettings
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    def run(streamer: Any, stop: threading.Event) -> Any:
        from worker.generation import generate as generate_text

        return generate_text(adapter_id, folder, settings, streamer=streamer, stop=stop)

    try:
        stream = await start_stream(adapter_id, folder, run)
    except Exception as exc:  # the response has started: report the failure as an event
        yield "error", {"detail": f"{type(exc).__name__}: {exc}"}
        return
    index = 0
    try:
        async for text in stream.pieces:
            if text:
                yield "token", {"index": index, "text": text}
                index += 1
        try:
            result = await stream.result
        except Exception as exc:  # the stream has started: report the failure as an event
            yield "error", {"detail": f"{type(exc).__name__}: {exc}"}
            return
        yield "done", {**asdict(result), "chunks": index}
    finally:
        stream.stop.set()


async def merged_archive(adapter: Adapter) -> Path:
    """A zip of the base model with the adapter merged in (a plain transformers folder); the caller deletes it.

    Merging loads a full-precision copy of the base, so it runs on a thread of its own, not the inference one.
    """
    from worker.merge import check_mergeable

    folder = adapter_folder(adapter)
    check_mergeable(folder, adapter.id or 0, adapter.method)

    def run() -> Path:
        from worker.merge import merge_into_base

        work = Path(tempfile.mkdtemp(prefix=f"merged-{adapter.id}-"))
        try:
            merge_into_base(folder, work / "model")
            return zip_folder(work / "model", prefix=f"merged-{adapter.id}-")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return await asyncio.to_thread(run)


def sse_data(data: dict[str, Any]) -> str:
    """An event's JSON payload."""
    return json.dumps(data, ensure_ascii=False)
