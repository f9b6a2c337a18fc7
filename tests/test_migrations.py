"""The schema migrates up and down cleanly, on a database of its own."""

from __future__ import annotations

import asyncio

import asyncpg
from conftest import _asyncpg_dsn, create_database, drop_database

from app import migrate

_LEFTOVERS = """
SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND (c.relname LIKE 'ledger\\_%' OR c.relname LIKE 'api\\_key%')
UNION ALL
SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND (p.proname LIKE 'ledger\\_%' OR p.proname LIKE 'api\\_key%')
"""


async def _query(url: str, sql: str) -> list[str]:
    dsn, kwargs = _asyncpg_dsn(url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        return [row[0] for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _version(url: str) -> list[str]:
    return await _query(url, "SELECT version_num FROM alembic_version")


async def test_upgrade_downgrade_upgrade(server_url: str) -> None:
    url = await create_database(server_url)
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        assert await _version(url) == [migrate.head_revision()]
        assert {"api_key", "ledger_entry", "ledger_post", "api_key_guard"} <= set(await _query(url, _LEFTOVERS))

        await asyncio.to_thread(migrate.downgrade, url, "0001")
        assert await _version(url) == ["0001"]
        assert not [name for name in await _query(url, _LEFTOVERS) if name.startswith("api_key")]

        await asyncio.to_thread(migrate.downgrade, url, "base")
        assert await _query(url, _LEFTOVERS) == []
        assert await _version(url) == []

        await asyncio.to_thread(migrate.upgrade, url)
        assert await _version(url) == [migrate.head_revision()]
    finally:
        await drop_database(server_url, url)
