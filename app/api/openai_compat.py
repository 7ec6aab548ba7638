"""The OpenAI-compatible API under /v1: files, fine-tuning jobs, models, chat completions and completions.

The official ``openai`` client works unchanged with ``base_url="http://studio/v1"`` and a studio API token as
``api_key``. Objects map onto the studio's own (see app/services/openai_compat.py); errors come back in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}`` (a route class converts the studio's errors here, so
the native API keeps its own shape).
"""

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from sse_starlette.sse import EventSourceResponse

from app.core.errors import InvalidSpec, StudioError
from app.core.formats import GenerationSettings
from app.core.models import Adapter
from app.core.storage import get_store
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.http.gate import openai_error_body
from app.services import adapters as adapters_service
from app.services import audit
from app.services import datasets as datasets_service
from app.services import generation as generation_service
from app.services.openai_compat import completions as completions_service
from app.services.openai_compat import errors as errors_service
from app.services.openai_compat import files as files_service
from app.services.openai_compat import fine_tuning as fine_tuning_service
from app.services.openai_compat import models as models_service
from app.services.openai_compat import progress as progress_service
from app.services.openai_compat.completions import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    chat_messages,
    cut_at_stop,
    finish_reason,
    generation_settings,
    token_usage,
)

# ---- errors in OpenAI's shape -----------------------------------------------------------------


