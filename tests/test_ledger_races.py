"""Races through separate connections that commit for real: limits and idempotency hold under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_engine
from app.settings import Settings
from ledger.errors import LimitExceeded, PendingResolved
from ledger.postings import credit, debit
from ledger.service import Entry, Ledger, run_in_transaction
from tests.ledger_support import open_accounts, unique

CONNECTIONS = 50


@pytest.fixture
async def wide_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine with a connection for every racer (no overflow: each racer has its own connection)."""
    engine = make_engine(db_url, Settings(database_url=db_url, db_pool_size=CONNECTIONS, db_max_overflow=0))
    yield engine
    await engine.dispose()


async def outcomes(calls: list[Any]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_hundred_transfers_never_overdraw(wide_engine: AsyncEngine) -> None:
    ledger = Ledger()
    acc = await open_accounts(
        wide_engine, ledger, {"world": None, "voucher": "debits_must_not_exceed_credits", "provider": None}
    )
    voucher, provider = acc["voucher"].code, acc["provider"].code
    await run_in_transaction(
        wide_engine,
        lambda c: ledger.transfer(
            c, key=unique("f-"), postings=[debit(acc["world"].code, 50 * 2_000), credit(voucher, 50 * 2_000)]
        ),
    )

    def spend() -> Any:
        return run_in_transaction(
            wide_engine,
            lambda c: ledger.transfer(c, key=unique("s-"), postings=[debit(voucher, 2_000), credit(provider, 2_000)]),
        )

    results = await outcomes([spend() for _ in range(100)])
    succeeded = [r for r in results if isinstance(r, Entry)]
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert (len(succeeded), len(refused)) == (50, 50), [r for r in results if isinstance(r, BaseException)][:3]
    async with wide_engine.connect() as conn:
        v = await ledger.balance(conn, voucher)
        p = await ledger.balance(conn, provider)
        assert await ledger.verify_cached_balances(conn) == []
    assert (v.available_fen, v.debits_posted_fen) == (0, 100_000)
    assert p.credits_posted_fen == 100_000


async def test_fifty_identical_requests_make_one_entry(wide_engine: AsyncEngine) -> None:
    ledger = Ledger()
    acc = await open_accounts(
        wide_engine, ledger, {"world": None, "voucher": "debits_must_not_exceed_credits", "provider": None}
    )
    await run_in_transaction(
        wide_engine,
        lambda c: ledger.transfer(
            c, key=unique("f-"), postings=[debit(acc["world"].code, 500), credit(acc["voucher"].code, 500)]
        ),
    )
    key = unique("same-")
    postings = [debit(acc["voucher"].code, 300), credit(acc["provider"].code, 300)]
    results = await outcomes(
        [
            run_in_transaction(wide_engine, lambda c: ledger.transfer(c, key=key, postings=postings))
            for _ in range(CONNECTIONS)
        ]
    )
    assert all(isinstance(r, Entry) for r in results), [r for r in results if not isinstance(r, Entry)][:3]
    assert len({r.id for r in results}) == 1
    assert sum(1 for r in results if not r.replayed) == 1
    async with wide_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM ledger_entry WHERE idempotency_key = :k"), {"k": key}) == 1
        assert (await ledger.balance(conn, acc["voucher"].code)).available_fen == 200


async def test_fifty_identical_requests_on_unlimited_accounts_make_one_entry(wide_engine: AsyncEngine) -> None:
    # no account is locked here: only the unique key serializes them
    ledger = Ledger()
    acc = await open_accounts(wide_engine, ledger, {"a": None, "b": None})
    key = unique("same-")
    postings = [debit(acc["a"].code, 7), credit(acc["b"].code, 7)]
    results = await outcomes(
        [
            run_in_transaction(wide_engine, lambda c: ledger.transfer(c, key=key, postings=postings))
            for _ in range(CONNECTIONS)
        ]
    )
    assert all(isinstance(r, Entry) for r in results), [r for r in results if not isinstance(r, Entry)][:3]
    assert len({r.id for r in results}) == 1
    async with wide_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM ledger_entry WHERE idempotency_key = :k"), {"k": key}) == 1


async def test_a_hold_resolves_exactly_once_under_a_race(wide_engine: AsyncEngine) -> None:
    ledger = Ledger()
    acc = await open_accounts(wide_engine, ledger, {"world": None, "v": "debits_must_not_exceed_credits", "p": None})
    await run_in_transaction(
        wide_engine,
        lambda c: ledger.transfer(
            c, key=unique("f-"), postings=[debit(acc["world"].code, 100), credit(acc["v"].code, 100)]
        ),
    )
    hold = await run_in_transaction(
        wide_engine,
        lambda c: ledger.hold(
            c, key=unique("h-"), postings=[debit(acc["v"].code, 100), credit(acc["p"].code, 100)], timeout_s=600
        ),
    )
    calls = [
        run_in_transaction(
            wide_engine, lambda c: ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold.id, amount_fen=60)
        )
        for _ in range(15)
    ]
    calls += [
        run_in_transaction(wide_engine, lambda c: ledger.void_pending(c, key=unique("v-"), pending_entry_id=hold.id))
        for _ in range(15)
    ]
    results = await outcomes(calls)
    winners = [r for r in results if isinstance(r, Entry)]
    assert len(winners) == 1
    assert all(isinstance(r, PendingResolved) for r in results if not isinstance(r, Entry))
    async with wide_engine.connect() as conn:
        v = await ledger.balance(conn, acc["v"].code)
    assert v.debits_pending_fen == 0
    assert v.available_fen == (40 if winners[0].kind == "post_pending" else 100)


