"""The ledger core against a real PostgreSQL: what it refuses, what it keeps, what the database backs."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import chain, driver
from ledger.errors import (
    AccountExists,
    AccountNotFound,
    AlreadyReversed,
    AppendOnlyViolation,
    IdempotencyConflict,
    InvalidEntry,
    LimitExceeded,
    NotReversible,
    PendingExpired,
    PendingResolved,
)
from ledger.postings import Posting, credit, debit
from ledger.service import _UNSEALED, Ledger, run_in_transaction, sqlstate
from tests.ledger_support import open_accounts, unique


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


async def fund(engine: AsyncEngine, ledger: Ledger, source: str, target: str, amount: int) -> None:
    await run_in_transaction(
        engine,
        lambda c: ledger.transfer(c, key=unique("fund-"), postings=[debit(source, amount), credit(target, amount)]),
    )


async def test_transfer_moves_money_and_balances(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"world": None, "budget": "debits_must_not_exceed_credits"})
    world, budget = acc["world"].code, acc["budget"].code
    await fund(engine, ledger, world, budget, 1_000_00)
    async with engine.connect() as conn:
        b = await ledger.balance(conn, budget)
        w = await ledger.balance(conn, world)
    assert (b.credits_posted_fen, b.debits_posted_fen, b.available_fen) == (1_000_00, 0, 1_000_00)
    assert (w.debits_posted_fen, w.credits_posted_fen) == (1_000_00, 0)


async def test_limit_refuses_overdraft_and_the_refusal_is_durable(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(
        engine, ledger, {"world": None, "budget": "debits_must_not_exceed_credits", "spent": None}
    )
    world, budget, spent = (acc[n].code for n in ("world", "budget", "spent"))
    await fund(engine, ledger, world, budget, 100)
    key = unique("k-")
    with pytest.raises(LimitExceeded) as refused:
        await run_in_transaction(
            engine, lambda c: ledger.transfer(c, key=key, postings=[debit(budget, 101), credit(spent, 101)])
        )
    assert budget in refused.value.detail
    # more money arrives, but the refused key stays refused
    await fund(engine, ledger, world, budget, 1_000)
    with pytest.raises(LimitExceeded):
        await run_in_transaction(
            engine, lambda c: ledger.transfer(c, key=key, postings=[debit(budget, 101), credit(spent, 101)])
        )
    # the same key for another request is a conflict, not a second refusal
    with pytest.raises(IdempotencyConflict):
        await run_in_transaction(
            engine, lambda c: ledger.transfer(c, key=key, postings=[debit(budget, 102), credit(spent, 102)])
        )
    async with engine.connect() as conn:
        assert (await ledger.balance(conn, budget)).available_fen == 1_100


async def test_idempotent_replay_returns_the_original(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    postings = [debit(acc["a"].code, 5), credit(acc["b"].code, 5)]
    key = unique("k-")
    first = await run_in_transaction(engine, lambda c: ledger.transfer(c, key=key, postings=postings))
    again = await run_in_transaction(engine, lambda c: ledger.transfer(c, key=key, postings=postings))
    assert again.id == first.id and again.replayed and not first.replayed
    with pytest.raises(IdempotencyConflict):
        await run_in_transaction(
            engine, lambda c: ledger.transfer(c, key=key, postings=postings, memo="something else")
        )
    async with engine.connect() as conn:
        assert (await ledger.balance(conn, acc["b"].code)).credits_posted_fen == 5


@pytest.mark.parametrize(
    "postings",
    [
        [Posting("x", "debit", 5)],
        [Posting("x", "debit", 5), Posting("y", "credit", 4)],
        [Posting("x", "debit", 0), Posting("y", "credit", 0)],
        [Posting("x", "debit", -5), Posting("y", "credit", -5)],
        [Posting("x", "debit", True), Posting("y", "credit", True)],  # type: ignore[arg-type]
        [Posting("x", "debit", 1.5), Posting("y", "credit", 1.5)],  # type: ignore[arg-type]
        [Posting("x", "debit", 5), Posting("y", "credit", 5, "pending")],
    ],
)
async def test_malformed_entries_are_refused_before_the_database(
    engine: AsyncEngine, ledger: Ledger, postings: list[Posting]
) -> None:
    with pytest.raises(InvalidEntry):
        await run_in_transaction(engine, lambda c: ledger.transfer(c, key=unique("k-"), postings=postings))


async def test_unknown_account_and_account_reopening(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None})
    with pytest.raises(AccountNotFound):
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(
                c, key=unique("k-"), postings=[debit(acc["a"].code, 1), credit("no:such:account", 1)]
            ),
        )
    again = await run_in_transaction(engine, lambda c: ledger.open_account(c, acc["a"].code))
    assert again.id == acc["a"].id
    with pytest.raises(AccountExists):
        await run_in_transaction(
            engine, lambda c: ledger.open_account(c, acc["a"].code, limit="debits_must_not_exceed_credits")
        )
    with pytest.raises(InvalidEntry):
        await run_in_transaction(engine, lambda c: ledger.open_account(c, "bad code with spaces"))


async def test_hold_post_in_part_and_exactly_once(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(
        engine, ledger, {"world": None, "voucher": "debits_must_not_exceed_credits", "provider": None}
    )
    world, voucher, provider = (acc[n].code for n in ("world", "voucher", "provider"))
    await fund(engine, ledger, world, voucher, 1_000)
    hold = await run_in_transaction(
        engine,
        lambda c: ledger.hold(
            c, key=unique("h-"), postings=[debit(voucher, 600), credit(provider, 600)], timeout_s=3600
        ),
    )
    async with engine.connect() as conn:
        assert (await ledger.balance(conn, voucher)).available_fen == 400
    # the hold reserves: 401 more is refused
    with pytest.raises(LimitExceeded):
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(c, key=unique("k-"), postings=[debit(voucher, 401), credit(provider, 401)]),
        )
    with pytest.raises(InvalidEntry):
        await run_in_transaction(
            engine, lambda c: ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold.id, amount_fen=601)
        )
    posted = await run_in_transaction(
        engine, lambda c: ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold.id, amount_fen=250)
    )
    assert posted.kind == "post_pending"
    for again in (ledger.post_pending, ledger.void_pending):
        with pytest.raises(PendingResolved):
            await run_in_transaction(
                engine,
                lambda c, f=again: f(  # type: ignore[misc]
                    c, key=unique("p-"), pending_entry_id=hold.id
                ),
            )
    async with engine.connect() as conn:
        v = await ledger.balance(conn, voucher)
        p = await ledger.balance(conn, provider)
    assert (v.debits_posted_fen, v.debits_pending_fen, v.available_fen) == (250, 0, 750)
    assert (p.credits_posted_fen, p.credits_pending_fen) == (250, 0)


async def test_void_releases_everything(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"world": None, "v": "debits_must_not_exceed_credits", "p": None})
    await fund(engine, ledger, acc["world"].code, acc["v"].code, 100)
    hold = await run_in_transaction(
        engine,
        lambda c: ledger.hold(
            c, key=unique("h-"), postings=[debit(acc["v"].code, 100), credit(acc["p"].code, 100)], timeout_s=60
        ),
    )
    await run_in_transaction(engine, lambda c: ledger.void_pending(c, key=unique("v-"), pending_entry_id=hold.id))
    async with engine.connect() as conn:
        assert (await ledger.balance(conn, acc["v"].code)).available_fen == 100


async def test_expired_hold_releases_itself_and_cannot_be_posted(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"world": None, "v": "debits_must_not_exceed_credits", "p": None})
    v, p = acc["v"].code, acc["p"].code
    await fund(engine, ledger, acc["world"].code, v, 100)
    hold = await run_in_transaction(
        engine, lambda c: ledger.hold(c, key=unique("h-"), postings=[debit(v, 100), credit(p, 100)], timeout_s=1)
    )
    await asyncio.sleep(1.2)
    async with engine.connect() as conn:  # at read time
        assert (await ledger.balance(conn, v)).available_fen == 100
    with pytest.raises(PendingExpired):
        await run_in_transaction(engine, lambda c: ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold.id))
    # a write that needs the reserved money releases the expired hold in its own transaction
    await run_in_transaction(
        engine, lambda c: ledger.transfer(c, key=unique("k-"), postings=[debit(v, 100), credit(p, 100)])
    )
    async with engine.connect() as conn:
        entry_kinds = [e.kind for e in await ledger.entries(conn, account_prefix=v)]
        assert "expire_pending" in entry_kinds
        assert (await ledger.balance(conn, v)).available_fen == 0
        assert await ledger.verify_cached_balances(conn) == []


async def test_sweeper_expires_due_holds(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"world": None, "v": "debits_must_not_exceed_credits", "p": None})
    await fund(engine, ledger, acc["world"].code, acc["v"].code, 10)
    hold = await run_in_transaction(
        engine,
        lambda c: ledger.hold(
            c, key=unique("h-"), postings=[debit(acc["v"].code, 10), credit(acc["p"].code, 10)], timeout_s=1
        ),
    )
    await asyncio.sleep(1.2)
    async with engine.connect() as conn:
        assert hold.id in await ledger.due_holds(conn, limit=10_000)
    released = await run_in_transaction(engine, lambda c: ledger.expire_pending(c, hold.id))
    assert released is not None
    assert await run_in_transaction(engine, lambda c: ledger.expire_pending(c, hold.id)) is None
    async with engine.connect() as conn:
        b = await ledger.balance(conn, acc["v"].code)
    assert (b.debits_pending_fen, b.available_fen) == (0, 10)


async def test_reversal_compensates_once(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"world": None, "v": "debits_must_not_exceed_credits", "p": None})
    v, p = acc["v"].code, acc["p"].code
    await fund(engine, ledger, acc["world"].code, v, 100)
    spend = await run_in_transaction(
        engine, lambda c: ledger.transfer(c, key=unique("k-"), postings=[debit(v, 70), credit(p, 70)])
    )
    reversal = await run_in_transaction(engine, lambda c: ledger.reverse(c, key=unique("r-"), entry_id=spend.id))
    assert reversal.reverses_entry_id == spend.id
    assert [(x.account, x.direction, x.amount_fen) for x in reversal.postings] == [(v, "credit", 70), (p, "debit", 70)]
    with pytest.raises(AlreadyReversed):
        await run_in_transaction(engine, lambda c: ledger.reverse(c, key=unique("r-"), entry_id=spend.id))
    with pytest.raises(NotReversible):
        await run_in_transaction(engine, lambda c: ledger.reverse(c, key=unique("r-"), entry_id=reversal.id))
    async with engine.connect() as conn:
        assert (await ledger.balance(conn, v)).available_fen == 100


async def test_the_database_refuses_edits_and_unbalanced_entries(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None, "b": "debits_must_not_exceed_credits"})
    entry = await run_in_transaction(
        engine,
        lambda c: ledger.transfer(c, key=unique("k-"), postings=[debit(acc["a"].code, 9), credit(acc["b"].code, 9)]),
    )
    statements = [
        f"UPDATE ledger_entry SET memo = 'edited' WHERE id = {entry.id}",
        f"DELETE FROM ledger_posting WHERE entry_id = {entry.id}",
        f"UPDATE ledger_posting SET amount = 1 WHERE entry_id = {entry.id}",
        "TRUNCATE ledger_entry CASCADE",
        "TRUNCATE ledger_posting",
        f"DELETE FROM ledger_account WHERE id = {acc['a'].id}",
        f"UPDATE ledger_account SET debits_must_not_exceed_credits = false WHERE id = {acc['b'].id}",
        # a limit the row would break
        f"UPDATE ledger_account SET debits_posted = 10 WHERE id = {acc['b'].id}",
        # postings slipped into an entry another transaction wrote
        f"INSERT INTO ledger_posting VALUES ({entry.id}, 7, {acc['a'].id}, 'debit', 'posted', 1), "
        f"({entry.id}, 8, {acc['b'].id}, 'credit', 'posted', 1)",
        f"INSERT INTO ledger_posting VALUES ({entry.id}, 9, {acc['a'].id}, 'debit', 'posted', 0)",
    ]
    for statement in statements:
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError) as failure:
                await conn.execute(text(statement))
                await conn.commit()
            assert sqlstate(failure.value) in ("VL001", "23514"), statement
    # an entry whose postings do not balance fails at commit (deferred constraint trigger)
    async with engine.connect() as conn:
        new_id = await conn.scalar(
            text(
                "INSERT INTO ledger_entry (idempotency_key, request_hash, kind) "
                "VALUES (:k, sha256('x'::bytea), 'transfer') RETURNING id"
            ),
            {"k": unique("raw-")},
        )
        await conn.execute(
            text(
                f"INSERT INTO ledger_posting VALUES ({new_id}, 0, {acc['a'].id}, 'debit', 'posted', 5), "
                f"({new_id}, 1, {acc['b'].id}, 'credit', 'posted', 4)"
            )
        )
        with pytest.raises(DBAPIError) as failure:
            await conn.commit()
        assert sqlstate(failure.value) == "VL002"
    async with engine.connect() as conn:
        assert (await ledger.entry(conn, entry.id)).memo == ""


async def test_append_only_violation_maps_to_a_domain_error(engine: AsyncEngine, ledger: Ledger) -> None:
    from ledger.service import _raise_mapped

    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as failure:
            await conn.execute(text("DELETE FROM ledger_entry WHERE id = (SELECT min(id) FROM ledger_entry)"))
    with pytest.raises(AppendOnlyViolation):
        _raise_mapped(failure.value)


async def test_chain_seals_verifies_and_detects_tampering(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    for amount in (1, 2, 3):
        await run_in_transaction(
            engine,
            lambda c, n=amount: ledger.transfer(  # type: ignore[misc]
                c, key=unique("k-"), postings=[debit(acc["a"].code, n), credit(acc["b"].code, n)]
            ),
        )
    while await run_in_transaction(engine, ledger.seal):
        pass
    async with engine.connect() as conn:
        report = await ledger.verify_chain(conn)
        assert report.ok, report.problem
        assert report.entries >= 3
        assert await ledger.verify_cached_balances(conn) == []
        b = await ledger.balance(conn, acc["b"].code)
        assert b.credits_posted_fen == 6
        # tampering: recompute what the chain would say if one amount had been edited
        entries = await ledger.entries(conn, account_prefix=acc["a"].code)
    sealed = entries[-1]
    assert sealed.chain_seq is not None and sealed.hash is not None and sealed.prev_hash is not None
    document = {
        "chain_seq": sealed.chain_seq,
        "id": sealed.id,
        "kind": sealed.kind,
        "idempotency_key": sealed.idempotency_key,
        "pending_entry_id": None,
        "reverses_entry_id": None,
        "expires_at": None,
        "memo": sealed.memo,
        "metadata": sealed.metadata,
        "created_at": sealed.created_at,
        "postings": [
            {"account": p.account, "direction": p.direction, "phase": p.phase, "amount_fen": p.amount_fen}
            for p in sealed.postings
        ],
        "prev_hash": sealed.prev_hash,
        "hash": sealed.hash,
    }
    assert chain.verify([document], sealed.prev_hash, sealed.chain_seq).ok
    document["postings"][0]["amount_fen"] += 1  # type: ignore[index]
    assert not chain.verify([document], sealed.prev_hash, sealed.chain_seq).ok


async def test_the_sealer_reads_each_queued_entry_by_its_id_whatever_the_planner_prefers(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    """Written as a join, the sealer's read became a merge join over the whole journal's index whenever the
    statistics put many rows in the queue, so every batch cost more as the journal grew. With joins other
    than a nested loop preferred (as such statistics made them) and sequential scans ruled out (on a test
    database's few entries the planner rightly prefers one), the read still fetches each queued entry by its
    id and reads no other."""
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    await fund(engine, ledger, acc["a"].code, acc["b"].code, 1)
    async with engine.connect() as conn:
        await conn.execute(text("SET LOCAL enable_nestloop = off"))
        await conn.execute(text("SET LOCAL enable_hashjoin = off"))
        await conn.execute(text("SET LOCAL enable_seqscan = off"))  # a test database's journal fits a page
        plan = await driver.fetchrow(conn, "EXPLAIN (FORMAT JSON) " + _UNSEALED.replace("$1", "1000"))
        await conn.rollback()

    def entry_reads(node: dict[str, Any]) -> list[dict[str, Any]]:
        here = [node] if node.get("Relation Name") == "ledger_entry" else []
        return here + [read for child in node.get("Plans", []) for read in entry_reads(child)]

    document = plan[0] if isinstance(plan[0], list) else json.loads(plan[0])
    reads = entry_reads(document[0]["Plan"])
    assert reads, "the plan reads no entry"
    for read in reads:
        assert read["Node Type"] in {"Index Scan", "Index Only Scan"}, read["Node Type"]
        assert read["Index Name"] == "ledger_entry_pkey"
        condition = read.get("Index Cond", "").replace("(", "").replace(")", "").removeprefix("e.")
        assert condition == "id = ledger_unsealed.entry_id", condition


async def test_point_in_time_balances(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    await fund(engine, ledger, acc["a"].code, acc["b"].code, 10)
    async with engine.connect() as conn:
        middle = await conn.scalar(text("SELECT clock_timestamp()"))
    await asyncio.sleep(0.01)
    await fund(engine, ledger, acc["a"].code, acc["b"].code, 5)
    async with engine.connect() as conn:
        then = await ledger.balance(conn, acc["b"].code, as_of=middle)
        now = await ledger.balance(conn, acc["b"].code)
        before = await ledger.balances(conn, codes=[acc["b"].code], as_of=datetime(2000, 1, 1, tzinfo=UTC))
        trial = await ledger.trial_balance(conn)
        trial_then = await ledger.trial_balance(conn, as_of=middle)
    assert (then.credits_posted_fen, now.credits_posted_fen, before) == (10, 15, [])
    assert trial.total_debits_fen == trial.total_credits_fen
    assert trial_then.total_debits_fen == trial_then.total_credits_fen


async def test_a_write_joins_the_callers_transaction(engine: AsyncEngine, ledger: Ledger) -> None:
    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    keys = [unique("rolled-back-"), unique("committed-")]
    async with engine.connect() as conn:
        await ledger.transfer(conn, key=keys[0], postings=[debit(acc["a"].code, 3), credit(acc["b"].code, 3)])
        await conn.rollback()
    async with engine.connect() as conn:
        await ledger.transfer(conn, key=keys[1], postings=[debit(acc["a"].code, 4), credit(acc["b"].code, 4)])
        await conn.execute(text("SELECT 1"))
        await conn.commit()
    async with engine.connect() as conn:
        found = (
            (
                await conn.execute(
                    text("SELECT idempotency_key FROM ledger_entry WHERE idempotency_key = ANY(:k)"), {"k": keys}
                )
            )
            .scalars()
            .all()
        )
        assert found == [keys[1]]
        assert (await ledger.balance(conn, acc["b"].code)).credits_posted_fen == 4


async def test_a_single_statement_write_is_durable_on_its_own(engine: AsyncEngine, ledger: Ledger) -> None:
    from ledger.service import run_statement

    acc = await open_accounts(engine, ledger, {"a": None, "b": None})
    entry = await run_statement(
        engine,
        lambda c: ledger.transfer(c, key=unique("s-"), postings=[debit(acc["a"].code, 3), credit(acc["b"].code, 3)]),
    )
    async with engine.connect() as conn:
        assert (await ledger.entry(conn, entry.id)).postings[1].amount_fen == 3


async def test_an_account_whose_creation_rolled_back_is_not_remembered(engine: AsyncEngine, ledger: Ledger) -> None:
    code = f"{unique('t')}:rolled-back"
    other = Ledger()  # another process
    async with engine.connect() as conn:
        await ledger.open_account(conn, code)
        await conn.rollback()
    created = await run_in_transaction(engine, lambda c: other.open_account(c, code))
    again = await run_in_transaction(engine, lambda c: ledger.open_account(c, code))
    assert again.id == created.id
    peer = await run_in_transaction(engine, lambda c: ledger.open_account(c, f"{unique('t')}:peer"))
    entry = await run_in_transaction(
        engine, lambda c: ledger.transfer(c, key=unique("k-"), postings=[debit(code, 1), credit(peer.code, 1)])
    )
    assert entry.postings[0].account == code
