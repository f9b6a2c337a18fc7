"""How many journal exports run at once, service-wide: `VL_EXPORTS_CONCURRENT_MAX` slots held in PostgreSQL.

An export holds a connection, a REPEATABLE READ snapshot and most of a core for seconds to minutes; the
per-key rate (app/ratelimit.py) bounds each key, not their sum, and five exports at once were enough to
take redemptions from 10 ms to over a second. So an export first takes a slot: one of the session-level
advisory locks `(EXPORT_LOCK_CLASS, 0..N-1)`, taken with `pg_try_advisory_lock` on the export's own
connection and held for the stream's life. The database is what every worker process and every host
share, so the bound holds across all of them, with no table and no migration; PostgreSQL releases a
session's locks when its connection ends, so a worker killed mid-export frees its slot too. No slot free:
`429 rate_limited` with `Retry-After`, before anything is streamed.

The connection comes from the exports' own pool (`app.db.make_engine(exports=True)`): a few per process,
with a statement timeout, never the request pool that redemptions use. A process whose export connections
are all leased answers 429 as well, without waiting for one.

`release` gives the slot back when the stream ends, however it ends: `ExportResponse` calls it, shielded
from cancellation. An export streamed to its end unlocks its slot on its connection, which goes back to the
pool. One that did not (the client went away mid-stream, a statement failed) may have left a statement
running on the server that its cancellation does not stop (seen with SQLAlchemy's server-side cursor: the
cancelled fetch kept waiting, and every later statement on the connection waited behind it), so its
backend is terminated from a connection of the request pool and the connection discarded: the session
ends at once, and its lock with it. Closing the socket alone would not do: a backend waiting on a lock
notices a vanished client only when the wait ends. The same happens to a connection that cannot unlock
within `RELEASE_GRACE_S`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import Receive, Scope, Send

from app.errors import ProblemError

__all__ = ["EXPORT_LOCK_CLASS", "ExportLease", "ExportResponse", "ExportSlots", "ExportsBusy"]

log = logging.getLogger(__name__)

# the advisory locks' first key ("VLEX"); the two-key form never meets the one-key locks used elsewhere
EXPORT_LOCK_CLASS = 0x564C4558
# what a refused export is told to wait: about the per-key export rate's interval (6 a minute)
BUSY_RETRY_AFTER_S = 10
# how long a slot's connection may take to unlock it before its backend is terminated instead
RELEASE_GRACE_S = 2.0

_TRY_SLOT = text("SELECT pg_try_advisory_lock(:class, :slot) AS taken, pg_backend_pid() AS pid")
_TERMINATE = text("SELECT pg_terminate_backend(:pid)")
_FREE_SLOT = text("SELECT pg_advisory_unlock(:class, :slot)")


class ExportsBusy(ProblemError):
    status = 429
    code = "rate_limited"

    def __init__(self, detail: str) -> None:
        super().__init__(
            detail,
            code="rate_limited",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            extra={"bucket": "export", "retry_after_s": BUSY_RETRY_AFTER_S},
        )


class ExportLease:
    """A slot and the connection that holds it; `release` once, when the export is over."""

    def __init__(self, slots: ExportSlots, conn: AsyncConnection, slot: int, backend_pid: int) -> None:
        self.conn = conn
        self.slot = slot
        self.backend_pid = backend_pid
        self._slots = slots
        self._released = False

    async def release(self, *, finished: bool = True) -> None:
        """Give the slot back; `finished=False` when the export stopped with work possibly still running
        on its connection: its session is then ended rather than asked."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        failure = "no answer" if finished else "the export stopped mid-stream"
        try:
            if finished:
                with anyio.move_on_after(RELEASE_GRACE_S):
                    try:
                        if conn.in_transaction():
                            await conn.rollback()
                        await conn.execute(_FREE_SLOT, {"class": EXPORT_LOCK_CLASS, "slot": self.slot})
                        await conn.commit()
                        await conn.close()
                        return
                    except Exception as exc:
                        failure = type(exc).__name__
            # the session ends instead, and its locks with it
            (log.warning if finished else log.info)(
                "export slot %d freed by ending its session (%s)", self.slot, failure
            )
            await self._slots.end_session(conn, self.backend_pid)
        finally:
            self._slots.leased -= 1


class ExportSlots:
    """This process's way to the service-wide export slots, through the exports' own engine."""

    def __init__(
        self, engine: AsyncEngine, *, slots_max: int, connections_max: int, request_engine: AsyncEngine | None = None
    ) -> None:
        """`engine`: the exports' own; `request_engine` (default: `engine`) ends a stuck export's session."""
        assert slots_max >= 1 and connections_max >= 1
        self.engine = engine
        self.request_engine = request_engine or engine
        self.slots_max = slots_max
        self.connections_max = connections_max
        self.leased = 0

    async def acquire(self) -> ExportLease:
        """A free slot on a connection of the export pool, or `ExportsBusy`."""
        if self.leased >= self.connections_max:
            raise ExportsBusy(
                f"{self.leased} journal exports are running in this process, its most; retry after"
                f" {BUSY_RETRY_AFTER_S} s"
            )
        self.leased += 1
        conn: AsyncConnection | None = None
        try:
            conn = await self.engine.connect()
            for slot in range(self.slots_max):
                row = (await conn.execute(_TRY_SLOT, {"class": EXPORT_LOCK_CLASS, "slot": slot})).one()
                if row.taken:
                    await conn.commit()  # the lock is the session's: it outlives the transaction
                    return ExportLease(self, conn, slot, int(row.pid))
            await conn.rollback()
            await conn.close()
        except BaseException:
            if conn is not None:
                await self.discard(conn)
            self.leased -= 1
            raise
        self.leased -= 1
        raise ExportsBusy(
            f"{self.slots_max} journal exports are running, the most the service runs at once"
            f" (VL_EXPORTS_CONCURRENT_MAX); retry after {BUSY_RETRY_AFTER_S} s"
        )

    async def end_session(self, conn: AsyncConnection, backend_pid: int) -> None:
        """Terminate `conn`'s backend from another connection (its locks are freed at once), then discard
        `conn`."""
        try:
            with anyio.fail_after(RELEASE_GRACE_S * 5):
                async with self.request_engine.connect() as other:
                    await other.execute(_TERMINATE, {"pid": backend_pid})
                    await other.commit()
        except Exception as exc:  # the socket's end will do, once the backend looks at it
            log.warning("an export's backend could not be terminated (%s)", type(exc).__name__)
        await self.discard(conn)

    async def discard(self, conn: AsyncConnection) -> None:
        """Close `conn`'s session for good (the pool connects a new one): whatever locks it held are freed."""
        try:
            if not conn.invalidated:
                await conn.invalidate()
            await conn.close()
        except Exception as exc:
            log.warning("an export connection could not be closed cleanly (%s)", type(exc).__name__)


class ExportResponse(StreamingResponse):
    """A streamed export that gives its slot back when the stream ends, however it ends."""

    def __init__(self, content: AsyncIterator[bytes], lease: ExportLease, **kwargs: Any) -> None:
        self.lease = lease
        self._content = content
        self._finished = False
        super().__init__(self._through(content), **kwargs)

    async def _through(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self._finished = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # a client gone mid-stream cancels the stream where it stood: close the body (its transaction
            # ends) and free the slot even though this task is being cancelled
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception as exc:
                        log.warning("an export's stream ended with %s", type(exc).__name__)
                await self.lease.release(finished=self._finished)
