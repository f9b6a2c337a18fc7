"""`Idempotency-Key` for the POSTs that move money: the answer is stored with the postings it answers for.

A command route, in its one transaction:

    stored = await idempotency.replay_or_none(conn, caller_key_id=..., key=..., route=ROUTE, request_hash=h)
    if stored is not None:
        return idempotency.response(stored)                 # the first answer again: same ids, nothing new
    ...run the command (a refusal is an answer too)...
    await idempotency.remember(conn, ..., status_code=201, body=payload)
    await session.commit()                                  # the record commits with the postings, or neither

An answer goes out as `render` writes it, the first time and on every replay: in the form PostgreSQL
writes the `jsonb` it is stored in, the form `voucher_redeem` sends its stored answers in, so a replay is
the first answer byte for byte (jsonb keeps no key order of its own).

Keys are scoped to the caller's API key and never expire. The same key with another body (or on another
route) is `IdempotencyKeyReused` (422 `idempotency_conflict`). A duplicate that arrives while the first is
still running waits for it: `replay_or_none` takes a transaction-scoped advisory lock on (caller, key)
*before* it looks, so the second blocks until the first commits (or rolls back) and then finds its answer
(or runs the command itself); after `WAIT_S` it gives up with `RequestInProgress` (409
`request_in_progress`), which is never stored. The lock timeout applies to that one lock only: the
session's default (`SET LOCAL lock_timeout = DEFAULT`) is restored once it is held, so the command's own
lock waits are not cut short.

This module imports nothing from `app.errors` (which maps its errors), so it stays free of import cycles.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, NamedTuple

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.service import sqlstate

__all__ = [
    "IN_PROGRESS",
    "KEY_LENGTH_MAX",
    "KEY_REUSED",
    "WAIT_S",
    "IdempotencyKeyHeader",
    "IdempotencyKeyReused",
    "OptionalIdempotencyKeyHeader",
    "RequestInProgress",
    "Stored",
    "remember",
    "remember_unless_answered",
    "render",
    "replay_or_none",
    "request_hash",
    "response",
]

KEY_LENGTH_MAX = 255  # the idempotency_record CHECK
WAIT_S = 10  # how long a duplicate waits for the first request (API.md)
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
KEY_REUSED = "this Idempotency-Key was already used for a different request; use a new key for a new request"
IN_PROGRESS = f"a request with this Idempotency-Key is still running after {WAIT_S} s; retry later"
_PROBLEM_MEDIA_TYPE = "application/problem+json"  # app.errors.PROBLEM_MEDIA_TYPE (not imported: see above)

IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=KEY_LENGTH_MAX,
        description="required: a retry with the same key and body gets the first answer, nothing is done twice",
    ),
]

# where a key is optional (a command that is safe to repeat without one): the same header when it is sent
OptionalIdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=KEY_LENGTH_MAX),
]


class IdempotencyKeyReused(Exception):
    """The key was used by this caller for a different request (another body or another route)."""

    code = "idempotency_conflict"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RequestInProgress(Exception):
    """A request with this key is still running after `WAIT_S` seconds; retry later."""

    code = "request_in_progress"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Stored(NamedTuple):
    """The answer given to the key's first request."""

    status_code: int
    body: dict[str, Any]


