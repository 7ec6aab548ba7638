"""Causal-LM adapters in the web app: try-out generation (whole or streamed) and merge-and-download.

Generation runs on the one inference thread shared with classification try-out (app/services/adapters.py),
so the warm base model is only ever touched from that thread. Streaming uses transformers'
AsyncTextIteratorStreamer (emitting per token): the inference thread puts text into an asyncio queue owned
by the event loop, and the SSE response reads it without blocking anything. A client that goes away stops the generation.
"""

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.core.errors import InvalidSpec
from app.core.files import zip_folder
from app.core.formats import GenerationSettings
from app.core.models import Adapter
from app.services.adapters import adapter_folder, inference_thread

CAUSAL_LM = "causal-lm"


def _check_causal(adapter: Adapter) -> None:
    if adapter.task != CAUSAL_LM:
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


async def _stream(
    adapter_id: int, folder: Path, settings: GenerationSettings
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def load() -> Any:
        from worker.generation import tokenizer_for

        return tokenizer_for(adapter_id, folder)

    try:
        tokenizer = await loop.run_in_executor(inference_thread, load)
    except Exception as exc:  # the response has started: report the failure as an event
        yield "error", {"detail": f"{type(exc).__name__}: {exc}"}
        return
    from worker.generation import TokenStreamer  # already imported by the inference thread

    streamer = TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def run() -> Any:
        from worker.generation import generate as generate_text

        return generate_text(adapter_id, folder, settings, streamer=streamer, stop=stop)

    future = loop.run_in_executor(inference_thread, run)
    index = 0
    try:
        async for text in streamer:
            if text:
                yield "token", {"index": index, "text": text}
                index += 1
        try:
            result = await future
        except Exception as exc:  # the stream has started: report the failure as an event
            yield "error", {"detail": f"{type(exc).__name__}: {exc}"}
            return
        yield "done", {**asdict(result), "chunks": index}
    finally:
        stop.set()


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
