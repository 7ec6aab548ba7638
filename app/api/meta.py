"""/api/v1/methods, /api/v1/base-models and /healthz: what the studio offers and whether it is up."""

from typing import Any

from fastapi import APIRouter

from app.core.base_models import catalog
from app.core.method_registry import registry
from app.core.spec import JobSpec

router = APIRouter(tags=["meta"])


@router.get("/api/v1/methods")
def list_methods() -> list[dict[str, Any]]:
    """Every registered fine-tuning method with the JSON schema of its config."""
    return [
        {
            "name": m.name,
            "title": m.title,
            "summary": m.summary,
            "tasks": list(m.tasks),
            "config_schema": m.config.model_json_schema(),
        }
        for m in registry().values()
    ]


@router.get("/api/v1/base-models")
def list_base_models() -> list[str]:
    """Base models offered by default (any local folder or cached hub id works too)."""
    return catalog()


@router.get("/api/v1/job-spec-schema")
def job_spec_schema() -> dict[str, Any]:
    """The JSON schema of a job spec (the body of POST /api/v1/jobs)."""
    return JobSpec.model_json_schema()


@router.get("/healthz")
def health() -> dict[str, str]:
    """Liveness check."""
    return {"status": "ok"}
