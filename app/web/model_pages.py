"""The Models page: the library, what each model is and suits, and where to start when it is empty."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.auth import CurrentUser
from app.services import models as service
from app.web.pages import render

router = APIRouter()


@router.get("/models", response_class=HTMLResponse, include_in_schema=False)
def models_page(request: Request, user: CurrentUser, task: str | None = None) -> HTMLResponse:
    """Every model the studio can use, filterable by task, with the recommended starting points."""
    models = service.list_models(task or None)
    return render(
        request,
        "models.html",
        {
            "nav": "models",
            "models": models,
            "task": task or "",
            "recommended": service.RECOMMENDED,
            "hub_models": [m for m in models if m.source == "hub"],
            "is_admin": user.is_admin,
        },
    )
