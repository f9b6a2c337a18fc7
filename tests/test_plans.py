"""Plans that cannot go wrong (issue 14): a posting made on a connection whose plans were made while the
journal was empty reads no more of the journal when it has grown.

PL/pgSQL keeps each statement's plan for its connection's life, so the plan a fresh deploy makes before
autovacuum's first analyze is the plan that connection keeps. The test makes exactly that state (autovacuum
off, nothing analyzed), plans on the empty journal, grows it, and counts the rows the same connection's
next posting reads from each table (`pg_stat_xact_user_tables`: this transaction's own reads).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_engine
from app.settings import Settings
from ledger.service import Ledger
from tests.conftest import _asyncpg_dsn
from tests.ledger_support import open_accounts

GROWN = 2_000
# a read of the journal that grew with it would show thousands of rows; a keyed read shows one or two
ROWS_READ_MAX = 20


@pytest.fixture
async def never_analyzed(fresh_db_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A migrated database in which autovacuum never runs, so nothing is ever analyzed."""
    dsn, kwargs = _asyncpg_dsn(fresh_db_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        tables = await conn.fetch("SELECT relname FROM pg_stat_user_tables")
        for (table,) in tables:
            await conn.execute(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL"
        )
    finally:
        await conn.close()
    engine = make_engine(fresh_db_url, Settings(database_url=fresh_db_url, background_tasks=False))
    try:
        yield fresh_db_url, engine
    finally:
        await engine.dispose()


_POST = (
    "SELECT outcome FROM ledger_post($1, $2, 'transfer', NULL, NULL, NULL, 'plan test', '{}'::jsonb, $3, "
    "ARRAY['debit', 'credit'], ARRAY['posted', 'posted'], ARRAY[1, 1]::bigint[])"
)


async def test_a_posting_planned_on_an_empty_journal_reads_by_key_when_it_has_grown(
    never_analyzed: tuple[str, AsyncEngine],
) -> None:
    url, engine = never_analyzed
    accounts = await open_accounts(engine, Ledger(), {"from": None, "to": None})
    ids = [accounts["from"].id, accounts["to"].id]
    dsn, kwargs = _asyncpg_dsn(url)
    planned, grower = await asyncpg.connect(dsn, **kwargs), await asyncpg.connect(dsn, **kwargs)
    try:

        async def post(conn: asyncpg.Connection, key: str) -> None:
            assert await conn.fetchval(_POST, key, hashlib.sha256(key.encode()).digest(), ids) == "created"

        await post(planned, "first")  # every statement of the posting path is planned on the empty journal
        await grower.execute(
            "SELECT ledger_post('grow-' || i, sha256(('grow-' || i)::bytea), 'transfer', NULL, NULL, NULL, '', "
            "'{}'::jsonb, $1, ARRAY['debit', 'credit'], ARRAY['posted', 'posted'], ARRAY[1, 1]::bigint[]) "
            "FROM generate_series(1, $2) i",
            ids,
            GROWN,
        )
        assert await grower.fetchval("SELECT count(*) FROM ledger_entry") == GROWN + 1
        async with planned.transaction():  # the same connection, the plans it made when the journal was empty
            await post(planned, "second")
            reads = {
                row["relname"]: row["read"]
                for row in await planned.fetch(
                    "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS read "
                    "FROM pg_stat_xact_user_tables"
                )
            }
    finally:
        await planned.close()
        await grower.close()
    assert reads.get("ledger_account"), reads  # the posting's own reads were counted
    heavy = {table: rows for table, rows in reads.items() if rows > ROWS_READ_MAX}
    assert not heavy, f"reads that grew with the journal ({GROWN} entries): {heavy}; all: {reads}"
