"""OpenAI files: a fine-tune JSONL upload becomes a dataset (``file-<n>`` is dataset ``n``)."""

import io
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from sqlmodel import Session, col, select

from app.core.datasets_io import detect_format, parse_rows
from app.core.errors import InvalidDataset, InvalidSpec, NotFound
from app.core.files import receive_upload
from app.core.formats import example_from_row, preference_example_from_row
from app.core.models import Dataset
from app.core.settings import get_settings
from app.core.spec import CausalLMSettings, PreferenceSettings
from app.services import datasets as datasets_service
from app.services.openai_compat.common import FILE_PREFIX, id_number, unix

# OpenAI's preference fine-tuning file: {"input": {"messages": [...]}, "preferred_output": [...],
# "non_preferred_output": [...]} per line, read by the preference task's own format under these column names.
OPENAI_PREFERENCE = {
    "format": "pairs",
    "prompt_column": "input",
    "chosen_column": "preferred_output",
    "rejected_column": "non_preferred_output",
}


def data_format(columns: list[str]) -> str | None:
    """The format a file's columns hold: chat, prompt-completion, alpaca, text (causal LM), preference (OpenAI's
    DPO file), or None."""
    if all(column in columns for column in ("input", "preferred_output", "non_preferred_output")):
        return "pairs"
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    return None


def file_object(dataset: Dataset) -> dict[str, Any]:
    """A dataset as an OpenAI file object."""
    return {
        "id": f"{FILE_PREFIX}{dataset.id}",
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.filename,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _check_fine_tune_rows(columns: list[str], rows: list[dict[str, Any]], filename: str) -> None:
    fmt = data_format(columns)
    if fmt == "pairs":
        preference = PreferenceSettings.model_validate(OPENAI_PREFERENCE)
        for number, row in enumerate(rows, start=1):
            preference_example_from_row(row, preference, number)
        return
    if fmt not in ("chat", "prompt-completion"):
        raise InvalidDataset(
            f"{filename!r} holds columns {', '.join(map(repr, columns[:10]))}; a fine-tune file needs one JSON "
            'object per line, either {"messages": [{"role": ..., "content": ...}, ...]} or '
            '{"prompt": ..., "completion": ...}, or for DPO {"input": {"messages": [...]}, '
            '"preferred_output": [...], "non_preferred_output": [...]}.',
            field="file",
        )
    settings = CausalLMSettings(format=fmt)  # type: ignore[arg-type]
    for number, row in enumerate(rows, start=1):
        example_from_row(row, settings, "text", number)


def upload_file(
    session: Session, stream: BinaryIO, filename: str | None, purpose: str, owner_id: int | None = None
) -> Dataset:
    """Check a fine-tune JSONL file and store it as the owner's dataset (the same file again returns it again)."""
    if purpose != "fine-tune":
        raise InvalidSpec(
            f"purpose {purpose!r} is not supported; this server stores files for fine-tuning (purpose "
            "'fine-tune').",
            field="purpose",
        )
    if not filename:
        raise InvalidDataset("The upload has no file name; send a .jsonl file.", field="file")
    fmt = detect_format(filename)
    if fmt != "jsonl":
        raise InvalidDataset(
            f"{filename!r} is not a .jsonl file; fine-tune files are JSONL (one JSON object per line).",
            field="file",
        )
    with tempfile.TemporaryDirectory(prefix="openai-file-") as folder:
        received = Path(folder) / "upload.jsonl"
        receive_upload(stream, received, get_settings().max_upload_bytes)
        data = received.read_bytes()
    columns, rows = parse_rows(data, fmt)
    _check_fine_tune_rows(columns, rows, filename)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    existing = session.exec(
        select(Dataset).where(Dataset.sha256 == digest, Dataset.owner_id == owner_id)
    ).first()
    if existing is not None:
        return existing
    return datasets_service.create_dataset(session, io.BytesIO(data), filename, owner_id=owner_id)


def get_file(session: Session, file_id: str, owner_id: int | None = None, field: str = "file_id") -> Dataset:
    """The dataset behind ``file-<n>`` (NotFound for another owner's)."""
    number = id_number(FILE_PREFIX, file_id, field, "file")
    try:
        return datasets_service.get_dataset(session, number, owner_id)
    except NotFound:
        raise NotFound(f"No such file: {file_id!r}.", field=field) from None


def list_files(
    session: Session, after: str | None, limit: int, order: str = "desc", owner_id: int | None = None
) -> tuple[list[Dataset], bool]:
    """Files (datasets) after a cursor, newest first by default, and whether there are more."""
    statement = select(Dataset)
    if owner_id is not None:
        statement = statement.where(Dataset.owner_id == owner_id)
    if after:
        cursor = id_number(FILE_PREFIX, after, "after", "file")
        statement = statement.where(col(Dataset.id) < cursor if order == "desc" else col(Dataset.id) > cursor)
    statement = statement.order_by(col(Dataset.id).desc() if order == "desc" else col(Dataset.id))
    rows = list(session.exec(statement.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit
