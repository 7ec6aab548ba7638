"""HTML for causal-LM jobs and adapters: the try-out page (streamed, adapter beside base) and the preview fragment.

Thin handlers over the same services as the JSON API (app/api/generate.py). The fragments are meant to be
included by other pages: ``_generate.html`` (needs ``adapter``) in an adapter page, and the preview returned
by ``POST /jobs/preview`` into the job form (``hx-post="/jobs/preview" hx-include="#job-form"``).
"""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.core.errors import InvalidSpec
from app.core.tasks import PREFERENCE, generating_tasks
from app.http.auth import OwnerScope
from app.http.deps import SessionDep
from app.services import adapters as adapters_service
from app.services import causal_lm as causal_service
from app.services import preference as preference_service
from app.web import forms
from app.web.render import render

router = APIRouter(include_in_schema=False)

PREVIEW_EXAMPLES = 3


@router.get("/adapters/{adapter_id}/generate", response_class=HTMLResponse)
def generate_page(
    request: Request, session: SessionDep, owner_id: OwnerScope, adapter_id: int
) -> HTMLResponse:
    """Try-out for a causal-LM adapter: one prompt, the adapter's and the base model's answers streaming."""
    adapter = adapters_service.adapter_public(adapters_service.get_adapter(session, adapter_id, owner_id))
    if adapter.task not in generating_tasks():
        raise InvalidSpec(f"Adapter {adapter_id} is a {adapter.task} adapter; try it on its own page.")
    return render(request, "generate.html", {"nav": "adapters", "adapter": adapter})


@router.get("/adapters/{adapter_id}/chat", response_class=HTMLResponse)
def chat_page(request: Request, session: SessionDep, owner_id: OwnerScope, adapter_id: int) -> HTMLResponse:
    """The chat playground: a multi-turn conversation with the adapter and its base model side by side, streamed
    from the OpenAI-compatible ``POST /v1/chat/completions`` (static/chat.js), with a system prompt and sampling."""
    from app.core.models import Job
    from app.services.openai_compat import fine_tuned_model_name

    row = adapters_service.get_adapter(session, adapter_id, owner_id)
    adapter = adapters_service.adapter_public(row)
    if adapter.task not in generating_tasks():
        raise InvalidSpec(f"Adapter {adapter_id} is a {adapter.task} adapter; try it on its own page.")
    job = session.get(Job, row.job_id)
    if job is None:
        raise InvalidSpec(
            f"Adapter {adapter_id} has lost its job; chat needs the job's fine-tuned model name."
        )
    models = {"adapter": fine_tuned_model_name(session, job), "base": row.base_model}
    start_label = "base"
    if adapter.task == PREFERENCE:
        # An aligned adapter answers next to its starting point: the supervised adapter it continued, else the base.
        start = preference_service.starting_point(session, job, owner_id)
        if start is not None:
            models["base"], start_label = start
    context = {"nav": "adapters", "adapter": adapter, "models": models, "start_label": start_label}
    return render(request, "chat.html", context)


@router.post("/jobs/preview", response_class=HTMLResponse)
async def preview_fragment(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """The job form posted as it stands: its first training examples, with the masked part shown apart."""
    form = await request.form()
    data = forms.form_to_input({key: [str(value) for value in form.getlist(key)] for key in form.keys()})
    spec, errors = forms.validate_job_input(data)
    if spec is None:
        raise InvalidSpec("; ".join(f"{name}: {message}" for name, message in errors.items()))
    if spec.task == PREFERENCE:
        preview = await preference_service.preview(session, spec, PREVIEW_EXAMPLES, owner_id)
    else:
        preview = await causal_service.preview(session, spec, PREVIEW_EXAMPLES, owner_id)
    return render(request, "_preview.html", {"preview": preview})
