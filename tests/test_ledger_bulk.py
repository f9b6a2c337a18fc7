"""The ledger's bulk path (`Ledger.transfer_many`): a batch posts what the same transfers would one by one,
fails whole on what a single transfer is refused for, and replays by key as a single transfer does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.background import seal_all
from ledger.errors import AccountNotFound, IdempotencyConflict, InvalidEntry, LedgerError, LimitExceeded, Refusal
from ledger.postings import Posting, credit, debit
from ledger.service import Entry, Ledger, Transfer, run_in_transaction
from tests.ledger_support import open_accounts, unique

LIMITED = "debits_must_not_exceed_credits"


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


async def books(engine: AsyncEngine, ledger: Ledger) -> dict[str, str]:
    """Codes of five accounts under a fresh namespace, by name: a world, two limited sources, two sinks."""
    spec = {"world": None, "s1": LIMITED, "s2": LIMITED, "k1": None, "k2": None}
    return {name: account.code for name, account in (await open_accounts(engine, ledger, spec)).items()}


def batch(code: dict[str, str], prefix: str) -> list[Transfer]:
    """Funding, spending (one entry of four legs), a spend past a source's limit, and a spend that the
    funding just before it makes possible: a batch has to decide them in order."""
    return [
        Transfer(f"{prefix}0", [debit(code["world"], 1_000), credit(code["s1"], 1_000)], "fund", {"n": 1}),
        Transfer(f"{prefix}1", [debit(code["s1"], 300), credit(code["k1"], 300)]),
        Transfer(
            f"{prefix}2",
            [debit(code["s1"], 200), debit(code["world"], 50), credit(code["k1"], 120), credit(code["k2"], 130)],
            "four legs",
        ),
        Transfer(f"{prefix}3", [debit(code["s2"], 1), credit(code["k2"], 1)]),  # s2 holds nothing yet
        Transfer(f"{prefix}4", [debit(code["world"], 70), credit(code["s2"], 70)]),
        Transfer(f"{prefix}5", [debit(code["s2"], 70), credit(code["k2"], 70)]),
    ]


async def balances(engine: AsyncEngine, ledger: Ledger, code: dict[str, str]) -> dict[str, tuple[int, ...]]:
    async with engine.connect() as conn:
        found = {b.account.code: b for b in await ledger.balances(conn, codes=list(code.values()))}
    return {
        name: (b.debits_posted_fen, b.credits_posted_fen, b.debits_pending_fen, b.credits_pending_fen)
        for name, b in ((name, found[c]) for name, c in code.items())
    }


async def one_by_one(engine: AsyncEngine, ledger: Ledger, transfers: list[Transfer]) -> list[Entry | Refusal]:
    """Each transfer through `Ledger.transfer`, in a transaction of its own."""
    outcomes: list[Entry | Refusal] = []
    for t in transfers:

        async def work(conn: AsyncConnection, t: Transfer = t) -> Entry:
            return await ledger.transfer(conn, key=t.key, postings=t.postings, memo=t.memo, metadata=t.metadata)

        try:
            outcomes.append(await run_in_transaction(engine, work))
        except Refusal as refusal:
            outcomes.append(refusal)
    return outcomes


async def test_a_batch_posts_what_the_same_transfers_post_one_by_one(engine: AsyncEngine, ledger: Ledger) -> None:
    bulk, single = await books(engine, ledger), await books(engine, ledger)
    posted = await run_in_transaction(engine, lambda c: ledger.transfer_many(c, batch(bulk, unique("b-"))))
    alone = await one_by_one(engine, ledger, batch(single, unique("s-")))
    kinds = [Entry, Entry, Entry, LimitExceeded, Entry, Entry]
    assert [type(o) for o in posted] == [type(o) for o in alone] == kinds
    assert [str(o) for o in posted if isinstance(o, Refusal)] == [
        str(o).replace(single["s2"], bulk["s2"]) for o in alone if isinstance(o, Refusal)
    ]
    assert await balances(engine, ledger, bulk) == await balances(engine, ledger, single)
    await seal_all(engine, ledger)  # the sealer folds the sinks' postings into their cached totals
    assert await balances(engine, ledger, bulk) == await balances(engine, ledger, single)
    four_legs = posted[2]
    assert isinstance(four_legs, Entry)
    async with engine.connect() as conn:
        mismatched = set(await ledger.verify_cached_balances(conn))
        recorded = await ledger.entry(conn, four_legs.id)
    assert not mismatched & {*bulk.values(), *single.values()}
    assert (recorded.memo, recorded.postings, recorded.created_at) == (
        "four legs",
        four_legs.postings,
        four_legs.created_at,
    )
    assert recorded.chain_seq is not None


@pytest.mark.parametrize(
    ("spoiler", "error"),
    [
        (lambda code: [debit(code["world"], 5), credit(code["k1"], 4)], InvalidEntry),
        (lambda code: [debit(code["world"], 5), credit("no:such:account", 5)], AccountNotFound),
        (lambda code: [debit(code["world"], 5), credit(code["k1"], 5, "pending")], InvalidEntry),
    ],
    ids=["unbalanced", "unknown account", "not posted"],
)
async def test_a_transfer_refused_as_malformed_fails_the_whole_batch_with_the_single_paths_error(
    engine: AsyncEngine,
    ledger: Ledger,
    spoiler: Callable[[dict[str, str]], list[Posting]],
    error: type[LedgerError],
) -> None:
    code = await books(engine, ledger)
    bad = Transfer(unique("bad-"), spoiler(code))
    transfers = [*batch(code, unique("b-"))[:2], bad, *batch(code, unique("c-"))[:2]]
    with pytest.raises(error) as in_batch:
        await run_in_transaction(engine, lambda c: ledger.transfer_many(c, transfers))
    with pytest.raises(error) as alone:
        await one_by_one(engine, ledger, [bad])
    assert in_batch.value.detail == alone.value.detail
    assert await balances(engine, ledger, code) == {name: (0, 0, 0, 0) for name in code}


async def test_a_replayed_batch_answers_its_entries_and_moves_nothing(engine: AsyncEngine, ledger: Ledger) -> None:
    code = await books(engine, ledger)
    prefix = unique("b-")
    first = await run_in_transaction(engine, lambda c: ledger.transfer_many(c, batch(code, prefix)))
    after = await balances(engine, ledger, code)
    again = await run_in_transaction(engine, lambda c: ledger.transfer_many(c, batch(code, prefix)))
    assert [type(o) for o in again] == [type(o) for o in first]
    for was, now in zip(first, again, strict=True):
        if isinstance(was, Entry):
            assert isinstance(now, Entry) and now.replayed and not was.replayed
            assert (now.id, now.postings, now.memo, now.metadata) == (was.id, was.postings, was.memo, was.metadata)
        else:
            assert str(now) == str(was)  # the refusal recorded under its key, answered again
    assert await balances(engine, ledger, code) == after
    # the single path answers a key the bulk path recorded, and the same key twice in a batch is one entry
    funding = batch(code, prefix)[0]
    single = await run_in_transaction(
        engine,
        lambda c: ledger.transfer(c, key=funding.key, postings=funding.postings, memo="fund", metadata={"n": 1}),
    )
    assert single.replayed and isinstance(first[0], Entry) and single.id == first[0].id
    twice = [Transfer(unique("t-"), [debit(code["world"], 9), credit(code["k2"], 9)])] * 2
    one, other = await run_in_transaction(engine, lambda c: ledger.transfer_many(c, twice))
    assert isinstance(one, Entry) and isinstance(other, Entry) and other.replayed and one.id == other.id
    assert (await balances(engine, ledger, code))["k2"][1] == after["k2"][1] + 9
    # a key used before for another request is a conflict, and the batch fails whole
    changed = [Transfer(unique("n-"), [debit(code["world"], 1), credit(code["k1"], 1)]), funding._replace(memo="x")]
    with pytest.raises(IdempotencyConflict):
        await run_in_transaction(engine, lambda c: ledger.transfer_many(c, changed))
    assert (await balances(engine, ledger, code))["k1"] == after["k1"]


async def test_an_empty_batch_sends_nothing(engine: AsyncEngine, ledger: Ledger) -> None:
    async with engine.connect() as conn:
        assert await ledger.transfer_many(conn, []) == []
        assert not conn.in_transaction()
