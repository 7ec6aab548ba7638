"""Metric series for charts (downsampled on the server), full series downloads, TensorBoard files, compare."""

import csv
import io
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlmodel import Session, col

from app.core.db import get_engine
from app.core.errors import NotFound
from app.core.files import zip_folder
from app.core.models import MetricPoint
from app.core.storage import get_store
from app.http import etag
from app.http.auth import OwnerScope
from app.http.deps import SessionDep
from app.services import compare as compare_service
from app.services import jobs as jobs_service
from app.services.series import DEFAULT_MAX_POINTS, get_cache, series_answer

router = APIRouter(prefix="/api/v1", tags=["metrics"])

DOWNLOAD_CHUNK = 20_000
TENSORBOARD_KEY = "tensorboard"


def _json(body: Any) -> Response:
    # Serialised directly: FastAPI's encoder walks every float of a 100k-value body one by one.
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.get("/jobs/{job_id}/series")
def job_series_endpoint(
    session: SessionDep,
    request: Request,
    owner_id: OwnerScope,
    job_id: int,
    max_points: Annotated[int, Query(ge=1, le=100_000)] = DEFAULT_MAX_POINTS,
    keys: str | None = None,
) -> Response:
    """Every metric series of a job (``train.loss``, ``eval.accuracy``, ...), each downsampled to at most
    ``max_points`` points by min/max per bucket (first and last points kept). ``keys`` picks series
    (comma-separated); ``cursor`` is the newest point id included, to continue the SSE stream after it.
    Answers 304 to a matching ``If-None-Match`` (the tag changes when a point arrives)."""
    jobs_service.get_job(session, job_id, owner_id)
    wanted = [key.strip() for key in keys.split(",") if key.strip()] if keys else None
    version, make = series_answer(session, job_id, max_points, wanted)
    return etag.versioned_json(request, version, lambda: json.dumps(make(), separators=(",", ":")).encode())


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _points(job_id: int) -> Iterator[list[Any]]:
    """Every point of a job as [id, step, epoch, split, created_at, values], a chunk of rows at a time."""
    cursor = 0
    with Session(get_engine()) as session:
        while True:
            rows = (
                session.connection()
                .execute(
                    sa.select(
                        col(MetricPoint.id),
                        col(MetricPoint.step),
                        col(MetricPoint.epoch),
                        col(MetricPoint.split),
                        col(MetricPoint.created_at),
                        col(MetricPoint.values),
                    )
                    .where(col(MetricPoint.job_id) == job_id, col(MetricPoint.id) > cursor)
                    .order_by(col(MetricPoint.id))
                    .limit(DOWNLOAD_CHUNK)
                )
                .all()
            )
            for row in rows:
                yield list(row)
            if len(rows) < DOWNLOAD_CHUNK:
                return
            cursor = int(rows[-1][0] or 0)


def _csv_lines(job_id: int, metrics: list[str]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "step", "epoch", "split", "created_at", *metrics])
    for count, (point_id, step, epoch, split, created, values) in enumerate(_points(job_id), 1):
        values = values or {}
        writer.writerow(
            [point_id, step, "" if epoch is None else epoch, split, created.isoformat()]
            + ["" if _clean(values.get(name)) is None else values[name] for name in metrics]
        )
        if count % 2000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _json_chunks(job_id: int) -> Iterator[str]:
    yield "["
    for count, (point_id, step, epoch, split, created, values) in enumerate(_points(job_id)):
        point = {
            "id": point_id,
            "step": step,
            "epoch": epoch,
            "split": split,
            "created_at": created.isoformat(),
            "values": {key: _clean(value) for key, value in (values or {}).items()},
        }
        yield ("," if count else "") + json.dumps(point, separators=(",", ":"))
    yield "]\n"


@router.get("/jobs/{job_id}/metrics/download")
def download_metrics(
    session: SessionDep, owner_id: OwnerScope, job_id: int, format: Literal["csv", "json"] = "csv"
) -> StreamingResponse:
    """The full, not downsampled, metric series of a job as CSV (one row per point, one column per metric)
    or as a JSON array of points; streamed, so a million-point run does not sit in memory."""
    jobs_service.get_job(session, job_id, owner_id)
    if format == "json":
        return StreamingResponse(
            _json_chunks(job_id),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="job-{job_id}-metrics.json"'},
        )
    names = sorted({key.split(".", 1)[1] for key in get_cache().get(session, job_id).keys()})
    return StreamingResponse(
        _csv_lines(job_id, names),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}-metrics.csv"'},
    )


@router.get("/jobs/{job_id}/tensorboard")
def download_tensorboard(
    session: SessionDep, owner_id: OwnerScope, job_id: int, background: BackgroundTasks
) -> FileResponse:
    """The job's TensorBoard event files as a zip (jobs with ``tracking.tensorboard`` on, once training ends);
    unzip and run ``tensorboard --logdir``."""
    jobs_service.get_job(session, job_id, owner_id)
    store = get_store()
    key = store.job_key(job_id, TENSORBOARD_KEY)
    if not store.exists(key):
        raise NotFound(
            f"Job {job_id} has no TensorBoard files: turn on tracking.tensorboard in its spec; they are "
            "uploaded when training ends."
        )
    work = Path(tempfile.mkdtemp(prefix="tensorboard-"))
    background.add_task(shutil.rmtree, work, True)
    folder = store.get_dir(key, work / "logs")
    archive = work / f"job-{job_id}-tensorboard.zip"
    zip_folder(folder, archive, root=f"job-{job_id}")
    return FileResponse(archive, media_type="application/zip", filename=archive.name)


@router.get("/compare")
def compare(
    session: SessionDep, owner_id: OwnerScope, jobs: Annotated[list[str] | None, Query()] = None
) -> Response:
    """Compare jobs (``?jobs=3,5`` or ``?jobs=3&jobs=5``): the spec fields that differ and a summary row per
    job (method, trainable parameters, wall time, peak memory, best and final eval metric). Curves come from
    each job's ``/series``."""
    ids = compare_service.parse_job_ids(jobs)
    result = compare_service.compare_jobs(session, ids, owner_id)
    return _json(
        {
            "job_ids": ids,
            "diff": result.diff,
            "summary": [row.__dict__ for row in result.summary],
        }
    )
