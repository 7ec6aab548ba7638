"""/api/v1/sweeps: queue a grid of jobs from a base spec and lists of values; list and show sweeps."""

from datetime import datetime
from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel
from sqlmodel import Session

from app.core.models import JobPublic, Sweep
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import jobs as jobs_service
from app.services import sweeps as service
from app.services.sweeps import SweepCreate

router = APIRouter(prefix="/api/v1/sweeps", tags=["sweeps"])


class SweepPublic(BaseModel):
    id: int
    name: str
    base_spec: dict[str, Any]
    grid: dict[str, Any]
    created_at: datetime
    job_ids: list[int]
    jobs: list[JobPublic]
    compare_url: str


class SweepsPublic(BaseModel):
    data: list[SweepPublic]
    count: int


def sweep_public(session: Session, sweep: Sweep) -> SweepPublic:
    """A sweep with its jobs."""
    assert sweep.id is not None
    jobs = service.sweep_jobs(session, sweep.id)
    return SweepPublic(
        id=sweep.id,
        name=sweep.name,
        base_spec=sweep.base_spec,
        grid=sweep.grid,
        created_at=sweep.created_at,
        job_ids=[job.id for job in jobs if job.id is not None],
        jobs=[jobs_service.job_public(session, job) for job in jobs],
        compare_url=f"/sweeps/{sweep.id}",
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic)
def create_sweep(session: SessionDep, user: CurrentUser, request: SweepCreate) -> SweepPublic:
    """Queue one job per combination of the grid's values (at most 64); every spec is validated first."""
    return sweep_public(session, service.create_sweep(session, request, user.id))


@router.get("", response_model=SweepsPublic)
def list_sweeps(session: SessionDep, owner_id: OwnerScope, offset: int = 0, limit: int = 100) -> SweepsPublic:
    """Sweeps, newest first, with their jobs."""
    rows, count = service.list_sweeps(session, max(offset, 0), min(max(limit, 1), 1000), owner_id)
    return SweepsPublic(data=[sweep_public(session, row) for row in rows], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic)
def get_sweep(session: SessionDep, owner_id: OwnerScope, sweep_id: int) -> SweepPublic:
    """One sweep: its base spec, grid and jobs."""
    return sweep_public(session, service.get_sweep(session, sweep_id, owner_id))
