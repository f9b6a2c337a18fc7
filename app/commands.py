"""Money-moving commands run once per `Idempotency-Key` (API.md, Conventions).

`run_idempotent` stores a command's answer, success or refusal, in the same transaction as its postings;
the same key and body get the first answer again, forever; another body is `422 idempotency_conflict`; a
duplicate arriving while the first runs waits for it (`409 request_in_progress` after 10 s). The command
runs inside a savepoint, so a refusal leaves nothing behind but its stored answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app import idempotency
from app.apikeys import Caller
from app.errors import domain_problem

Command = Callable[[AsyncConnection], Awaitable[tuple[int, dict[str, Any]]]]


async def run_idempotent(
    session: AsyncSession, caller: Caller, key: str, route: str, body: BaseModel | None, command: Command
) -> JSONResponse:
    conn = await session.connection()
    fingerprint = idempotency.request_hash(route, None if body is None else body.model_dump(mode="json"))
    replay = await idempotency.replay_or_none(
        conn, caller_key_id=caller.key_id, key=key, route=route, request_hash=fingerprint
    )
    if replay is not None:
        return idempotency.response(replay)
    savepoint = await conn.begin_nested()
    try:
        status_code, payload = await command(conn)
    except Exception as exc:
        answer = domain_problem(exc)
        if answer is None or answer[0] >= 500:
            raise
        await savepoint.rollback()
        status_code, payload = answer
    else:
        await savepoint.commit()
    stored = idempotency.Stored(status_code, payload)
    await idempotency.remember(
        conn,
        caller_key_id=caller.key_id,
        key=key,
        route=route,
        request_hash=fingerprint,
        status_code=status_code,
        body=payload,
    )
    await session.commit()
    return idempotency.response(stored)


async def run_command(
    session: AsyncSession, caller: Caller, key: str | None, route: str, body: BaseModel | None, command: Command
) -> JSONResponse:
    """For commands where the key is optional: idempotent when the caller sends one, else run once."""
    if key is not None:
        return await run_idempotent(session, caller, key, route, body, command)
    status_code, payload = await command(await session.connection())
    await session.commit()
    return JSONResponse(payload, status_code=status_code)
