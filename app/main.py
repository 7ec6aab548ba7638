"""The FastAPI application: JSON API under /api/v1, HTML pages at /, static files."""

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api import adapter_import, adapters, datasets, generate, jobs, meta, openai_compat, webhooks
from app.api import auth as auth_api
from app.api import evaluations as evaluations_api
from app.api import metrics as metrics_api
from app.api import models as models_api
from app.api import sweeps as sweeps_api
from app.api import tokens as tokens_api
from app.api import users as users_api
from app.core.db import PROJECT_ROOT, run_migrations
from app.core.errors import StudioError
from app.http import auth as accounts
from app.http.gate import is_openai_path
from app.services.recovery import start_reaper
from app.web import (
    api_docs,
    auth_pages,
    causal_pages,
    dashboard_pages,
    evaluation_pages,
    model_pages,
    pages,
    workers_pages,
)

STATIC_DIR: Path = PROJECT_ROOT / "static"


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith(("/api/", "/v1/")) and "text/html" in request.headers.get(
        "accept", ""
    )


def _field_path(location: tuple[object, ...]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_item(error: Mapping[str, Any]) -> dict[str, str]:
    """One pydantic/FastAPI validation error as ``{field, message}``."""
    if error.get("type") == "json_invalid":
        # FastAPI puts the character offset where the field name would be.
        location = tuple(error.get("loc", ()))
        offset = location[-1] if location else "?"
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        message = f"the request body is not valid JSON: {reason} at character {offset}"
        return {"field": "body", "message": message}
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")  # the field already says where
    if error.get("type") == "extra_forbidden":
        message = "Extra inputs are not permitted: not a field of this request (misspelt? see /docs)"
    if message.startswith("Expected UploadFile"):
        # A multipart part without a file name (e.g. a form sent with no file chosen) arrives as text.
        message = "no file was attached; send the file as a multipart part with a file name"
    return {"field": _field_path(tuple(error.get("loc", ()))), "message": message}


def create_app(migrate: bool = True) -> FastAPI:
    """Build the app; by default the database is migrated to the newest schema on start."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if migrate:
            run_migrations()
            accounts.bootstrap_accounts()  # the admin exists; PEFT_STUDIO_ADMIN_TOKEN is registered
        reaper = start_reaper()  # requeues running jobs whose worker vanished (app/services/recovery.py)
        yield
        if reaper is not None:
            reaper.cancel()

    # Every route, including routers added later, requires a signed-in user (app/http/auth.py; public: /healthz, /login*).
    app = FastAPI(
        title="PEFT Studio",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=accounts.AUTH_DEPENDENCIES,
        docs_url=None,  # our own /docs below serves Swagger UI from /static (offline, CSP without inline script)
        redoc_url=None,  # ReDoc would need a CDN; Swagger UI covers the same schema
    )
    app.add_route("/docs", api_docs.api_docs_page, include_in_schema=False)
    accounts.install(app)

    @app.exception_handler(StudioError)
    async def studio_error(request: Request, exc: StudioError) -> Response:
        if is_openai_path(request.url.path):
            return openai_compat.error_response(exc.status_code, exc.message, exc.field)
        if _wants_html(request):
            return pages.error_page(request, exc.status_code, exc.message)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if is_openai_path(request.url.path):
            return openai_compat.validation_response(exc)
        errors = [_validation_item(error) for error in exc.errors()]
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        if _wants_html(request):
            return pages.error_page(request, 422, message)
        return JSONResponse({"detail": message, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown /v1 paths (404) and wrong methods (405) answer in OpenAI's shape like the routes do.
        if is_openai_path(request.url.path):
            response = openai_compat.error_response(exc.status_code, str(exc.detail))
            response.headers.update(exc.headers or {})
            return response
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette still logs the traceback; the client gets no detail of it.
        if is_openai_path(request.url.path):
            return openai_compat.error_response(
                500, "The server failed to answer this request; it was logged."
            )
        return PlainTextResponse("Internal Server Error", status_code=500)

    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(adapters.router)
    app.include_router(generate.router)
    app.include_router(meta.router)
    app.include_router(adapter_import.router)
    app.include_router(auth_api.router)
    app.include_router(tokens_api.router)
    app.include_router(users_api.router)
    app.include_router(auth_pages.router)
    app.include_router(causal_pages.router)
    app.include_router(metrics_api.router)
    app.include_router(sweeps_api.router)
    app.include_router(openai_compat.router)
    app.include_router(webhooks.router)
    app.include_router(dashboard_pages.router)
    app.include_router(workers_pages.router)
    app.include_router(evaluations_api.router)
    app.include_router(evaluation_pages.router)
    app.include_router(models_api.router)
    app.include_router(model_pages.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


app = create_app()
