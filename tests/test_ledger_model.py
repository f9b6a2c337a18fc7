"""A stateful property test: random transfers, holds, posts, voids, reversals and replays against a plain
Python model. After every step the books sum to zero, no limited account crosses its limit, the cached
balances equal the entries, and the hash chain verifies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_engine
from app.settings import Settings
from ledger.errors import LimitExceeded, PendingResolved
from ledger.postings import credit, debit
from ledger.service import Ledger, Limit, run_in_transaction
from tests.ledger_support import unique

ACCOUNTS: dict[str, Limit | None] = {
    "world": None,
    "budget": "debits_must_not_exceed_credits",
    "voucher": "debits_must_not_exceed_credits",
    "liability": "credits_must_not_exceed_debits",
    "payable": None,
}
amounts = st.integers(min_value=1, max_value=5_000)
names = st.sampled_from(sorted(ACCOUNTS))


@dataclass
class Totals:
    dp: int = 0
    cp: int = 0
    dq: int = 0
    cq: int = 0

    def apply(self, direction: str, phase: str, amount: int) -> None:
        sign = -1 if phase == "release" else 1
        if direction == "debit":
            if phase == "posted":
                self.dp += amount
            else:
                self.dq += sign * amount
        elif phase == "posted":
            self.cp += amount
        else:
            self.cq += sign * amount


@dataclass
class Model:
    totals: dict[str, Totals] = field(default_factory=lambda: {name: Totals() for name in ACCOUNTS})

    def admits(self, moves: list[tuple[str, str, str, int]]) -> bool:
        trial = {name: Totals(t.dp, t.cp, t.dq, t.cq) for name, t in self.totals.items()}
        for name, direction, phase, amount in moves:
            trial[name].apply(direction, phase, amount)
        for name, limit in ACCOUNTS.items():
            t = trial[name]
            if limit == "debits_must_not_exceed_credits" and t.dp + t.dq > t.cp:
                return False
            if limit == "credits_must_not_exceed_debits" and t.cp + t.cq > t.dp:
                return False
        return True

    def apply(self, moves: list[tuple[str, str, str, int]]) -> None:
        for name, direction, phase, amount in moves:
            self.totals[name].apply(direction, phase, amount)


class LedgerMachine(RuleBasedStateMachine):
    db_url: str = ""
    holds = Bundle("holds")
    transfers = Bundle("transfers")

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.engine: AsyncEngine = make_engine(self.db_url, Settings(database_url=self.db_url, db_pool_size=2))
        self.ledger = Ledger()
        self.model = Model()
        self.space = unique("m")
        self.replays: list[tuple[str, Any, Any]] = []
        self.verified_seq = 1

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def code(self, name: str) -> str:
        return f"{self.space}:{name}"

    def teardown(self) -> None:
        self.run(self.engine.dispose())
        self.runner.close()

    @initialize()
    def open_accounts(self) -> None:
        async def work(conn: Any) -> None:
            for name, limit in ACCOUNTS.items():
                await self.ledger.open_account(conn, self.code(name), limit=limit)

        self.run(run_in_transaction(self.engine, work))

    def attempt(self, call: Any, moves: list[tuple[str, str, str, int]]) -> Any:
        """Run a ledger write; check it succeeded exactly when the model admits it."""
        expected = self.model.admits(moves)
        try:
            result = self.run(run_in_transaction(self.engine, call))
        except LimitExceeded:
            assert not expected, f"refused, but the model admits {moves}"
            return None
        assert expected, f"accepted, but the model refuses {moves}"
        self.model.apply(moves)
        return result

    @rule(target=transfers, source=names, target_name=names, amount=amounts)
    def transfer(self, source: str, target_name: str, amount: int) -> Any:
        if source == target_name:
            return None
        key = unique("t-")
        postings = [debit(self.code(source), amount), credit(self.code(target_name), amount)]
        entry = self.attempt(
            lambda c: self.ledger.transfer(c, key=key, postings=postings),
            [(source, "debit", "posted", amount), (target_name, "credit", "posted", amount)],
        )
        if entry is not None:
            self.replays.append((key, postings, entry.id))
            return (entry.id, source, target_name, amount)
        return None

    @rule(amount=amounts, target_name=st.sampled_from(["budget", "voucher"]))
    def fund(self, amount: int, target_name: str) -> None:
        self.transfer(source="world", target_name=target_name, amount=amount)

    @rule(target=holds, source=names, target_name=names, amount=amounts)
    def hold(self, source: str, target_name: str, amount: int) -> Any:
        if source == target_name:
            return None
        postings = [debit(self.code(source), amount), credit(self.code(target_name), amount)]
        entry = self.attempt(
            lambda c: self.ledger.hold(c, key=unique("h-"), postings=postings, timeout_s=3600),
            [(source, "debit", "pending", amount), (target_name, "credit", "pending", amount)],
        )
        return None if entry is None else (entry.id, source, target_name, amount)

    @rule(hold=consumes(holds), part=st.integers(min_value=1, max_value=100))
    def post(self, hold: Any, part: int) -> None:
        if hold is None:
            return
        hold_id, source, target_name, amount = hold
        posted = max(1, amount * part // 100)
        moves = [
            (source, "debit", "release", amount),
            (target_name, "credit", "release", amount),
            (source, "debit", "posted", posted),
            (target_name, "credit", "posted", posted),
        ]
        self.attempt(
            lambda c: self.ledger.post_pending(c, key=unique("p-"), pending_entry_id=hold_id, amount_fen=posted), moves
        )
        with pytest.raises(PendingResolved):
            self.run(
                run_in_transaction(
                    self.engine, lambda c: self.ledger.void_pending(c, key=unique("v-"), pending_entry_id=hold_id)
                )
            )

    @rule(hold=consumes(holds))
    def void(self, hold: Any) -> None:
        if hold is None:
            return
        hold_id, source, target_name, amount = hold
        self.attempt(
            lambda c: self.ledger.void_pending(c, key=unique("v-"), pending_entry_id=hold_id),
            [(source, "debit", "release", amount), (target_name, "credit", "release", amount)],
        )

    @rule(original=consumes(transfers))
    def reverse(self, original: Any) -> None:
        if original is None:
            return
        entry_id, source, target_name, amount = original
        self.attempt(
            lambda c: self.ledger.reverse(c, key=unique("r-"), entry_id=entry_id),
            [(source, "credit", "posted", amount), (target_name, "debit", "posted", amount)],
        )

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if not self.replays:
            return
        key, postings, entry_id = data.draw(st.sampled_from(self.replays))
        again = self.run(run_in_transaction(self.engine, lambda c: self.ledger.transfer(c, key=key, postings=postings)))
        assert again.id == entry_id and again.replayed

    @rule()
    def seal(self) -> None:
        while self.run(run_in_transaction(self.engine, self.ledger.seal)):
            pass

    @invariant()
    def books_hold(self) -> None:
        async def check() -> None:
            async with self.engine.connect() as conn:
                mine = {b.account.code: b for b in await self.ledger.balances(conn, prefix=self.space)}
                if len(mine) == len(ACCOUNTS):
                    for name, expected in self.model.totals.items():
                        got = mine[self.code(name)]
                        assert (
                            got.debits_posted_fen,
                            got.credits_posted_fen,
                            got.debits_pending_fen,
                            got.credits_pending_fen,
                        ) == (expected.dp, expected.cp, expected.dq, expected.cq), name
                sums = (
                    await conn.execute(
                        text(
                            "SELECT sum(CASE WHEN direction = 'debit' THEN amount ELSE -amount END) AS net, phase "
                            "FROM ledger_posting GROUP BY phase"
                        )
                    )
                ).all()
                assert all(row.net == 0 for row in sums), sums
                crossed = await conn.scalar(
                    text(
                        "SELECT count(*) FROM ledger_account WHERE "
                        "(debits_must_not_exceed_credits AND debits_posted + debits_pending > credits_posted) OR "
                        "(credits_must_not_exceed_debits AND credits_posted + credits_pending > debits_posted)"
                    )
                )
                assert crossed == 0
                assert await self.ledger.verify_cached_balances(conn) == []
                report = await self.ledger.verify_chain(conn, from_seq=self.verified_seq)
                assert report.ok, report.problem
                self.verified_seq += report.entries

        self.run(check())


@pytest.mark.slow
def test_ledger_matches_the_model(db_url: str) -> None:
    LedgerMachine.db_url = db_url
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=12,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
