"""The ledger's write path talks to asyncpg directly, inside the transaction SQLAlchemy manages.

SQLAlchemy's per-statement machinery (compiling, parameter processing, result wrapping, greenlet hops)
costs about a third of a ledger write on these 2-core machines: bench/ledger.py measured 1,444 single-
statement transfers/s at 32 connections through `conn.execute(text(...))` and 1,937 through asyncpg's own
`fetchrow` on the same connection. So the hot statements (a ledger write, a redemption, the sealer's
batches) go to asyncpg; everything else, and the transaction itself, stays with SQLAlchemy.

This leans on the asyncpg adapter's internals (`_connection`, `_transaction`, `_start_transaction`,
`_execute_mutex`), pinned by uv.lock; tests/test_ledger_core.py proves that a write made here commits and
rolls back with the caller's transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection


async def fetchrow(conn: AsyncConnection, sql: str, *args: Any) -> Any:
    """Run `sql` ($1-style parameters) on the connection under `conn`, in its transaction (beginning it
    if nothing has yet), and return the first row as an asyncpg Record."""
    adapter = await _in_transaction(conn)
    async with adapter._execute_mutex:
        return await adapter._connection.fetchrow(sql, *args)


async def fetch(conn: AsyncConnection, sql: str, *args: Any) -> list[Any]:
    """`fetchrow`, answering every row."""
    adapter = await _in_transaction(conn)
    async with adapter._execute_mutex:
        rows: list[Any] = await adapter._connection.fetch(sql, *args)
        return rows


async def execute(conn: AsyncConnection, sql: str, *args: Any) -> str:
    """`fetchrow` for a statement whose rows nobody reads; its command tag."""
    adapter = await _in_transaction(conn)
    async with adapter._execute_mutex:
        status: str = await adapter._connection.execute(sql, *args)
        return status


async def fetchrow_alone(conn: AsyncConnection, sql: str, *args: Any) -> Any:
    """Run `sql` as a transaction of its own (PostgreSQL's implicit one: no BEGIN, no COMMIT, one round
    trip) on the connection under `conn`, which must not be in a transaction; the first row, as an asyncpg
    Record. For a command written as one database function: it commits when the statement returns, or
    nothing of it does."""
    adapter = await _outside_transaction(conn)
    async with adapter._execute_mutex:
        return await adapter._connection.fetchrow(sql, *args)


async def fetch_alone(conn: AsyncConnection, sql: str, *args: Any) -> list[Any]:
    """`fetchrow_alone`, answering every row: one statement as a transaction of its own."""
    adapter = await _outside_transaction(conn)
    async with adapter._execute_mutex:
        rows: list[Any] = await adapter._connection.fetch(sql, *args)
        return rows


async def _in_transaction(conn: AsyncConnection) -> Any:
    """The asyncpg adapter under `conn`, in a transaction SQLAlchemy knows of (begun here if none is), so
    that `conn.commit()` commits what is written on it."""
    raw = await conn.get_raw_connection()
    adapter: Any = raw.dbapi_connection
    if not adapter.autocommit:
        if not conn.in_transaction():
            await conn.begin()  # SQLAlchemy's bookkeeping, so that conn.commit() commits what we write
        if adapter._transaction is None:
            await adapter._start_transaction()
    return adapter


async def _outside_transaction(conn: AsyncConnection) -> Any:
    """The asyncpg adapter under `conn`, which must not be in a transaction (a statement sent on it is
    then its own)."""
    if conn.in_transaction():
        raise RuntimeError("a statement alone runs as its own transaction: end the open one first")
    raw = await conn.get_raw_connection()
    adapter: Any = raw.dbapi_connection
    assert adapter._transaction is None, "the connection's driver holds a transaction SQLAlchemy does not know"
    return adapter
