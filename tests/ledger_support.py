"""Helpers shared by the ledger tests."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.service import Account, Ledger, Limit, run_in_transaction


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def open_accounts(engine: AsyncEngine, ledger: Ledger, specs: dict[str, Limit | None]) -> dict[str, Account]:
    """Open accounts under a fresh namespace; returns them by their short name."""
    space = unique("t")

    async def work(conn: AsyncConnection) -> dict[str, Account]:
        return {name: await ledger.open_account(conn, f"{space}:{name}", limit=limit) for name, limit in specs.items()}

    return await run_in_transaction(engine, work)
