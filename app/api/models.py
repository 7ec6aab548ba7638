"""``/api/v1/models``: the model library (bundled, registered folders, the Hub cache). Named apart from the
OpenAI layer's ``/v1/models``, which lists adapters to generate with."""

from typing import Any

from fastapi import APIRouter

from app.auth import AdminUser, CurrentUser
from app.services import models as service

router = APIRouter(tags=["models"])


@router.get("/api/v1/models")
def list_models(_user: CurrentUser, task: str | None = None) -> dict[str, Any]:
    """Every base model the studio can use, with architecture, parameters, context length, dtype, size,
    chat template, licence, tasks and fetch date; ``task`` keeps those suited to one task."""
    rows = [m.public() for m in service.list_models(task)]
    return {"data": rows, "count": len(rows), "recommended": service.RECOMMENDED}


@router.get("/api/v1/models/{model_id:path}")
def get_model(model_id: str, _user: CurrentUser) -> dict[str, Any]:
    """One library model by id (``owner/name`` for Hub models, the folder path for registered folders)."""
    return service.get_model(model_id).public()


@router.delete("/api/v1/models/{model_id:path}")
def delete_model(model_id: str, _admin: AdminUser) -> dict[str, Any]:
    """Remove a downloaded Hub model from the cache (admin); returns the bytes freed."""
    return {"model_id": model_id, "freed_bytes": service.delete_model(model_id)}
