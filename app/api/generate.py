"""Causal-LM endpoints: training-data preview, try-out generation (JSON or SSE) and merged-model download.

- ``POST /api/v1/jobs/preview`` — a job spec in, its first training examples out as token spans with a
  ``masked`` flag (no loss on masked tokens).
- ``POST /api/v1/adapters/{id}/generate`` — a prompt in, the response out; with ``"stream": true`` an SSE
  stream of ``token`` events then one ``done`` event. ``GET .../generate/stream`` is the same stream for
  ``EventSource`` in the browser (query parameters instead of a body).
- ``GET /api/v1/adapters/{id}/merged`` — a zip of the base model with the adapter merged in.
"""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.core.formats import GenerationSettings
from app.core.spec import JobSpec
from app.core.tasks import CAUSAL_LM, PREFERENCE
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import adapters as adapters_service
from app.services import audit
from app.services import causal_lm as causal_service
from app.services import generation as service
from app.services import preference as preference_service

router = APIRouter()


class TokenSpan(BaseModel):
    masked: bool = Field(description="True where no loss is computed (prompt, template markup, padding).")
    text: str = Field(description="The span's tokens decoded together.")
    tokens: list[str] = Field(description="Each token decoded on its own, in order.")
    token_ids: list[int]


class PreferenceAnswer(BaseModel):
    text: str = Field(description="The answer as the model writes it (template markup and EOS included).")
    tokens: list[str]
    token_ids: list[int]
    kept: int = Field(description="Tokens within max_length after the prompt; the rest are cut off.")
    truncated: bool


class PreviewExample(BaseModel):
    row: int = Field(description="The dataset row (from 1) the example comes from.")
    tokens: int
    trained_tokens: int = Field(description="Tokens that carry the loss.")
    truncated: bool = Field(description="The example was longer than training.max_length and was cut.")
    dropped: bool = Field(description="Nothing of the response is left within max_length: training skips it.")
    spans: list[TokenSpan]
    prompt: str | None = Field(
        default=None, description="Preference: the prompt, chat template applied (masked)."
    )
    chosen: PreferenceAnswer | None = Field(default=None, description="Preference: the better answer.")
    rejected: PreferenceAnswer | None = Field(default=None, description="Preference: the worse answer.")
    completion: PreferenceAnswer | None = Field(default=None, description="KTO: the answer the label judges.")
    label: bool | None = Field(default=None, description="KTO: true when the answer is good.")


class PreviewResponse(BaseModel):
    dataset_id: int
    task: str = Field(default=CAUSAL_LM, description="causal-lm, or preference (chosen and rejected apart).")
    format: str
    loss: str | None = Field(default=None, description="Preference: the loss (dpo, ipo, orpo, simpo, kto).")
    template: str | None = Field(description="The chat template used: tokenizer (the model's own) or a name.")
    chat_template: str | None = Field(description="The template's Jinja source.")
    train_on_prompt: bool
    packing: str
    max_length: int
    examples: list[PreviewExample]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    prompt: str = Field(min_length=1, max_length=20_000, description="What to ask the model.")
    max_new_tokens: int = Field(default=64, ge=1, le=1024, description="Stop after this many new tokens.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 picks the likeliest token (greedy).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Sample from the smallest set with this mass.")
    use_adapter: bool = Field(default=True, description="False answers with the bare base model.")
    seed: int | None = Field(default=None, ge=0, description="Makes sampling repeatable.")
    stream: bool = Field(default=False, description="Answer with Server-Sent Events, token by token.")


class GenerateResponse(BaseModel):
    adapter_id: int
    text: str
    token_ids: list[int]
    finish_reason: str = Field(description="eos (the model ended its answer), length or stopped.")
    prompt_text: str = Field(
        description="The prompt as the model saw it, through the adapter's chat template."
    )
    prompt_tokens: int
    use_adapter: bool


def _settings(body: GenerateRequest) -> GenerationSettings:
    return GenerationSettings(
        prompt=body.prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        use_adapter=body.use_adapter,
        seed=body.seed,
    )


def _event_stream(adapter: Any, body: GenerateRequest) -> EventSourceResponse:
    async def events() -> AsyncIterator[ServerSentEvent]:
        async for event, data in service.stream(adapter, _settings(body)):
            if event == "done":
                data = {"adapter_id": adapter.id, "use_adapter": body.use_adapter, **data}
            yield ServerSentEvent(data=service.sse_data(data), event=event)

    return EventSourceResponse(events(), ping=15)


@router.post("/api/v1/jobs/preview", response_model=PreviewResponse, tags=["jobs"])
async def preview_job(
    session: SessionDep, owner_id: OwnerScope, spec: JobSpec, count: Annotated[int, Query(ge=1, le=20)] = 3
) -> dict[str, Any]:
    """The first `count` training examples of a causal-LM or preference spec, rendered and tokenized as the model
    sees them (preference: the prompt masked, chosen and rejected apart)."""
    if spec.task == PREFERENCE:
        return await preference_service.preview(session, spec, count, owner_id)
    return await causal_service.preview(session, spec, count, owner_id)


@router.post("/api/v1/adapters/{adapter_id}/generate", response_model=GenerateResponse, tags=["adapters"])
async def generate(session: SessionDep, owner_id: OwnerScope, adapter_id: int, body: GenerateRequest) -> Any:
    """Generate a response with a causal-LM adapter (or its base); `"stream": true` answers with SSE."""
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    if body.stream:
        return _event_stream(adapter, body)
    result = await service.generate(adapter, _settings(body))
    return GenerateResponse(adapter_id=adapter_id, use_adapter=body.use_adapter, **result)


@router.get("/api/v1/adapters/{adapter_id}/generate/stream", tags=["adapters"])
async def generate_stream(
    session: SessionDep,
    owner_id: OwnerScope,
    adapter_id: int,
    prompt: Annotated[str, Query(min_length=1, max_length=20_000)],
    max_new_tokens: Annotated[int, Query(ge=1, le=1024)] = 64,
    temperature: Annotated[float, Query(ge=0, le=2)] = 0.0,
    top_p: Annotated[float, Query(gt=0, le=1)] = 1.0,
    use_adapter: bool = True,
    seed: Annotated[int | None, Query(ge=0)] = None,
) -> EventSourceResponse:
    """The streamed generation for EventSource: `token` events ({index, text}) in order, then `done`."""
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    body = GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        use_adapter=use_adapter,
        seed=seed,
        stream=True,
    )
    return _event_stream(adapter, body)


@router.get("/api/v1/adapters/{adapter_id}/merged", response_class=FileResponse, tags=["adapters"])
async def download_merged(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, adapter_id: int, background: BackgroundTasks
) -> FileResponse:
    """A zip of the base model with the adapter merged in: a plain transformers model folder.

    LoRA-family adapters only; a QLoRA adapter is merged into the base loaded in full precision.
    """
    adapter = adapters_service.get_adapter(session, adapter_id, owner_id)
    archive = await service.merged_archive(adapter)
    audit.record(session, user, "download", "adapter", adapter_id, "merged")
    background.add_task(adapters_service.remove_file, archive)
    return FileResponse(archive, media_type="application/zip", filename=f"merged-{adapter_id}.zip")
