"""OpenAI models: base models and fine-tuned models (finished adapters), and which adapter a model name means."""

from typing import Any

from sqlmodel import Session, col, select

from app.core.errors import InvalidSpec, NotFound
from app.core.models import Adapter, Job
from app.core.tasks import find_task, generating_tasks
from app.services.openai_compat.common import FT_NAME, ORGANIZATION, unix
from app.services.openai_compat.fine_tuning import fine_tuned_model_name


def list_models(session: Session, owner_id: int | None = None) -> list[dict[str, Any]]:
    """Base models (the catalog and every base an adapter was trained on) and fine-tuned models."""
    from app.core.base_models import catalog

    statement = select(Adapter).order_by(col(Adapter.id).desc())
    if owner_id is not None:
        statement = statement.where(Adapter.owner_id == owner_id)
    adapters = list(session.exec(statement).all())
    bases = list(dict.fromkeys([*catalog(), *(adapter.base_model for adapter in adapters)]))
    result = [
        {"id": base, "object": "model", "created": 0, "owned_by": ORGANIZATION, "peft": {"kind": "base"}}
        for base in bases
    ]
    for adapter in adapters:
        job = session.get(Job, adapter.job_id)
        if job is None:
            continue
        result.append(
            {
                "id": fine_tuned_model_name(session, job),
                "object": "model",
                "created": unix(adapter.created_at),
                "owned_by": f"user-{job.owner_id}" if job.owner_id is not None else ORGANIZATION,
                "peft": {
                    "kind": "adapter",
                    "adapter_id": adapter.id,
                    "task": adapter.task,
                    "method": adapter.method,
                    "base_model": adapter.base_model,
                    "labels": adapter.labels,
                },
            }
        )
    return result


def resolve_model(session: Session, name: str, owner_id: int | None = None) -> tuple[Adapter, bool]:
    """The adapter a model name means, and whether to use it (False: a base model, answered by the bare base
    behind one of its adapters)."""
    match = FT_NAME.search(name)
    if match:
        job_id = int(match.group(1))
        adapter = session.exec(select(Adapter).where(Adapter.job_id == job_id)).first()
        if adapter is None or (owner_id is not None and adapter.owner_id != owner_id):
            raise NotFound(
                f"The model {name!r} does not exist or its job has not succeeded yet (GET /v1/models lists "
                "the models ready to use).",
                field="model",
            )
        return adapter, True
    if ":ckpt-step-" in name:
        raise InvalidSpec(
            f"{name!r} is an intermediate checkpoint; only finished fine-tuned models answer requests.",
            field="model",
        )
    statement = select(Adapter).where(Adapter.base_model == name, col(Adapter.task).in_(generating_tasks()))
    if owner_id is not None:
        statement = statement.where(Adapter.owner_id == owner_id)
    adapter = session.exec(statement.order_by(col(Adapter.id).desc())).first()
    if adapter is None:
        raise NotFound(
            f"The model {name!r} does not exist here: use a fine-tuned model from GET /v1/models (a base model "
            "answers only once one of its causal-LM adapters exists).",
            field="model",
        )
    return adapter, False


def generates_text(adapter: Adapter) -> bool:
    """Whether the adapter's task generates text (chat and completions) rather than classifying (a label)."""
    info = find_task(adapter.task)
    return info is not None and info.generates_text
