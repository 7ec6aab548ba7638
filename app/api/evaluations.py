"""/api/v1/adapters/{id}/evaluations and /api/v1/evaluations: evaluate an adapter on a dataset file."""

from fastapi import APIRouter, status
from fastapi.responses import StreamingResponse

from app.core.models import EvaluationPublic, EvaluationsPublic
from app.http.auth import CurrentUser, OwnerScope
from app.http.deps import SessionDep
from app.services import audit
from app.services import evaluations as service
from app.services.evaluations import EvaluationCreate

router = APIRouter(prefix="/api/v1", tags=["evaluations"])


@router.post(
    "/adapters/{adapter_id}/evaluations",
    response_model=EvaluationPublic,
    status_code=status.HTTP_201_CREATED,
)
def create_evaluation(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, adapter_id: int, body: EvaluationCreate
) -> EvaluationPublic:
    """Queue an evaluation of the adapter on a dataset: metrics when it has labels, predictions always."""
    evaluation = service.create_evaluation(session, adapter_id, body, owner_id)
    audit.record(session, user, "create", "evaluation", evaluation.id, f"adapter {adapter_id}")
    return service.evaluation_public(evaluation)


@router.get("/adapters/{adapter_id}/evaluations", response_model=EvaluationsPublic)
def list_evaluations(
    session: SessionDep, owner_id: OwnerScope, adapter_id: int, offset: int = 0, limit: int = 100
) -> EvaluationsPublic:
    """The adapter's evaluations, newest first."""
    rows, count = service.list_evaluations(
        session, adapter_id, owner_id, max(offset, 0), min(max(limit, 1), 1000)
    )
    return EvaluationsPublic(data=[service.evaluation_public(row) for row in rows], count=count)


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationPublic)
def get_evaluation(session: SessionDep, owner_id: OwnerScope, evaluation_id: int) -> EvaluationPublic:
    """One evaluation: status, metrics, per-class scores and confusion matrix (or generated samples)."""
    return service.evaluation_public(service.get_evaluation(session, evaluation_id, owner_id))


@router.get("/evaluations/{evaluation_id}/predictions.csv", response_class=StreamingResponse)
def download_predictions(
    session: SessionDep, user: CurrentUser, owner_id: OwnerScope, evaluation_id: int
) -> StreamingResponse:
    """The predictions CSV, streamed from the artifact store."""
    evaluation = service.get_evaluation(session, evaluation_id, owner_id)
    chunks = service.open_predictions(evaluation)
    audit.record(session, user, "download", "evaluation", evaluation_id)
    return StreamingResponse(
        chunks,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="evaluation-{evaluation_id}-predictions.csv"'},
    )
