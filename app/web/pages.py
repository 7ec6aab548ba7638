"""HTML pages (Jinja2 + htmx). Handlers are thin: they call the same services as the JSON API."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.db import PROJECT_ROOT

templates = Jinja2Templates(directory=str(PROJECT_ROOT / "templates"))
router = APIRouter(include_in_schema=False)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    """An error rendered as a page (or as a fragment for htmx requests)."""
    name = "_error.html" if request.headers.get("hx-request") else "error.html"
    return templates.TemplateResponse(
        request, name, {"status_code": status_code, "message": message}, status_code=status_code
    )
