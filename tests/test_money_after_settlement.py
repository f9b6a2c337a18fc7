"""Money after settlement (API.md): once a provider or a beneficiary has been paid, no refund or clawback
gives the voucher or the budget that value back until the money is recovered, so no fen is paid twice.

The invariant, for every voucher: what was settled to providers for it, minus what was recovered, never
exceeds its face value. The focused tests replay the attacks found (a refund after settlement, a clawback
after settlement, the reversal of a settled payout); the state machine interleaves redemptions, holds,
captures, voids, refunds, clawbacks and settlements at random through the real app and checks the
invariant, and the exact whereabouts of every fen, after every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR
from tests.test_redemptions import compute_lines, compute_voucher, token_for
from tests.test_settlements import FILING, make_payable, sealed_and_sound
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers import redemption, settlements
from vouchers.recovery import CLAWBACK_ACCOUNT, receivable_account
from vouchers.rules import SHANGHAI
from vouchers.settlements import payable_account

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


_keys = itertools.count()


def keyed(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Idempotency-Key": f"mas-{uuid.uuid4().hex}-{next(_keys)}"}


async def provider(engine: AsyncEngine) -> tuple[str, dict[str, str]]:
    """A fresh provider entity and its key's headers."""
    entity = await create_entity(engine, kind="provider")
    return entity, bearer(await create_key(engine, Role.PROVIDER, entity_id=entity))


async def redeem(client: httpx.AsyncClient, key: dict[str, str], token: str, yuan: int) -> dict[str, Any]:
    response = await client.post(
        "/v1/redemptions",
        headers=keyed(key),
        json={"token": token, "invoice_no": f"I-{uuid.uuid4().hex[:12]}", "lines": compute_lines(yuan)},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def settle(client: httpx.AsyncClient, admin: dict[str, str], *entities: str) -> dict[str, Any]:
    response = await client.post("/v1/settlements", json={"entity_ids": list(entities)}, headers=keyed(admin))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def voucher_state(client: httpx.AsyncClient, admin: dict[str, str], voucher: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()
    return body


async def owes_fen(engine: AsyncEngine, entity: str) -> int:
    async with engine.connect() as conn:
        found = await Ledger().balances(conn, codes=[receivable_account(entity)])
    return found[0].available_fen if found else 0


async def settled_less_recovered(engine: AsyncEngine, voucher: str) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT (SELECT coalesce(sum(settled_fen), 0) FROM redemption WHERE voucher_id = :v) "
                    "- (SELECT coalesce(sum(recovered_fen), 0) FROM recovery WHERE voucher_id = :v)"
                ),
                {"v": voucher},
            )
            or 0
        )


async def assert_reconciled(client: httpx.AsyncClient, admin: dict[str, str], program: str) -> None:
    """The program report's committed money is all somewhere (vouchers/reports.py)."""
    report = (await client.get(f"/v1/reports/programs/{program}/{YEAR}", headers=admin)).json()
    parts = ("paid_out_fen", "redeemed_fen", "held_fen", "unspent_fen", "returning_fen", "in_notice_fen")
    assert report["committed_fen"] == sum(report[part] for part in parts), report


