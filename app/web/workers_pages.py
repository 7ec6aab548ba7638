"""The workers page and ``GET /api/v1/workers``: live workers, their hardware and current job."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.core.models import WorkersPublic
from app.http.auth import OwnerScope
from app.http.deps import SessionDep
from app.services import workers as service
from app.web.render import render

router = APIRouter()


@router.get("/api/v1/workers", response_model=WorkersPublic, tags=["workers"])
def list_workers(session: SessionDep, owner_id: OwnerScope, include_gone: bool = False) -> WorkersPublic:
    """Training workers that announced themselves: hardware, queues, current job, last heartbeat.

    Only live ones (heard from within three heartbeats) unless ``include_gone=true``. ``current_job_id`` is
    shown only to the job's owner and the admin; others see ``busy``."""
    rows = service.list_workers(session, include_gone, owner_id)
    return WorkersPublic(data=rows, count=len(rows))


@router.get("/workers", response_class=HTMLResponse, include_in_schema=False)
def workers_page(request: Request, session: SessionDep, owner_id: OwnerScope) -> HTMLResponse:
    """Live workers with their hardware and the job each one runs (yours only; refreshes itself)."""
    workers = service.list_workers(session, include_gone=True, owner_id=owner_id)
    return render(
        request,
        "workers.html",
        {"nav": "workers", "workers": workers, "jobs": service.current_jobs(session, workers)},
    )
