"""Journal exports are bounded service-wide (app/export_slots.py): at most `VL_EXPORTS_CONCURRENT_MAX` stream at
once across every process, on connections of their own with a statement timeout; beyond that `429
rate_limited` with `Retry-After`, before anything is streamed. Slots come back when an export ends, however
it ends.

To hold exports mid-flight without a journal of millions, a test connection locks a table an export reads:
`ledger_seal` stops an export at its first query (after it has taken its slot, before the response
starts); `ledger_posting` lets a csv export send its headers and header row and stops it at the rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from conftest import create_database, drop_database
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import migrate
from app.apikeys import Role
from app.background import seal_all
from app.db import make_engine
from app.export_slots import EXPORT_LOCK_CLASS
from app.settings import RATE_ROLES, RateRule, Settings
from ledger.postings import credit, debit
from ledger.service import Ledger, run_in_transaction
from tests.ledger_support import open_accounts, unique
from tests.service_support import Service, clients_on_every_worker
from tests.test_support import assert_problem, bearer, create_key, running_app

PATH = "/v1/exports/journal"
WAIT_S = 15.0

_HELD = text(
    """
    SELECT count(*) FROM pg_locks
     WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND classid::bigint = :class
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    """
)


def bounded(settings: Settings, **update: object) -> Settings:
    """`settings` with these export limits and room in every key's own export rate (that one is
    tests/test_rate_limits.py's), so that only the service-wide bound can refuse."""
    rule = RateRule(rate_per_s=1_000, burst=1_000)
    limits = {role: {**settings.rate_limits[role], "export": rule} for role in RATE_ROLES}
    return settings.model_copy(update={"rate_limits": limits, **update})


async def slots_held(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(_HELD, {"class": EXPORT_LOCK_CLASS}) or 0)