async def test_crossing_transfers_do_not_deadlock(wide_engine: AsyncEngine) -> None:
    # A->B and B->A at once: both lock in id order, so neither waits on the other in a cycle
    ledger = Ledger()
    acc = await open_accounts(
        wide_engine,
        ledger,
        {"world": None, "a": "debits_must_not_exceed_credits", "b": "debits_must_not_exceed_credits"},
    )
    a, b = acc["a"].code, acc["b"].code
    for target in (a, b):
        await run_in_transaction(
            wide_engine,
            lambda c, t=target: ledger.transfer(  # type: ignore[misc]
                c, key=unique("f-"), postings=[debit(acc["world"].code, 1_000), credit(t, 1_000)]
            ),
        )
    calls = []
    for i in range(40):
        source, target = (a, b) if i % 2 else (b, a)
        calls.append(
            run_in_transaction(
                wide_engine,
                lambda c, s=source, t=target: ledger.transfer(
                    c, key=unique("x-"), postings=[debit(s, 10), credit(t, 10)]
                ),
                attempts=1,
            )
        )
    results = await outcomes(calls)
    assert all(isinstance(r, Entry) for r in results), [r for r in results if not isinstance(r, Entry)][:3]
    async with wide_engine.connect() as conn:
        total = sum(x.available_fen for x in await ledger.balances(conn, codes=[a, b]))
    assert total == 2_000


async def test_concurrent_opens_and_posts_on_one_account_never_lose_it(wide_engine: AsyncEngine) -> None:
    # each redemption opens the provider's payable account and posts to it; 40 at once in one process
    # (one cache) must all resolve the account, whichever of them found it first
    creator, ledger = Ledger(), Ledger()
    acc = await open_accounts(wide_engine, creator, {"world": None, "payable": None})

    async def open_and_post(i: int) -> Entry:
        async def work(conn: Any) -> Entry:
            await ledger.open_account(conn, acc["payable"].code)
            return await ledger.transfer(
                conn, key=unique(f"p{i}-"), postings=[debit(acc["world"].code, 1), credit(acc["payable"].code, 1)]
            )

        return await run_in_transaction(wide_engine, work)

    results = await outcomes([open_and_post(i) for i in range(40)])
    assert all(isinstance(r, Entry) for r in results), [r for r in results if not isinstance(r, Entry)][:3]
