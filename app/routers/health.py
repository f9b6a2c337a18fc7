"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import connection_lost
from app.errors import ServiceUnavailable, note_database_unavailable, problem_responses
from app.schemas import ResponseModel

router = APIRouter(tags=["health"])

# A database that does not answer within this long is not ready: a load balancer's probe must not hang.
READY_TIMEOUT_S = 2.0


class Status(ResponseModel):
    status: str


@router.get("/healthz", summary="Liveness: the process answers (no database access)")
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: the database answers and its schema is at the migrations' head",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> Status:
    background = getattr(request.app.state, "background", None)
    if background is not None and background.done():
        raise ServiceUnavailable("the background tasks (chain sealer, hold sweeper) have stopped", code="not_ready")
    engine: AsyncEngine = request.app.state.engine
    head: str = request.app.state.head_revision
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), engine.connect() as connection:
            versions = set((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())
    except TimeoutError:
        raise ServiceUnavailable(
            f"the database did not answer within {READY_TIMEOUT_S:g} s", code="not_ready"
        ) from None
    except Exception as exc:
        # A dead pooled connection costs no failed probe: the pool replaces it at checkout (app/db.py). A probe
        # every second while the database is away is logged as the requests' 503s are, once per interval.
        note_database_unavailable("GET /readyz", exc)
        if connection_lost(exc):
            raise ServiceUnavailable("the database cannot be reached", code="not_ready") from None
        raise ServiceUnavailable("the database refused the check: is it migrated?", code="not_ready") from None
    if versions != {head}:
        found = ", ".join(sorted(versions)) or "none"
        raise ServiceUnavailable(f"the database schema is at {found}, not at {head}", code="not_ready")
    return Status(status="ok")
