"""Work the service does by itself: seal committed entries into the hash chain, release expired holds.

Every worker process runs this loop; the sealer's advisory lock lets one seal at a time, and releasing a
hold is exactly-once in the database, so running it twice anywhere is harmless.

While the database is away (`app.db.connection_lost`) every tick fails the same way: the loop says so in one
warning line per outage (the error's class, never its message, which may quote a statement's values) and
once more when it is back. Any other failure is logged with its stack trace, every time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import connection_lost
from app.errors import failure_name
from app.settings import Settings
from ledger.service import Ledger, run_in_transaction
from vouchers.vouchers import expire_due_vouchers, return_released_holds

log = logging.getLogger(__name__)

SWEEP_BATCH = 200


async def seal_all(engine: AsyncEngine, ledger: Ledger) -> int:
    """Seal until the queue is empty (or another process holds the sealer lock)."""
    total = 0
    while sealed := await run_in_transaction(engine, ledger.seal):
        total += sealed
    return total


async def release_expired_holds(engine: AsyncEngine, ledger: Ledger) -> int:
    """Release every hold past its timeout, each in its own transaction."""
    released = 0
    async with engine.connect() as conn:
        due = await ledger.due_holds(conn, limit=SWEEP_BATCH)
    for pending_entry_id in due:
        if await run_in_transaction(engine, functools.partial(_expire, ledger, pending_entry_id)):
            released += 1
    return released


async def _expire(ledger: Ledger, pending_entry_id: int, conn: AsyncConnection) -> int | None:
    return await ledger.expire_pending(conn, pending_entry_id)


async def run_background(
    engine: AsyncEngine,
    ledger: Ledger,
    settings: Settings,
    policy_work: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run until cancelled; a failed round is logged (a lost database once an outage) and tried again on the
    next tick. `policy_work` runs on each sweeper tick after the ledger's own work (notices ending, 免申即享)."""
    next_sweep = 0.0
    lost = False  # the last tick found the database away
    while True:
        failure: Exception | None = None
        try:
            await seal_all(engine, ledger)
            if time.monotonic() >= next_sweep:
                await release_expired_holds(engine, ledger)
                await expire_due_vouchers(engine, ledger, datetime.now(UTC))  # POLICY.md, Expiry
                await return_released_holds(engine, ledger)
                if policy_work is not None:
                    await policy_work()
                next_sweep = time.monotonic() + settings.sweeper_interval_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        if failure is not None and connection_lost(failure):
            if not lost:
                log.warning("database unavailable (%s): background work waits for it", failure_name(failure))
            lost = True
        else:
            if lost:
                log.info("database back: background work resumed")
            if failure is not None:  # a bug, or the database refusing a statement: each one with its trace
                log.error("background ledger work failed; retrying", exc_info=failure)
            lost = False
        await asyncio.sleep(settings.sealer_interval_s)
