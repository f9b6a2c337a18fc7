"""The database engine: one per process, owned by the app's lifespan or by a command.

Losing the database. A connection can die under the service (the server restarts, an operator runs
`pg_terminate_backend`, the network drops it) and the server can be unreachable for a while. The service
then answers `503 service_unavailable` with `Retry-After` (app/errors.py, using `connection_lost` below)
and recovers by itself, without a restart:

- A pooled connection whose socket the server closed is replaced when it is checked out (`_replace_closed`).
  asyncpg already knows its socket is closed, so this costs no round trip; `pool_pre_ping` would cost three
  per checkout with SQLAlchemy's asyncpg dialect (BEGIN, `;`, ROLLBACK), and round trips are what a
  redemption costs (PERFORMANCE.md).
- A connection that fails in use is invalidated: by SQLAlchemy for a statement it ran (it also marks every
  connection pooled before that moment for replacement), and by `invalidate_if_lost` for an error raised
  by the raw asyncpg connection beneath, which SQLAlchemy never sees.
- A new connection gives up after `CONNECT_TIMEOUT_S` (asyncpg's default is 60 s): a request never hangs
  on a server that accepts the TCP connection and then says nothing.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.settings import Settings

__all__ = ["CONNECT_TIMEOUT_S", "connection_lost", "invalidate_if_lost", "make_engine"]

CONNECT_TIMEOUT_S = 5.0

# SQLSTATEs that mean "not now" rather than "no": class 08 (connection exception) and these.
_UNAVAILABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: pg_terminate_backend, or a fast or smart shutdown
        "57P02",  # crash_shutdown: another backend crashed, the server is restarting
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
        "57P05",  # idle_session_timeout
        "53300",  # too_many_connections: every client reconnecting at once after a restart
    }
)
# asyncpg's words for a connection that is gone (InterfaceError covers misuse too, which is a bug)
_CLOSED_MESSAGES = ("connection is closed", "connection was closed")
_CHAIN_MAX = 8


def make_engine(url: str, settings: Settings, *, exports: bool = False) -> AsyncEngine:
    """The request pool; with `exports`, the journal exports' own small pool (`VL_EXPORT_DB_POOL_SIZE`, no
    overflow), whose statements PostgreSQL cancels after `VL_EXPORT_STATEMENT_TIMEOUT_S`: a long export
    never takes a connection from redemptions, nor runs a statement without end."""
    if not url.startswith("postgresql+asyncpg://"):
        raise ValueError("DATABASE_URL must be a postgresql+asyncpg:// URL")
    server_settings = {"application_name": "voucher-ledger", "timezone": "UTC"}
    pool_size, max_overflow = settings.db_pool_size, settings.db_max_overflow
    if exports:
        pool_size, max_overflow = settings.export_db_pool_size, 0
        server_settings |= {
            "application_name": "voucher-ledger export",
            "statement_timeout": str(max(1, round(settings.export_statement_timeout_s * 1000))),
        }
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        # Durable commits are the contract (a 2xx means committed): never turn synchronous_commit off.
        connect_args={"timeout": CONNECT_TIMEOUT_S, "server_settings": server_settings},
    )
    event.listen(engine.sync_engine, "checkout", _replace_closed)
    return engine


def _replace_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout: a connection the server has closed (asyncpg saw its socket end) is discarded and the
    pool connects a new one in its place, instead of handing out a connection that fails on first use."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or dropped the connection (a retry later may
    succeed), rather than answering the statement. Covers SQLAlchemy's wrappers and the raw forms: asyncpg's
    errors (ConnectionDoesNotExistError, "connection is closed", SQLSTATE class 08, 57P01-57P03, 57P05,
    53300), and OSError from connecting (refused, reset, unreachable, a missing socket file, timed out).
    An error carrying any other SQLSTATE is the server's answer, so not a lost connection.

    asyncpg's InternalClientError counts too: it is how a connection reports the FATAL error a terminated
    backend sends to an idle connection (an unsolicited message puts the protocol out of step) when the
    connection is used again before the socket's end has been read; the connection is useless either way."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _CHAIN_MAX:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, DisconnectionError):
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state.startswith("08") or state in _UNAVAILABLE_SQLSTATES
        if isinstance(current, asyncpg.ConnectionDoesNotExistError | asyncpg.exceptions.InternalClientError):
            return True
        if isinstance(current, asyncpg.InterfaceError) and any(m in str(current) for m in _CLOSED_MESSAGES):
            return True
        if isinstance(current, OSError):  # the service does no other I/O while answering a request
            return True
        following = getattr(current, "orig", None) if isinstance(current, DBAPIError) else None
        current = following if isinstance(following, BaseException) else (current.__cause__ or current.__context__)
    return False


async def invalidate_if_lost(conn: AsyncConnection, exc: BaseException) -> bool:
    """After `exc` was raised by the raw asyncpg connection under `conn` (a statement sent through
    `(await conn.get_raw_connection()).driver_connection`, which SQLAlchemy never sees): when it says the
    connection is gone, invalidate `conn`, so the pool closes it and connects a new one rather than handing
    it out again, and answer True. Otherwise leave `conn` alone and answer False. Either way the caller
    re-raises `exc`: app/errors.py answers a lost connection with 503 and `Retry-After`.

        try:
            row = await raw.fetchrow(sql, *args)
        except Exception as exc:
            await invalidate_if_lost(conn, exc)
            raise
    """
    if not connection_lost(exc):
        return False
    if not conn.invalidated:
        await conn.invalidate(exc if isinstance(exc, Exception) else None)
    return True
