"""POST /api/v1/adapters/import: bring an adapter zip (downloaded from a PEFT Studio) in as your own."""

from fastapi import APIRouter, Form, UploadFile, status

from app.core.models import AdapterPublic
from app.http.auth import CurrentUser
from app.http.deps import SessionDep
from app.services import adapters as adapters_service
from app.services import audit
from app.services.adapter_import import import_adapter

router = APIRouter(prefix="/api/v1/adapters", tags=["adapters"])


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=AdapterPublic)
def import_adapter_zip(
    session: SessionDep, user: CurrentUser, file: UploadFile, name: str | None = Form(default=None)
) -> AdapterPublic:
    """Import an adapter zip: checked (no paths outside its folder, no symlinks, no pickle files, safetensors
    weights, a known method and a base model on this machine) before anything is kept."""
    adapter = import_adapter(session, file.file, file.filename, user.id, name)
    audit.record(session, user, "import", "adapter", adapter.id, file.filename or "")
    return adapters_service.adapter_public(adapter)