def request_hash(route: str, body: Any) -> bytes:
    """SHA-256 of a canonical JSON form of the route and the parsed body (`model_dump(mode="json")`): two
    bodies that parse to the same request (key order, an explicit default) are the same request."""
    canonical = json.dumps({"route": route, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


async def replay_or_none(
    conn: AsyncConnection, *, caller_key_id: str, key: str, route: str, request_hash: bytes
) -> Stored | None:
    """The stored answer to this caller's `key`, or None when the key is new (the caller runs the command
    and `remember`s its answer in this transaction). Holds the key's lock until the transaction ends."""
    assert 1 <= len(key) <= KEY_LENGTH_MAX and len(request_hash) == 32
    await conn.execute(text(f"SET LOCAL lock_timeout = '{WAIT_S}s'"))
    try:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"),
            {"name": f"idempotency:{caller_key_id}:{key}"},
        )
    except DBAPIError as exc:
        if sqlstate(exc) == _LOCK_NOT_AVAILABLE:
            raise RequestInProgress(IN_PROGRESS) from exc
        raise
    await conn.execute(text("SET LOCAL lock_timeout = DEFAULT"))
    # a statement of its own, after the lock: under READ COMMITTED it sees what the first request committed
    return await _stored(conn, caller_key_id=caller_key_id, key=key, route=route, request_hash=request_hash)


async def _stored(
    conn: AsyncConnection, *, caller_key_id: str, key: str, route: str, request_hash: bytes
) -> Stored | None:
    """The answer stored under the caller's key, None when there is none; `IdempotencyKeyReused` when it
    answers another request."""
    row = (
        await conn.execute(
            text(
                "SELECT route, request_hash, status_code, response::text AS response FROM idempotency_record "
                "WHERE caller_key_id = :caller AND idempotency_key = :key"
            ),
            {"caller": caller_key_id, "key": key},
        )
    ).first()
    if row is None:
        return None
    if row.route != route or bytes(row.request_hash) != request_hash:
        raise IdempotencyKeyReused(KEY_REUSED)
    body: dict[str, Any] = json.loads(row.response)
    return Stored(int(row.status_code), body)


async def remember(
    conn: AsyncConnection,
    *,
    caller_key_id: str,
    key: str,
    route: str,
    request_hash: bytes,
    status_code: int,
    body: dict[str, Any],
) -> None:
    """Store the answer to the key's first request, in the caller's transaction (commit it with the
    command's postings). Only after `replay_or_none` answered None in this same transaction."""
    assert 200 <= status_code < 500, "a server error is not an answer to keep"
    await conn.execute(_INSERT, _record(caller_key_id, key, route, request_hash, status_code, body))


_INSERT = text(
    "INSERT INTO idempotency_record (caller_key_id, idempotency_key, route, request_hash, status_code, response) "
    "VALUES (:caller, :key, :route, :hash, :status, CAST(:body AS jsonb))"
)
_INSERT_IF_ABSENT = text(
    f"{_INSERT.text} ON CONFLICT (caller_key_id, idempotency_key) DO NOTHING RETURNING status_code"
)


def _record(
    caller_key_id: str, key: str, route: str, request_hash: bytes, status_code: int, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "caller": caller_key_id,
        "key": key,
        "route": route,
        "hash": request_hash,
        "status": status_code,
        "body": json.dumps(body, ensure_ascii=False),
    }


async def remember_unless_answered(
    conn: AsyncConnection,
    *,
    caller_key_id: str,
    key: str,
    route: str,
    request_hash: bytes,
    status_code: int,
    body: dict[str, Any],
) -> Stored:
    """Store an answer that wrote nothing (a refusal) in a transaction of its own, unless the key has one
    already: a concurrent request with the same key may have stored its answer first, and then that one is
    the key's answer, for this request too. `conn` must not be in a transaction; it is committed."""
    assert 400 <= status_code < 500, "only a refusal is stored after the fact"
    inserted = await conn.scalar(_INSERT_IF_ABSENT, _record(caller_key_id, key, route, request_hash, status_code, body))
    if inserted is not None:
        await conn.commit()
        return Stored(status_code, body)
    try:
        stored = await _stored(conn, caller_key_id=caller_key_id, key=key, route=route, request_hash=request_hash)
    finally:
        await conn.commit()
    assert stored is not None, "the insert found the key taken: its answer is there"
    return stored


def render(body: Any) -> bytes:
    """`body` as JSON text in the form PostgreSQL writes a `jsonb` value (`response::text`): an object's keys
    shortest first, then by their UTF-8 bytes; `", "` between members and items, `": "` after a key; text
    escaped as `json.dumps(ensure_ascii=False)` escapes it, which is as PostgreSQL does. A float (no answer
    holds one: money is integer fen) is written as Python writes it, which PostgreSQL matches but in
    exponent form."""
    out: list[str] = []
    _render(body, out)
    return "".join(out).encode()


def _jsonb_key_order(key: object) -> tuple[int, bytes]:
    if not isinstance(key, str):
        raise TypeError(f"an answer's keys are text, not {type(key).__name__}")
    encoded = key.encode()
    return len(encoded), encoded


def _render(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_jsonb_key_order)):
            out.append(", " if i else "")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(": ")
            _render(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            out.append(", " if i else "")
            _render(item, out)
        out.append("]")
    elif value is None or isinstance(value, str | int | float):  # bool is an int
        out.append(json.dumps(value, ensure_ascii=False))
    else:
        raise TypeError(f"an answer holds JSON text, numbers, booleans and null, not {type(value).__name__}")


class StoredResponse(JSONResponse):
    """A JSONResponse whose body is `render`ed: the form a replay of it takes."""

    def render(self, content: Any) -> bytes:
        return render(content)


def response(stored: Stored) -> JSONResponse:
    """The stored answer, byte for byte as sent the first time (a problem document for an error status)."""
    media_type = _PROBLEM_MEDIA_TYPE if stored.status_code >= 400 else "application/json"
    return StoredResponse(stored.body, status_code=stored.status_code, media_type=media_type)
