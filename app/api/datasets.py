"""/api/v1/datasets"""

from fastapi import APIRouter, Form, Response, UploadFile, status

from app import audit
from app.auth import CurrentUser, OwnerScope
from app.deps import SessionDep
from app.models import DatasetPublic, DatasetsPublic
from app.services import datasets as service

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic)
def upload_dataset(
    session: SessionDep, user: CurrentUser, file: UploadFile, name: str | None = Form(default=None)
) -> DatasetPublic:
    """Upload a CSV, TSV, JSON (array) or JSONL file; it is validated and profiled before it is stored."""
    dataset = service.create_dataset(session, file.file, file.filename, name, owner_id=user.id)
    audit.record(session, user, "create", "dataset", dataset.id, dataset.filename)
    return DatasetPublic.model_validate(dataset)


@router.post("/demo", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic)
def load_demo_dataset(session: SessionDep, user: CurrentUser, response: Response) -> DatasetPublic:
    """Load the bundled SST-2 demo (1,000 rows); 201 the first time, 200 with the same dataset afterwards."""
    dataset, created = service.load_demo_dataset(session, user.id)
    if not created:
        response.status_code = status.HTTP_200_OK
    else:
        audit.record(session, user, "create", "dataset", dataset.id, "demo")
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep, owner_id: OwnerScope, offset: int = 0, limit: int = 100
) -> DatasetsPublic:
    """Datasets, newest first (yours; the admin sees everyone's)."""
    rows, count = service.list_datasets(session, max(offset, 0), min(max(limit, 1), 1000), owner_id)
    return DatasetsPublic(data=[DatasetPublic.model_validate(row) for row in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(session: SessionDep, owner_id: OwnerScope, dataset_id: int) -> DatasetPublic:
    """One dataset with its profile."""
    return DatasetPublic.model_validate(service.get_dataset(session, dataset_id, owner_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, dataset_id: int) -> None:
    """Delete a dataset and its file."""
    service.delete_dataset(session, dataset_id, owner_id)
    audit.record(session, user, "delete", "dataset", dataset_id)