async def until(check: Callable[[], Awaitable[bool]], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {wait_s:g} s: {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def locked(engine: AsyncEngine, table: str) -> AsyncIterator[AsyncConnection]:
    """`table` locked ACCESS EXCLUSIVE by a transaction of the test's until the block ends (or the test
    commits that connection earlier)."""
    async with engine.connect() as conn:
        await conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        try:
            yield conn
        finally:
            if conn.in_transaction():
                await conn.rollback()


async def a_sealed_journal(engine: AsyncEngine) -> None:
    """A few sealed entries, so that every format has rows to read."""
    ledger = Ledger()
    acc = await open_accounts(engine, ledger, {"world": None, "budget": None})
    for amount in (100, 200, 300):
        await run_in_transaction(
            engine,
            lambda c, amount=amount: ledger.transfer(
                c, key=unique("k-"), postings=[debit(acc["world"].code, amount), credit(acc["budget"].code, amount)]
            ),
        )
    await seal_all(engine, ledger)


def assert_busy(response: httpx.Response) -> None:
    body = assert_problem(response, 429, "rate_limited")
    assert response.headers["retry-after"] == "10"
    assert body["retry_after_s"] == 10
    assert "content-disposition" not in response.headers  # nothing was streamed


def assert_whole_jsonl(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    lines = response.content.splitlines(keepends=True)
    manifest = json.loads(lines[-1])
    assert manifest["type"] == "manifest" and manifest["entries"] == len(lines) - 1 > 0, manifest


# --------------------------------------------------------------------------------------------------------
# two apps on one database


async def test_exports_beyond_the_service_wide_bound_are_429_while_the_bound_streams(
    settings: Settings, engine: AsyncEngine
) -> None:
    await a_sealed_journal(engine)
    settings = bounded(settings, exports_concurrent_max=2, export_db_pool_size=2)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    admin = bearer(await create_key(engine, Role.ADMIN))
    assert await slots_held(engine) == 0
    async with running_app(settings) as one, running_app(settings) as two:
        async with locked(engine, "ledger_seal") as blocker:
            first = asyncio.create_task(one.get(PATH, params={"format": "jsonl"}, headers=auditor))
            second = asyncio.create_task(two.get(PATH, params={"format": "csv"}, headers=admin))
            await until(lambda: _equals(slots_held(engine), 2), "both exports hold a slot")
            # every key, every app (process): the service runs two, so a third anywhere is refused at once
            for client, key in ((one, auditor), (two, auditor), (one, admin), (two, admin)):
                assert_busy(await asyncio.wait_for(client.get(PATH, params={"format": "csv"}, headers=key), WAIT_S))
            assert not first.done() and not second.done()
            await blocker.rollback()
        jsonl, csv = await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
        assert_whole_jsonl(jsonl)
        assert csv.status_code == 200 and csv.text.startswith("entry_id,chain_seq,")
        # finished exports gave their slots back
        assert await slots_held(engine) == 0
        for client in (one, two, one):
            assert_whole_jsonl(await client.get(PATH, params={"format": "jsonl"}, headers=auditor))
        assert await slots_held(engine) == 0


async def test_a_process_with_every_export_connection_in_use_refuses_without_waiting(
    settings: Settings, engine: AsyncEngine
) -> None:
    await a_sealed_journal(engine)
    settings = bounded(settings, exports_concurrent_max=3, export_db_pool_size=1)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    async with running_app(settings) as one, running_app(settings) as two:
        async with locked(engine, "ledger_seal") as blocker:
            first = asyncio.create_task(one.get(PATH, headers=auditor))
            await until(lambda: _equals(slots_held(engine), 1), "the first export holds a slot")
            # a slot is free, but this app's one export connection is taken: no wait for the pool
            assert_busy(await asyncio.wait_for(one.get(PATH, headers=auditor), WAIT_S))
            second = asyncio.create_task(two.get(PATH, headers=auditor))  # the other app still may
            await until(lambda: _equals(slots_held(engine), 2), "the second export holds a slot")
            await blocker.rollback()
        for response in await asyncio.wait_for(asyncio.gather(first, second), WAIT_S):
            assert_whole_jsonl(response)
    assert await slots_held(engine) == 0


async def test_export_statements_time_out_on_their_own_connections(settings: Settings, engine: AsyncEngine) -> None:
    await a_sealed_journal(engine)
    settings = bounded(settings, export_statement_timeout_s=0.5)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    app_settings = settings
    async with running_app(app_settings) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        exports_engine: AsyncEngine = app.state.export_slots.engine
        async with exports_engine.connect() as conn:
            assert await conn.scalar(text("SHOW statement_timeout")) == "500ms"
            assert await conn.scalar(text("SHOW application_name")) == "voucher-ledger export"
        async with app.state.engine.connect() as conn:  # the request pool is not the exports'
            assert await conn.scalar(text("SHOW statement_timeout")) == "0"
        assert exports_engine is not app.state.engine
        assert exports_engine.pool.size() == settings.export_db_pool_size  # type: ignore[attr-defined]
        async with locked(engine, "ledger_seal"):
            began = time.monotonic()
            refused = await asyncio.wait_for(client.get(PATH, headers=auditor), WAIT_S)
            assert time.monotonic() - began < 5
            assert_problem(refused, 503, "service_unavailable")
            assert "VL_EXPORT_STATEMENT_TIMEOUT_S" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "10"
            assert await slots_held(engine) == 0  # its slot is back while the lock still stands
        assert_whole_jsonl(await client.get(PATH, headers=auditor))


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


# --------------------------------------------------------------------------------------------------------
# `voucher-ledger serve --workers 2`


@pytest.mark.slow
async def test_two_worker_processes_share_the_bound_and_a_client_gone_mid_stream_frees_its_slot(
    embedded_server_url: str, tmp_path: Path
) -> None:
    url = await create_database(embedded_server_url)
    limits = {role: {"export": {"rate_per_s": 1000, "burst": 1000}} for role in RATE_ROLES}
    service = Service(
        url,
        tmp_path,
        workers=2,
        env={"VL_EXPORTS_CONCURRENT_MAX": "2", "VL_RATE_LIMITS": json.dumps(limits), "VL_SEALER_INTERVAL_S": "0.05"},
    )
    engine = make_engine(url, Settings(database_url=url))
    clients: list[httpx.AsyncClient] = []
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        await a_sealed_journal(engine)
        key = await create_key(engine, Role.AUDITOR)
        await service.start()
        # two pairs of clients, each pair one connection on each worker process
        for _ in range(2):
            pair, owners = await clients_on_every_worker(service, key, 2)
            clients += pair
            assert sorted(owners.values()) == [1, 1], owners
        async with locked(engine, "ledger_seal") as blocker:
            running = [asyncio.create_task(clients[i].get(PATH, params={"format": "jsonl"})) for i in (0, 1)]
            await until(lambda: _equals(slots_held(engine), 2), "an export holds a slot in each worker")
            for client in clients[2:]:
                assert_busy(await asyncio.wait_for(client.get(PATH, params={"format": "jsonl"}), WAIT_S))
            await blocker.rollback()
        for response in await asyncio.wait_for(asyncio.gather(*running), WAIT_S):
            assert_whole_jsonl(response)
        # the slots come back just after the last byte
        await until(lambda: _equals(slots_held(engine), 0), "slots freed after the exports ended")

        # a client that goes away mid-stream (its headers and the csv header row received) frees its slot
        # while the export's rows are still out of reach
        async with locked(engine, "ledger_posting"):
            for client in clients[:2]:
                async with client.stream("GET", PATH, params={"format": "csv"}) as response:
                    assert response.status_code == 200
                    chunks = response.aiter_raw()
                    assert (await anext(chunks)).startswith(b"entry_id,chain_seq,")
                    await asyncio.sleep(0.5)
                    assert await slots_held(engine) == 1  # the export waits for its rows, in its slot
                    await client.aclose()  # the connection closes with the body unread
            await until(lambda: _equals(slots_held(engine), 0), "slots freed after the clients left")
        async with service.client(key) as other:
            for _ in range(3):
                assert_whole_jsonl(await other.get(PATH, params={"format": "jsonl"}))
        await until(lambda: _equals(slots_held(engine), 0), "slots freed after the exports ended")
        assert "Traceback" not in service.log_text(), service.log_tail()
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
        service.stop()
        await engine.dispose()
        await drop_database(embedded_server_url, url)
