"""Dependencies that handlers receive through Annotated parameters."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app.core.db import get_engine


async def request_session() -> AsyncIterator[Session]:
    """A session per request. Opening one touches no database (the first query connects), so it happens on the
    event loop; closing it gives the connection back (a rollback: blocking work) in a worker thread. A sync
    dependency would cost two thread hops per request instead of one."""
    session = Session(get_engine())
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(request_session)]
