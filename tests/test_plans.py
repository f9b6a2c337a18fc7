"""Plans that cannot go wrong (issue 14): a posting, a redemption or a seal made on a connection whose plans
were made while the tables were empty reads no more of them when they have grown.

PL/pgSQL keeps each statement's plan for its connection's life, so the plan a fresh deploy makes before
autovacuum's first analyze is the plan that connection keeps. The test makes exactly that state (autovacuum
off, nothing analyzed), plans on the empty journal, grows it, and counts the rows the same connection's
next posting (redemption, seal) reads from each table (`pg_stat_xact_user_tables`: this transaction's own reads).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import asyncpg
import jwt
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from ledger.postings import POSTINGS_MAX, Posting
from ledger.service import SEAL_BATCH_MAX, Ledger, Transfer
from tests.conftest import _asyncpg_dsn
from tests.ledger_support import open_accounts
from tests.service_support import CURRENT_YEAR
from tests.test_support import bearer, create_entity, create_key, running_app
from vouchers.applications import new_id
from vouchers.redemption import _REDEEM, payable_account
from vouchers.vouchers import voucher_account

GROWN = 2_000
REDEMPTIONS_GROWN = 200
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


_READS = "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS read FROM pg_stat_xact_user_tables"

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


async def test_a_redemption_planned_on_an_empty_table_reads_by_key_when_redemptions_have_grown(
    never_analyzed: tuple[str, AsyncEngine],
) -> None:
    """The invoice check (one redemption per provider and invoice number) reads one row, not every
    earlier redemption of the provider."""
    url, engine = never_analyzed
    settings = Settings(database_url=url, background_tasks=False, api_key_cache_ttl_s=0)
    admin = bearer(await create_key(engine, Role.ADMIN))
    holder, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    async with running_app(settings) as client:
        budget = f"/v1/programs/compute.purchase/budgets/{CURRENT_YEAR}"
        assert (await client.put(budget, headers=admin, json={"amount_fen": 100_000_000})).status_code == 200
        submitted = await client.post(
            "/v1/applications",
            headers=admin,
            json={
                "program": "compute.purchase",
                "applicant_entity_id": holder,
                "year": CURRENT_YEAR,
                "basis": {
                    "purchases": [
                        {
                            "provider_entity_id": provider,
                            "invoice_no": "B-1",
                            "category": "compute",
                            "amount_fen": 200_000_001,
                            "purchased_on": f"{CURRENT_YEAR - 1}-05-01",
                        }
                    ]
                },
            },
        )
        approved = await client.post(f"/v1/applications/{submitted.json()['id']}/approve", headers=admin)
        assert approved.status_code == 201, approved.text
        voucher = approved.json()
        token = (await client.post(f"/v1/vouchers/{voucher['id']}/token", headers=admin)).json()["token"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]

    def redeem_args(invoice: str) -> tuple[object, ...]:
        """`voucher_redeem`'s arguments as vouchers/redemption.py passes them, for a 1 fen redemption."""
        digest = hashlib.sha256(invoice.encode()).digest()
        return (
            "key_plans", invoice, "POST /v1/redemptions", digest, jti, False, voucher["id"],
            voucher_account(voucher["id"]), payable_account(provider), provider, invoice, False, None,
            1, 1, 1, new_id("rdm_"), "[]", "[]", "plan test", "{}", "{}",
        )  # fmt: skip

    dsn, kwargs = _asyncpg_dsn(url)
    planned, grower = await asyncpg.connect(dsn, **kwargs), await asyncpg.connect(dsn, **kwargs)
    try:
        assert (await planned.fetchrow(_REDEEM, *redeem_args("first")))["outcome"] == "created"
        for i in range(REDEMPTIONS_GROWN):  # each its own transaction, as the service commits them
            assert (await grower.fetchrow(_REDEEM, *redeem_args(f"grow-{i}")))["outcome"] == "created"
        async with planned.transaction():  # the plans this connection made when there was no redemption
            assert (await planned.fetchrow(_REDEEM, *redeem_args("second")))["outcome"] == "created"
            again = redeem_args("grow-7")
            again = (*again[:1], "another key", *again[2:])  # a new request for an invoice already redeemed
            assert (await planned.fetchrow(_REDEEM, *again))["outcome"] == "invoice_redeemed"
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
    assert reads.get("voucher"), reads  # the redemptions' own reads were counted
    heavy = {table: rows for table, rows in reads.items() if rows > ROWS_READ_MAX}
    assert not heavy, f"reads that grew with the redemptions ({REDEMPTIONS_GROWN}): {heavy}; all: {reads}"


