"""/api/v1/datasets"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Response, UploadFile, status

from app.core.models import DatasetPublic, DatasetsPublic
from app.core.settings import BUNDLED_MODEL_ID
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import audit
from app.services import datasets as service

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


def import_options(
    header: Annotated[
        str | None, Form(description="auto (detect), yes or no: is the first row a header?")
    ] = None,
    column_names: Annotated[
        str | None,
        Form(description="Comma-separated names for the columns (a headerless file's, or renames)."),
    ] = None,
    delimiter: Annotated[str | None, Form(description="auto, or one character: , ; | or tab.")] = None,
    quotechar: Annotated[str | None, Form(description='auto, a character (usually "), or none.')] = None,
    index_column: Annotated[
        str | None, Form(description="auto, drop or keep pandas' unnamed index column.")
    ] = None,
    encoding: Annotated[
        str | None, Form(description="auto, utf-8, utf-8-sig, utf-16, latin-1 or cp1252.")
    ] = None,
    nested: Annotated[
        str | None,
        Form(description="keep, flatten (a.b columns) or explode (a list of objects, one row each)."),
    ] = None,
    explode_column: Annotated[
        str | None, Form(description="The column to explode (default: detected).")
    ] = None,
    split: Annotated[
        str | None, Form(description="The split of a saved DatasetDict (default: train).")
    ] = None,
) -> dict[str, Any]:
    """The import options of an upload or a re-import, as multipart form fields; absent ones are detected."""
    given = {
        "header": header,
        "column_names": column_names,
        "delimiter": delimiter,
        "quotechar": quotechar,
        "index_column": index_column,
        "encoding": encoding,
        "nested": nested,
        "explode_column": explode_column,
        "split": split,
    }
    return {key: value for key, value in given.items() if value is not None}


ImportOptionsDep = Annotated[dict[str, Any], Depends(import_options)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic)
def upload_dataset(
    session: SessionDep,
    user: CurrentUser,
    file: UploadFile,
    options: ImportOptionsDep,
    name: str | None = Form(default=None),
) -> DatasetPublic:
    """Upload CSV, TSV, delimited .txt, JSON (array), JSONL, Parquet, Arrow or a zipped saved HF dataset.

    It is validated and profiled before it is stored; the import options (form fields) are detected when
    absent, and what was detected is in ``profile.import``.
    """
    dataset = service.create_dataset(
        session, file.file, file.filename, name, owner_id=user.id, options=options
    )
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


@router.get("/{dataset_id}/token-lengths")
def token_lengths(
    session: SessionDep,
    owner_id: OwnerScope,
    dataset_id: int,
    base_model: str = BUNDLED_MODEL_ID,
    columns: Annotated[list[str] | None, Query()] = None,
    max_length: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
) -> dict[str, Any]:
    """Token lengths of the examples for a base model, the recommended max_length, and the share truncated.

    ``columns`` are joined into one example (default: the proposal's text columns); the report is measured with
    the model's tokenizer.json (no torch in the web process).
    """
    from app.core.token_lengths import length_report

    dataset = service.get_dataset(session, dataset_id, owner_id)
    if not columns:
        proposal = dataset.profile.get("proposal") or {}
        columns = proposal.get("text_columns") or [proposal.get("text_column") or dataset.columns[0]]
    return length_report(dataset, base_model, columns, max_length)


@router.post("/{dataset_id}/reimport", response_model=DatasetPublic)
def reimport_dataset(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, dataset_id: int, options: ImportOptionsDep
) -> DatasetPublic:
    """Read the stored original file again with other import options (form fields, as for an upload)."""
    dataset = service.reimport_dataset(session, dataset_id, options, owner_id)
    audit.record(session, user, "reimport", "dataset", dataset_id)
    return DatasetPublic.model_validate(dataset)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(session: SessionDep, user: CurrentUser, owner_id: OwnerScope, dataset_id: int) -> None:
    """Delete a dataset and its file."""
    service.delete_dataset(session, dataset_id, owner_id)
    audit.record(session, user, "delete", "dataset", dataset_id)
