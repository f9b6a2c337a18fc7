"""Named advisory locks for read-check-write sequences that no single row guards (a budget figure, a cap,
a yearly limit, an automatic grant). Transaction-scoped: released at commit or rollback."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended(:name, 0))")


async def lock(conn: AsyncConnection, name: str) -> None:
    """Wait for the lock called `name`."""
    await conn.execute(_LOCK, {"name": name})


async def try_lock(conn: AsyncConnection, name: str) -> bool:
    """Take the lock called `name` if no one holds it; False when someone does."""
    return bool(await conn.scalar(_TRY_LOCK, {"name": name}))