def error_response(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """``{"error": {...}}`` as OpenAI answers; 422s become 400 (what OpenAI clients expect for bad input)."""
    if status_code == 422:
        status_code = 400
    if status_code == 413 and code is None:
        code = "file_too_large"
    return JSONResponse(openai_error_body(status_code, message, param, code), status_code=status_code)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """A request validation error as OpenAI answers bad input: 400, the first problem, its parameter."""
    message, param = errors_service.validation_problem(list(exc.errors()))
    return error_response(400, message, param, "invalid_value")


class OpenAIRoute(APIRoute):
    """Answers the studio's errors and request validation errors in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_response(exc)
            except StudioError as exc:
                return error_response(exc.status_code, exc.message, exc.field)

        return openai_handler


router = APIRouter(prefix="/v1", tags=["openai-compatible"], route_class=OpenAIRoute)

Limit = Annotated[int, Query(ge=1, le=100)]


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# ---- files ------------------------------------------------------------------------------------


@router.post("/files")
def create_file(
    session: SessionDep, user: CurrentUser, file: UploadFile = File(...), purpose: str = Form(...)
) -> dict[str, Any]:
    """Upload a JSONL fine-tune file (chat `messages` or `prompt`/`completion` lines); it becomes a dataset."""
    dataset = files_service.upload_file(session, file.file, file.filename, purpose, user.id)
    audit.record(session, user, "create", "dataset", dataset.id, "POST /v1/files")
    return files_service.file_object(dataset)


@router.get("/files")
def list_files(
    session: SessionDep,
    owner_id: OwnerScope,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    """Files (every dataset, purpose fine-tune), newest first."""
    if purpose not in (None, "fine-tune"):
        return _list([], False)
    rows, has_more = files_service.list_files(session, after, limit, order, owner_id)
    return _list([files_service.file_object(row) for row in rows], has_more)


@router.get("/files/{file_id}")
def retrieve_file(session: SessionDep, owner_id: OwnerScope, file_id: str) -> dict[str, Any]:
    """One file."""
    return files_service.file_object(files_service.get_file(session, file_id, owner_id))


@router.delete("/files/{file_id}")
def delete_file(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, file_id: str) -> dict[str, Any]:
    """Delete a file (the dataset); refused while a queued or running job uses it."""
    dataset = files_service.get_file(session, file_id, owner_id)
    assert dataset.id is not None
    datasets_service.delete_dataset(session, dataset.id, owner_id)
    audit.record(session, user, "delete", "dataset", dataset.id, "DELETE /v1/files")
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(session: SessionDep, owner_id: OwnerScope, file_id: str) -> FileResponse:
    """The file's bytes as uploaded."""
    dataset = files_service.get_file(session, file_id, owner_id)
    return FileResponse(get_store().local_file(dataset.storage_key), filename=dataset.filename)


# ---- fine-tuning jobs -------------------------------------------------------------------------


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(
    session: SessionDep, user: CurrentUser, body: fine_tuning_service.FineTuningJobCreate
) -> dict[str, Any]:
    """Create a supervised fine-tuning job: a causal-LM job on the studio's engine.

    Our method and its settings: the `peft` extension field ({method, config, training, causal_lm,
    validation_fraction, name}) or metadata keys `peft.method` and `peft.config` (JSON text).
    """
    job = fine_tuning_service.create_job(session, body, user.id)
    audit.record(session, user, "create", "job", job.id, "POST /v1/fine_tuning/jobs")
    return fine_tuning_service.job_object(session, job)


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(
    session: SessionDep, owner_id: OwnerScope, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    """Jobs, newest first; page with `after` (the last job id seen) and `limit`."""
    rows, has_more = fine_tuning_service.list_jobs(session, after, limit, owner_id)
    return _list([fine_tuning_service.job_object(session, row) for row in rows], has_more)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_fine_tuning_job(session: SessionDep, owner_id: OwnerScope, job_id: str) -> dict[str, Any]:
    """One job."""
    return fine_tuning_service.job_object(session, fine_tuning_service.get_job(session, job_id, owner_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tuning_job(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, job_id: str
) -> dict[str, Any]:
    """Cancel a queued job at once, or stop a running one within a few seconds."""
    job = fine_tuning_service.cancel_job(session, job_id, owner_id)
    audit.record(session, user, "cancel", "job", job.id, "POST /v1/fine_tuning/jobs/{id}/cancel")
    return fine_tuning_service.job_object(session, job)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_fine_tuning_events(
    session: SessionDep, owner_id: OwnerScope, job_id: str, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    """Status messages (`type: message`) and logged metrics (`type: metrics`, data {step, train_loss,
    valid_loss, ...}), newest first."""
    data, has_more = progress_service.list_events(session, job_id, after, limit, owner_id)
    return _list(data, has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    session: SessionDep, owner_id: OwnerScope, job_id: str, after: str | None = None, limit: Limit = 10
) -> dict[str, Any]:
    """Saved checkpoints with their metrics, and the finished adapter as the last one; newest first."""
    data, has_more = progress_service.list_checkpoints(session, job_id, after, limit, owner_id)
    return _list(data, has_more)


# ---- models -----------------------------------------------------------------------------------


@router.get("/models")
def list_models(session: SessionDep, owner_id: OwnerScope) -> dict[str, Any]:
    """Base models and fine-tuned models (finished adapters)."""
    return {"object": "list", "data": models_service.list_models(session, owner_id)}


@router.get("/models/{model:path}")
def retrieve_model(session: SessionDep, owner_id: OwnerScope, model: str) -> dict[str, Any]:
    """One model by name."""
    for item in models_service.list_models(session, owner_id):
        if item["id"] == model:
            return item
    return error_response(404, f"The model {model!r} does not exist.", "model", "model_not_found")  # type: ignore[return-value]


# ---- inference --------------------------------------------------------------------------------


async def _generate(
    adapter: Adapter, messages: list[dict[str, str]] | None, settings: GenerationSettings
) -> dict[str, Any]:
    folder = adapters_service.adapter_folder(adapter)

    def run() -> dict[str, Any]:
        from worker.openai_generation import generate_chat  # heavy imports stay out of web start-up

        return asdict(generate_chat(adapter.id or 0, folder, messages, settings))  # type: ignore[arg-type]

    return await asyncio.get_running_loop().run_in_executor(adapters_service.inference_thread, run)


async def _open_stream(
    adapter: Adapter, messages: list[dict[str, str]] | None, settings: GenerationSettings, stops: list[str]
) -> AsyncIterator[tuple[str, Any]]:
    """Load the tokenizer now (a failure is still an error response), then yield ("text", piece) and
    finally ("done", (generation, stopped_by_string))."""
    folder = adapters_service.adapter_folder(adapter)
    adapter_id = adapter.id or 0

    def run(streamer: Any, stop: threading.Event) -> Any:
        from worker.openai_generation import generate_chat  # heavy imports stay out of web start-up

        return generate_chat(adapter_id, folder, messages, settings, streamer=streamer, stop=stop)  # type: ignore[arg-type]

    stream = await generation_service.start_stream(adapter_id, folder, run)
    return completions_service.pieces_until_stop(stream, stops)


async def _classify(adapter: Adapter, texts: list[str]) -> list[dict[str, Any]]:
    return await adapters_service.predict(adapter, texts)


def _sse(events: AsyncIterator[dict[str, Any] | str]) -> EventSourceResponse:
    async def frames() -> AsyncIterator[dict[str, str]]:
        import json

        async for event in events:
            yield {"data": event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}

    return EventSourceResponse(frames(), ping=15, sep="\n")


@router.post("/chat/completions", response_model=None)
async def chat_completions(session: SessionDep, owner_id: OwnerScope, body: ChatCompletionRequest) -> Any:
    """Chat with a fine-tuned model; `stream: true` sends `chat.completion.chunk` SSE events, then `[DONE]`.

    A classification adapter answers with the predicted label of the last user message.
    """
    adapter, use_adapter = models_service.resolve_model(session, body.model, owner_id)
    messages = chat_messages(body)
    created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    stops = body.stop_strings()

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    if not models_service.generates_text(adapter):
        label = (await _classify(adapter, [messages[-1]["content"]]))[0]["label"]
        text, finish, usage = label, "stop", token_usage(0, 1)
        if body.stream:

            async def label_events() -> AsyncIterator[dict[str, Any] | str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                yield chunk({"content": text}, None)
                yield chunk({}, finish)
                if body.stream_options and body.stream_options.include_usage:
                    yield {**chunk({}, None), "choices": [], "usage": usage}
                yield "[DONE]"

            return _sse(label_events())
    else:
        settings = generation_settings(body, messages[-1]["content"], max_tokens, use_adapter)
        if body.stream:
            stream = await _open_stream(adapter, messages, settings, stops)

            async def events() -> AsyncIterator[dict[str, Any] | str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for kind, value in stream:
                    if kind == "text":
                        yield chunk({"content": value}, None)
                    else:
                        result, stopped = value
                        yield chunk({}, finish_reason(result.finish_reason, stopped))
                        if body.stream_options and body.stream_options.include_usage:
                            usage = token_usage(result.prompt_tokens, len(result.token_ids))
                            yield {**chunk({}, None), "choices": [], "usage": usage}
                yield "[DONE]"

            return _sse(events())
        result = await _generate(adapter, messages, settings)
        text, stopped = cut_at_stop(result["text"], stops)
        finish, usage = (
            finish_reason(result["finish_reason"], stopped),
            token_usage(result["prompt_tokens"], len(result["token_ids"])),
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


@router.post("/completions", response_model=None)
async def completions(session: SessionDep, owner_id: OwnerScope, body: CompletionRequest) -> Any:
    """Complete a prompt with a fine-tuned model (the prompt goes through the adapter's chat template, as in
    try-out); `stream: true` sends `text_completion` SSE events, then `[DONE]`. A classification adapter
    answers with the predicted label."""
    adapter, use_adapter = models_service.resolve_model(session, body.model, owner_id)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise InvalidSpec("Send exactly one non-empty prompt per request.", field="prompt")
    if body.echo:
        raise InvalidSpec("echo is not supported by this server.", field="echo")
    prompt = prompts[0]
    created, completion_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    stops = body.stop_strings()

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if not models_service.generates_text(adapter):
        text, finish, usage = (await _classify(adapter, [prompt]))[0]["label"], "stop", token_usage(0, 1)
        if body.stream:

            async def label_events() -> AsyncIterator[dict[str, Any] | str]:
                yield choice(text, None)
                yield choice("", finish)
                yield "[DONE]"

            return _sse(label_events())
    else:
        settings = generation_settings(body, prompt, body.max_tokens or 16, use_adapter)
        if body.stream:
            stream = await _open_stream(adapter, None, settings, stops)

            async def events() -> AsyncIterator[dict[str, Any] | str]:
                async for kind, value in stream:
                    if kind == "text":
                        yield choice(value, None)
                    else:
                        result, stopped = value
                        yield choice("", finish_reason(result.finish_reason, stopped))
                        if body.stream_options and body.stream_options.include_usage:
                            usage = token_usage(result.prompt_tokens, len(result.token_ids))
                            yield {**choice("", None), "choices": [], "usage": usage}
                yield "[DONE]"

            return _sse(events())
        result = await _generate(adapter, None, settings)
        text, stopped = cut_at_stop(result["text"], stops)
        finish, usage = (
            finish_reason(result["finish_reason"], stopped),
            token_usage(result["prompt_tokens"], len(result["token_ids"])),
        )
    return {**choice(text, finish), "usage": usage}


@router.post("/classifications", status_code=status.HTTP_200_OK)
async def classifications(
    session: SessionDep, owner_id: OwnerScope, body: ClassificationRequest
) -> dict[str, Any]:
    """The studio's extension for classification adapters: labels and class probabilities for texts."""
    adapter, _ = models_service.resolve_model(session, body.model, owner_id)
    if models_service.generates_text(adapter):
        raise InvalidSpec(
            f"{body.model!r} is a causal-LM model; use /v1/chat/completions or /v1/completions.",
            field="model",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    results = await _classify(adapter, texts)
    return {
        "object": "list",
        "model": body.model,
        "data": [
            {
                "object": "classification",
                "index": index,
                "label": r["label"],
                "probabilities": r["probabilities"],
            }
            for index, r in enumerate(results)
        ],
    }
