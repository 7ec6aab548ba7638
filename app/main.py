"""The FastAPI application: JSON API under /api/v1, HTML pages at /, static files."""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.api import adapter_import, adapters, datasets, generate, jobs, meta, openai_compat, webhooks
from app.api import auth as auth_api
from app.api import evaluations as evaluations_api
from app.api import metrics as metrics_api
from app.api import models as models_api
from app.api import sweeps as sweeps_api
from app.api import tokens as tokens_api
from app.api import users as users_api
from app.core.db import PROJECT_ROOT, run_migrations, startup_lock
from app.http import errors, gate
from app.http.auth import AUTH_DEPENDENCIES
from app.services.accounts import bootstrap_accounts
from app.services.background import BackgroundDuties
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
from app.web.render import render

STATIC_DIR: Path = PROJECT_ROOT / "static"


_FROZEN = False


def freeze_start_up_objects() -> None:
    """Once per process, after start-up: move everything made so far (modules, routes, models, templates) out of
    the garbage collector's sight (``gc.freeze``).

    A full collection walks every tracked object; in a web process that had started, one took 112 ms, and every
    request in flight waited for it: under 100 polling clients those pauses were the API's p99 (bench/web_tier.py,
    issue 20). With the start-up objects frozen the same collection takes 8-10 ms. Frozen objects are never
    freed, so this runs once per process (tests build many apps in one).
    """
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.freeze()


def create_app(migrate: bool = True) -> FastAPI:
    """Build the app; by default the database is migrated to the newest schema on start."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if migrate:
            with startup_lock():  # uvicorn --workers N: one process at a time (app/core/db.py)
                run_migrations()
                bootstrap_accounts()  # the admin exists; PEFT_STUDIO_ADMIN_TOKEN is registered
        # The reaper (requeues running jobs whose worker vanished) and the webhook dispatcher run in one web
        # process of those sharing the data folder (app/services/background.py), however many serve starts.
        duties = BackgroundDuties()
        duties.start()
        freeze_start_up_objects()
        yield
        await duties.stop()

    # Every route, including routers added later, requires a signed-in user (app/http/auth.py; public: /healthz, /login*).
    app = FastAPI(
        title="PEFT Studio",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=AUTH_DEPENDENCIES,
        docs_url=None,  # our own /docs below serves Swagger UI from /static (offline, CSP without inline script)
        redoc_url=None,  # ReDoc would need a CDN; Swagger UI covers the same schema
    )
    app.add_route("/docs", api_docs.api_docs_page, include_in_schema=False)
    gate.install(app)  # the request's layers: security headers, sign-in before the body, body caps
    # One error path: domain and validation errors as JSON, OpenAI's shape or HTML (app/http/errors.py).
    errors.install(
        app,
        render=render,
        openai_error=openai_compat.error_response,
        openai_validation=openai_compat.validation_response,
    )

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