async def test_a_refund_after_settlement_is_refused_and_the_voucher_pays_out_its_face_once(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """The attack: S redeems and is settled, then refunds, making the voucher whole again for P to spend."""
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    (s, s_key), (p, p_key) = await provider(engine), await provider(engine)
    token = await token_for(client, admin, voucher)
    first = await redeem(client, s_key, token, 400_000)
    assert (await settle(client, admin, s))["total_fen"] == 400_000 * YUAN

    refused = assert_problem(
        await client.post(
            f"/v1/redemptions/{first['id']}/refund", headers=keyed(s_key), json={"reason": "not delivered"}
        ),
        409,
        "redemption_settled",
    )
    assert "settle" in refused["detail"]
    assert (await voucher_state(client, admin, voucher))["available_fen"] == 200_000 * YUAN

    second = await redeem(client, p_key, token, 600_000)
    assert second["subsidy_fen"] == 200_000 * YUAN
    assert (await settle(client, admin, p))["total_fen"] == 200_000 * YUAN
    assert await settled_less_recovered(engine, voucher) == 600_000 * YUAN
    # an unsettled redemption is still refunded as before
    fresh, _fresh_holder = await compute_voucher(client, admin, engine, 600_000)
    third = await redeem(client, s_key, await token_for(client, admin, fresh), 1)
    refunded = await client.post(
        f"/v1/redemptions/{third['id']}/refund", headers=keyed(s_key), json={"reason": "not delivered"}
    )
    assert refunded.status_code == 200, refunded.text


async def settled_then_clawed_back(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, yuan: int
) -> tuple[str, str, str, dict[str, str], dict[str, Any]]:
    """A 600,000 元 voucher whose redemption of `yuan` at a fresh provider was settled, then clawed back, and
    a second voucher the provider can earn on: (voucher, other voucher, provider, its key, the reversal)."""
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    other, _other_holder = await compute_voucher(client, admin, engine, 600_000)
    s, s_key = await provider(engine)
    clawed = await redeem(client, s_key, await token_for(client, admin, voucher), yuan)
    await settle(client, admin, s)
    reversed_ = await client.post(
        f"/v1/redemptions/{clawed['id']}/reverse",
        headers=admin,
        json={"reason": "invoice forged", "grounds": "administrative"},
    )
    assert reversed_.status_code == 200, reversed_.text
    body: dict[str, Any] = reversed_.json()
    return voucher, other, s, s_key, body


async def test_a_clawback_after_settlement_is_owed_back_and_restores_the_voucher_as_it_is_recovered(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, other, s, s_key, clawed = await settled_then_clawed_back(client, admin, engine, 500_000)
    assert clawed["reversed_at"] is not None
    state = await voucher_state(client, admin, voucher)
    # the provider has the money: the voucher regains nothing yet, the provider owes it all
    assert (state["available_fen"], state["redeemed_fen"]) == (100_000 * YUAN, 500_000 * YUAN)
    assert await owes_fen(engine, s) == 500_000 * YUAN
    this_year = datetime.now(SHANGHAI).year
    statement = (await client.get(f"/v1/entities/{s}/statement", params={"year": this_year}, headers=admin)).json()
    owed = [a for a in statement["accounts"] if a["account"] == receivable_account(s)]
    assert [a["closing_balance_fen"] for a in owed] == [-500_000 * YUAN], statement["accounts"]
    assert_problem(
        await client.post(
            f"/v1/redemptions/{clawed['id']}/reverse",
            headers=keyed(admin),
            json={"reason": "again", "grounds": "administrative"},
        ),
        409,
        "conflict",
    )

    # S earns 300,000 on another voucher: all of it is kept back, and the clawed-back voucher regains it
    other_token = await token_for(client, admin, other)
    await redeem(client, s_key, other_token, 300_000)
    netted = await settle(client, admin, s)
    assert (netted["total_fen"], netted["recovered_fen"]) == (0, 300_000 * YUAN)
    assert netted["items"] == [
        {"entity_id": s, "account": payable_account(s), "amount_fen": 0, "recovered_fen": 300_000 * YUAN}
    ]
    assert (await voucher_state(client, admin, voucher))["available_fen"] == 400_000 * YUAN
    assert await owes_fen(engine, s) == 200_000 * YUAN

    # the next 250,000: 200,000 recovered (the debt is paid), 50,000 paid out
    await redeem(client, s_key, other_token, 250_000)
    last = await settle(client, admin, s)
    assert (last["total_fen"], last["recovered_fen"]) == (50_000 * YUAN, 200_000 * YUAN)
    state = await voucher_state(client, admin, voucher)
    assert (state["available_fen"], state["redeemed_fen"]) == (600_000 * YUAN, 0)
    assert await owes_fen(engine, s) == 0
    assert await settled_less_recovered(engine, voucher) == 0
    await sealed_and_sound(engine)


async def test_value_recovered_for_an_ended_voucher_returns_to_its_budget(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, other, s, s_key, _clawed = await settled_then_clawed_back(client, admin, engine, 100_000)
    revoked = await client.post(
        f"/v1/vouchers/{voucher}/revoke", headers=admin, json={"reason": "misuse", "grounds": "administrative"}
    )
    assert revoked.status_code == 200, revoked.text
    budget_path = f"/v1/programs/compute.purchase/budgets/{YEAR}"
    before = (await client.get(budget_path, headers=admin)).json()["available_fen"]

    await redeem(client, s_key, await token_for(client, admin, other), 100_000)
    assert (await settle(client, admin, s))["recovered_fen"] == 100_000 * YUAN
    assert (await client.get(budget_path, headers=admin)).json()["available_fen"] == before + 100_000 * YUAN
    state = await voucher_state(client, admin, voucher)
    assert (state["status"], state["available_fen"], state["redeemed_fen"]) == ("revoked", 0, 0)
    assert state["released_fen"] == 600_000 * YUAN


async def test_reversing_a_settled_payout_books_a_receivable_netted_from_the_next_award(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    beneficiary = await create_entity(engine)
    first = await make_payable(client, admin, beneficiary, 100 * YUAN)
    await settle(client, admin, beneficiary)
    budget_path = f"/v1/programs/{FILING}/budgets/{YEAR}"
    before = (await client.get(budget_path, headers=admin)).json()

    reversed_ = await client.post(
        f"/v1/applications/{first}/reverse",
        headers=keyed(admin),
        json={"reason": "filing was not the first", "grounds": "administrative"},
    )
    assert reversed_.status_code == 200, reversed_.text
    assert reversed_.json()["returned_fen"] == 0
    # paid out already: the budget regains nothing until the money comes back
    assert (await client.get(budget_path, headers=admin)).json() == before
    assert await owes_fen(engine, beneficiary) == 100 * YUAN
    await assert_reconciled(client, admin, FILING)

    await make_payable(client, admin, beneficiary, 30 * YUAN)
    awarded = (await client.get(budget_path, headers=admin)).json()
    netted = await settle(client, admin, beneficiary)
    assert (netted["total_fen"], netted["recovered_fen"]) == (0, 30 * YUAN)
    after = (await client.get(budget_path, headers=admin)).json()
    assert after["available_fen"] == awarded["available_fen"] + 30 * YUAN  # what was recovered, and no more
    assert await owes_fen(engine, beneficiary) == 70 * YUAN
    await assert_reconciled(client, admin, FILING)


async def test_refunds_racing_a_settlement_never_pay_a_fen_twice(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """Each redemption is either refunded before the settlement reads it, or settled and its refund refused."""
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    s, s_key = await provider(engine)
    token = await token_for(client, admin, voucher)
    redemptions = [await redeem(client, s_key, token, 10_000) for _ in range(12)]

    async def refund(redemption: dict[str, Any]) -> int:
        response = await client.post(
            f"/v1/redemptions/{redemption['id']}/refund", headers=keyed(s_key), json={"reason": "not delivered"}
        )
        assert response.status_code in (200, 409), response.text
        return response.status_code

    half = len(redemptions) // 2
    outcomes = await asyncio.gather(
        *(refund(r) for r in redemptions[:half]),
        client.post("/v1/settlements", json={"entity_ids": [s]}, headers=keyed(admin)),
        *(refund(r) for r in redemptions[half:]),
    )
    settlement = outcomes[half]
    assert isinstance(settlement, httpx.Response)
    refunded = sum(1 for o in outcomes if o == 200)
    settled_total = settlement.json()["total_fen"] if settlement.status_code == 201 else 0
    assert settlement.status_code == 201 or (settlement.json()["code"], refunded) == ("nothing_to_settle", 12)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT settlement_id, settled_fen, refunded_fen FROM redemption WHERE voucher_id = :v"),
                {"v": voucher},
            )
        ).all()
    assert all((row.settlement_id is None) != (row.refunded_fen == 0) for row in rows), rows
    assert sum(1 for row in rows if row.settlement_id is None) == refunded
    assert settled_total == sum(row.settled_fen for row in rows) == (12 - refunded) * 10_000 * YUAN
    state = await voucher_state(client, admin, voucher)
    assert state["available_fen"] == 600_000 * YUAN - settled_total


async def test_a_refund_waits_for_a_settlement_holding_its_redemption_and_is_then_refused(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    s, s_key = await provider(engine)
    redeemed = await redeem(client, s_key, await token_for(client, admin, voucher), 10_000)
    async with engine.connect() as settling:
        await settlements.settle(settling, Ledger(), entity_ids=[s], items_max=1, actor=None, now=datetime.now(UTC))
        refund = asyncio.create_task(
            client.post(f"/v1/redemptions/{redeemed['id']}/refund", headers=keyed(s_key), json={"reason": "late"})
        )
        await asyncio.sleep(0.5)
        assert not refund.done()  # queued on the redemption's row lock
        await settling.commit()
    assert_problem(await refund, 409, "redemption_settled")
    assert (await voucher_state(client, admin, voucher))["available_fen"] == 590_000 * YUAN


async def test_a_settlement_waits_for_a_refund_in_flight_and_leaves_it_out(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    s, s_key = await provider(engine)
    token = await token_for(client, admin, voucher)
    refunded, kept = await redeem(client, s_key, token, 10_000), await redeem(client, s_key, token, 20_000)
    async with engine.connect() as refunding:
        await redemption.refund(
            refunding,
            Ledger(),
            redemption_id=refunded["id"],
            provider_entity_id=s,
            amount_fen=None,
            reason="not delivered",
            now=datetime.now(UTC),
        )
        settling = asyncio.create_task(client.post("/v1/settlements", json={"entity_ids": [s]}, headers=keyed(admin)))
        await asyncio.sleep(0.5)
        assert not settling.done()  # queued on the refunded redemption's row lock
        await refunding.commit()
    settled = await settling
    assert settled.status_code == 201, settled.text
    assert settled.json()["total_fen"] == 20_000 * YUAN
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, settlement_id FROM redemption WHERE voucher_id = :v"), {"v": voucher}
        )
        marks = {row.id: row.settlement_id for row in rows}
    assert marks[refunded["id"]] is None and marks[kept["id"]] == settled.json()["id"]


# -- the state machine -----------------------------------------------------------------------------------

VOUCHERS = 2
PROVIDERS = 2
FACE_YUAN = 600_000
amounts_yuan = st.integers(min_value=1, max_value=350_000)


class SettlementMachine(RuleBasedStateMachine):
    """Random money movements around two vouchers and two providers; after every step, the invariant."""

    db_url: str = ""
    redemptions = Bundle("redemptions")
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.stack = contextlib.AsyncExitStack()
        settings_ = Settings(database_url=self.db_url, background_tasks=False, api_key_cache_ttl_s=0, db_pool_size=4)
        self.engine: AsyncEngine = make_engine(self.db_url, settings_)
        self.client: httpx.AsyncClient = self.run(self.stack.enter_async_context(running_app(settings_)))
        self.vouchers: list[str] = []
        self.tokens: list[str] = []
        self.providers: list[str] = []
        self.keys: list[dict[str, str]] = []

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def teardown(self) -> None:
        self.run(self.stack.aclose())
        self.run(self.engine.dispose())
        self.runner.close()

    @initialize()
    def world(self) -> None:
        async def build() -> None:
            self.admin = bearer(await create_key(self.engine, Role.ADMIN))
            for _ in range(VOUCHERS):
                voucher, _holder = await compute_voucher(self.client, self.admin, self.engine, FACE_YUAN)
                self.vouchers.append(voucher)
                self.tokens.append(await token_for(self.client, self.admin, voucher))
            for _ in range(PROVIDERS):
                entity, key = await provider(self.engine)
                self.providers.append(entity)
                self.keys.append(key)

        self.run(build())

    def post(self, path: str, headers: dict[str, str], body: Any) -> httpx.Response:
        response: httpx.Response = self.run(self.client.post(path, headers=keyed(headers), json=body))
        assert response.status_code < 500, response.text
        return response

    @rule(target=redemptions, v=st.integers(0, VOUCHERS - 1), p=st.integers(0, PROVIDERS - 1), yuan=amounts_yuan)
    def redeem(self, v: int, p: int, yuan: int) -> Any:
        body = {"token": self.tokens[v], "invoice_no": f"I-{uuid.uuid4().hex[:12]}", "lines": compute_lines(yuan)}
        response = self.post("/v1/redemptions", self.keys[p], body)
        if response.status_code != 201:
            assert response.json()["code"] == "voucher_exhausted", response.text
            return None
        return (response.json()["id"], p)

    @rule(target=holds, v=st.integers(0, VOUCHERS - 1), p=st.integers(0, PROVIDERS - 1), yuan=amounts_yuan)
    def hold(self, v: int, p: int, yuan: int) -> Any:
        response = self.post("/v1/holds", self.keys[p], {"token": self.tokens[v], "amount_fen": yuan * YUAN})
        if response.status_code != 201:
            assert response.json()["code"] == "voucher_exhausted", response.text
            return None
        return (response.json()["id"], p)

    @rule(target=redemptions, hold=holds, yuan=amounts_yuan)
    def capture(self, hold: Any, yuan: int) -> Any:
        if hold is None:
            return None
        hold_id, p = hold
        body = {"invoice_no": f"H-{uuid.uuid4().hex[:12]}", "lines": compute_lines(yuan)}
        response = self.post(f"/v1/holds/{hold_id}/capture", self.keys[p], body)
        if response.status_code != 201:
            assert response.status_code == 409, response.text  # captured or voided already
            return None
        return (response.json()["id"], p)

    @rule(hold=holds)
    def void(self, hold: Any) -> None:
        if hold is not None:
            hold_id, p = hold
            assert self.post(f"/v1/holds/{hold_id}/void", self.keys[p], None).status_code in (200, 409)

    @rule(redemption=redemptions, part=st.one_of(st.none(), st.integers(min_value=1, max_value=350_000)))
    def refund(self, redemption: Any, part: int | None) -> None:
        if redemption is None:
            return
        redemption_id, p = redemption
        body: dict[str, Any] = {"reason": "not delivered"}
        if part is not None:
            body["amount_fen"] = part * YUAN
        response = self.post(f"/v1/redemptions/{redemption_id}/refund", self.keys[p], body)
        assert response.status_code in (200, 409), response.text

    @rule(redemption=redemptions)
    def claw_back(self, redemption: Any) -> None:
        if redemption is not None:
            response = self.post(
                f"/v1/redemptions/{redemption[0]}/reverse",
                self.admin,
                {"reason": "clawback", "grounds": "administrative"},
            )
            assert response.status_code in (200, 409), response.text

    @rule(some=st.lists(st.integers(0, PROVIDERS - 1), min_size=1, max_size=PROVIDERS, unique=True))
    def settle(self, some: list[int]) -> None:
        response = self.post("/v1/settlements", self.admin, {"entity_ids": [self.providers[p] for p in some]})
        assert response.status_code == 201 or response.json()["code"] == "nothing_to_settle", response.text

    @invariant()
    def no_fen_is_paid_twice(self) -> None:
        if not self.vouchers:
            return
        self.run(self.check())

    async def check(self) -> None:
        ledger = Ledger()
        async with self.engine.connect() as conn:
            for voucher in self.vouchers:
                row = (
                    await conn.execute(
                        text(
                            "SELECT coalesce(sum(settled_fen), 0) AS settled, "
                            "coalesce(sum(subsidy_fen - refunded_fen), 0) AS spent, "
                            "(SELECT coalesce(sum(recovered_fen), 0) FROM recovery WHERE voucher_id = :v) AS recovered "
                            "FROM redemption WHERE voucher_id = :v"
                        ),
                        {"v": voucher},
                    )
                ).one()
                assert row.settled - row.recovered <= FACE_YUAN * YUAN, (voucher, row)
                balance = await ledger.balance(conn, f"voucher:{voucher}")
                # every fen the voucher is short of its face is at a provider, payable or paid, less what came back
                short_fen = FACE_YUAN * YUAN - balance.available_fen - balance.debits_pending_fen
                assert short_fen == row.spent - row.recovered, (voucher, short_fen, row)
            for provider in self.providers:
                payable = await ledger.balances(conn, codes=[payable_account(provider)])
                unsettled = await conn.scalar(
                    text(
                        "SELECT coalesce(sum(subsidy_fen - refunded_fen), 0) FROM redemption "
                        "WHERE provider_entity_id = :p AND settlement_id IS NULL"
                    ),
                    {"p": provider},
                )
                held = payable[0].credits_posted_fen - payable[0].debits_posted_fen if payable else 0
                assert held == unsettled, (provider, held, unsettled)  # payable never below what it owes, never above
                owed = await conn.scalar(
                    text(
                        "SELECT coalesce(sum(amount_fen - recovered_fen), 0) FROM recovery WHERE debtor_entity_id = :p"
                    ),
                    {"p": provider},
                )
                receivable = await ledger.balances(conn, codes=[receivable_account(provider)])
                assert (receivable[0].net_debit_fen if receivable else 0) == owed
                paid = await conn.scalar(
                    text(
                        "SELECT coalesce(sum(amount_fen + recovered_fen), 0) FROM settlement_item WHERE entity_id = :p"
                    ),
                    {"p": provider},
                )
                settled = await conn.scalar(
                    text("SELECT coalesce(sum(settled_fen), 0) FROM redemption WHERE provider_entity_id = :p"),
                    {"p": provider},
                )
                assert paid == settled, (provider, paid, settled)
            clawback = await ledger.balances(conn, codes=[CLAWBACK_ACCOUNT])
            outstanding = await conn.scalar(text("SELECT coalesce(sum(amount_fen - recovered_fen), 0) FROM recovery"))
            assert (clawback[0].credits_posted_fen - clawback[0].debits_posted_fen if clawback else 0) == outstanding


@pytest.mark.slow
def test_settlement_never_pays_a_voucher_beyond_its_face(db_url: str) -> None:
    SettlementMachine.db_url = db_url
    run_state_machine_as_test(
        SettlementMachine,
        settings=settings(
            max_examples=5,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


async def test_migration_0014_marks_what_earlier_settlements_paid(fresh_db_url: str) -> None:
    """Rows written before 0014 are taken as settled by the first settlement of their payee made after
    them: a refund of one is refused, a redemption made since stays payable."""
    settings_ = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings_)
    try:
        admin = bearer(await create_key(engine, Role.ADMIN))
        s, s_key = await provider(engine)
        async with running_app(settings_) as client:
            voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
            token = await token_for(client, admin, voucher)
            paid = await redeem(client, s_key, token, 100_000)
            settled = await settle(client, admin, s)
            payable = await redeem(client, s_key, token, 50_000)
        await engine.dispose()
        await asyncio.to_thread(migrate.downgrade, fresh_db_url, "0013")
        await asyncio.to_thread(migrate.upgrade, fresh_db_url)
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT id, settlement_id, settled_fen FROM redemption"))
            marks = {row.id: (row.settlement_id, row.settled_fen) for row in rows}
        assert marks == {paid["id"]: (settled["id"], 100_000 * YUAN), payable["id"]: (None, 0)}
        async with running_app(settings_) as client:
            assert_problem(
                await client.post(
                    f"/v1/redemptions/{paid['id']}/refund", headers=keyed(s_key), json={"reason": "not delivered"}
                ),
                409,
                "redemption_settled",
            )
            assert (await settle(client, admin, s))["total_fen"] == 50_000 * YUAN
    finally:
        await engine.dispose()
