"""/api/v1/adapters"""

from pathlib import Path

from fastapi import APIRouter, BackgroundTasks, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from app.core.models import AdapterPublic, AdaptersPublic
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import adapters as service
from app.services import audit

router = APIRouter(prefix="/api/v1/adapters", tags=["adapters"])


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    text: str | None = Field(default=None, min_length=1, description="One text to classify.")
    texts: list[str] | None = Field(default=None, description="Several texts to classify.")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    adapter_id: int
    predictions: list[Prediction]


@router.get("", response_model=AdaptersPublic)
def list_adapters(
    session: SessionDep, owner_id: OwnerScope, offset: int = 0, limit: int = 100
) -> AdaptersPublic:
    """Adapters of succeeded jobs, newest first (yours; the admin sees everyone's)."""
    rows, count = service.list_adapters(session, max(offset, 0), min(max(limit, 1), 1000), owner_id)
    return AdaptersPublic(data=[service.adapter_public(row) for row in rows], count=count)


@router.get("/{adapter_id}", response_model=AdapterPublic)
def get_adapter(session: SessionDep, owner_id: OwnerScope, adapter_id: int) -> AdapterPublic:
    """One adapter: method, parameter counts, size, metrics, files."""
    return service.adapter_public(service.get_adapter(session, adapter_id, owner_id))


@router.get("/{adapter_id}/download", response_class=FileResponse)
def download_adapter(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, adapter_id: int, background: BackgroundTasks
) -> FileResponse:
    """A zip of the adapter folder, loadable with plain peft + transformers."""
    adapter = service.get_adapter(session, adapter_id, owner_id)
    audit.record(session, user, "download", "adapter", adapter_id)
    archive: Path = service.build_archive(adapter)
    background.add_task(service.remove_file, archive)
    return FileResponse(archive, media_type="application/zip", filename=f"adapter-{adapter_id}.zip")


@router.delete("/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_adapter(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, adapter_id: int) -> None:
    """Delete an adapter and its files."""
    service.delete_adapter(session, adapter_id, owner_id)
    audit.record(session, user, "delete", "adapter", adapter_id)


@router.post("/{adapter_id}/predict", response_model=PredictResponse)
async def predict(
    session: SessionDep, owner_id: OwnerScope, adapter_id: int, body: PredictRequest
) -> PredictResponse:
    """Predicted label and class probabilities for one text or several."""
    adapter = service.get_adapter(session, adapter_id, owner_id)
    texts = body.texts if body.texts is not None else ([body.text] if body.text else [])
    results = await service.predict(adapter, texts)
    return PredictResponse(adapter_id=adapter_id, predictions=[Prediction(**r) for r in results])