ACCOUNTS_GROWN = 3_000
# each account's first entry, three times over: a journal of some 9,000 postings, so that the planner, without
# statistics, expects many postings to an entry, as it does on any journal of size
JOURNAL_ROUNDS = 3
# PostgreSQL plans a prepared statement afresh for its first five runs, and then may keep a generic plan
PLANNED_SEALS = 6
SEALS = 5


async def _reads(conn: AsyncConnection) -> dict[str, int]:
    """Rows read per table by this connection since it last reported its statistics (never within a
    transaction): what a transaction read is the difference of two calls made within it."""
    return {row.relname: int(row.read) for row in (await conn.execute(text(_READS))).all()}


async def test_posting_and_sealing_planned_on_empty_tables_read_accounts_by_key_when_there_are_many(
    never_analyzed: tuple[str, AsyncEngine],
) -> None:
    """The balance check at commit reads an entry's accounts, and the sealer folds a batch's postings into
    the cached totals of the accounts they move: each reads those accounts and no other, however many there
    are, on a connection whose plans were made when there were none. Without statistics the check was a
    hash join over every account (3,002 rows of ledger_account read per entry posted here, 2 now), and the
    sealer's write and its read of an entry's postings two more (6,004 per entry sealed, 4 now).

    Two connections plan the sealer on near-empty tables: one as the service's do (asyncpg's prepared
    statements, PostgreSQL's choice between custom and generic plans), one holding the generic plan made at
    the first run, as PL/pgSQL's plans are held."""
    _url, engine = never_analyzed
    ledger = Ledger()
    accounts = await open_accounts(engine, ledger, {"from": None, "to": None})
    codes = (accounts["from"].code, accounts["to"].code)

    async def post(conn: AsyncConnection, key: str, reads: dict[str, int] | None = None) -> None:
        """Post an entry; with `reads`, add the rows its balance check read, run before the commit."""
        await ledger.transfer(conn, key=key, postings=[Posting(codes[0], "debit", 1), Posting(codes[1], "credit", 1)])
        if reads is not None:
            before = await _reads(conn)
            await conn.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))  # the deferred check, now
            after = await _reads(conn)
            for table, rows in after.items():
                reads[table] = reads.get(table, 0) + rows - before.get(table, 0)
        await conn.commit()

    async with engine.connect() as auto, engine.connect() as generic:  # their plans stay with them
        await generic.execute(text("SET plan_cache_mode = force_generic_plan"))
        await generic.commit()
        planned = {"auto": auto, "force_generic_plan": generic}
        for i in range(PLANNED_SEALS):
            for mode, conn in planned.items():
                await post(conn, f"planned-{mode}-{i}")
                assert await ledger.seal(conn) == 1
                await conn.commit()

        async with engine.connect() as grower:  # many accounts (vouchers), each with entries
            for i in range(ACCOUNTS_GROWN):
                await ledger.open_account(grower, f"grown:{i}")
            batch = POSTINGS_MAX - 1
            await ledger.transfer_many(
                grower,
                [
                    Transfer(
                        f"grow-{r}-{lo}",
                        [Posting(f"grown:{i}", "debit", 1) for i in range(lo, min(lo + batch, ACCOUNTS_GROWN))]
                        + [Posting(codes[1], "credit", min(batch, ACCOUNTS_GROWN - lo))],
                    )
                    for r in range(JOURNAL_ROUNDS)
                    for lo in range(0, ACCOUNTS_GROWN, batch)
                ],
            )
            await grower.commit()
            while await ledger.seal(grower, batch_size=SEAL_BATCH_MAX):
                await grower.commit()

        reads: dict[str, dict[str, int]] = {}
        for mode, conn in planned.items():
            posted = reads.setdefault(f"{mode}, posted", {})
            sealed = reads.setdefault(f"{mode}, sealed", {})
            for i in range(SEALS):
                await post(conn, f"sealed-{mode}-{i}", posted)
                before = await _reads(conn)
                assert await ledger.seal(conn) == 1
                after = await _reads(conn)
                await conn.commit()
                for table, rows in after.items():
                    sealed[table] = sealed.get(table, 0) + rows - before.get(table, 0)
    for what, by_table in reads.items():
        assert by_table.get("ledger_account"), (what, by_table)  # the check's and the seals' own reads counted
        per_entry = {table: rows / SEALS for table, rows in by_table.items() if rows}
        heavy = {table: rows for table, rows in per_entry.items() if rows > ROWS_READ_MAX}
        assert not heavy, f"{what}: rows read per entry, with {ACCOUNTS_GROWN} accounts: {per_entry}"
