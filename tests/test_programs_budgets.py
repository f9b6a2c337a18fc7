"""`/v1/programs` and program-year budgets on the ledger (art. 27), through the real app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from ledger.postings import credit, debit
from ledger.service import Ledger, run_in_transaction
from tests.ledger_support import unique
from tests.test_support import assert_problem, bearer, create_key, running_app
from vouchers.budgets import appropriation_account, budget_account

YUAN = 100


async def test_programs_are_served_from_the_published_definitions(settings: Settings, engine: AsyncEngine) -> None:
    key = bearer(await create_key(engine, Role.PROVIDER))
    async with running_app(settings) as client:
        assert_problem(await client.get("/v1/programs"), 401, "unauthorized")
        body = (await client.get("/v1/programs", params={"year": 2027}, headers=key)).json()
        by_code = {p["code"]: p for p in body["data"]}
        assert body["year"] == 2027
        assert sorted(by_code) == sorted(
            [
                "compute.purchase",
                "data.trusted_space",
                "data.dataset_benchmark",
                "data.pilot_dataset",
                "scenario.benchmark",
                "model.first_filing",
                "model.first_purchase",
                "model.industry_rollout",
            ]
        )
        compute = by_code["compute.purchase"]
        assert (
            compute["article"],
            compute["voucher_type"],
            compute["mode"],
            compute["rate_bp"],
            compute["cap_fen"],
        ) == ("8", "compute", "voucher", 5000, 3_000_000 * YUAN)
        assert compute["threshold_fen"] == 1_000_000 * YUAN
        assert compute["raised_caps"][0]["cap_fen"] == 10_000_000 * YUAN
        assert by_code["scenario.benchmark"]["awards_per_year_max"] == 10
        assert by_code["model.first_purchase"]["uplift"] == {
            "flag": "rd_project",
            "rate_bp": 4500,
            "cap_fen": 1_500_000 * YUAN,
        }
        assert by_code["data.dataset_benchmark"]["rate_bp"] is None
        assert (await client.get("/v1/programs", params={"year": 2020}, headers=key)).json()["data"] == []
        assert_problem(await client.get("/v1/programs", params={"year": "soon"}, headers=key), 422, "validation_error")
    async with engine.connect() as conn:
        with pytest.raises(Exception, match="never changes"):
            await conn.execute(text("UPDATE program_definition SET from_year = 2020"))


async def test_budget_draws_from_the_appropriation_and_shrinks_only_to_what_is_committed(
    settings: Settings, engine: AsyncEngine
) -> None:
    year = 2029  # a year no other test touches
    admin = bearer(await create_key(engine, Role.ADMIN))
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    path = f"/v1/programs/data.trusted_space/budgets/{year}"
    async with running_app(settings) as client:
        response = await client.put(path, json={"amount_fen": 2_000_000 * YUAN}, headers=admin)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "program": "data.trusted_space",
            "year": year,
            "budget_fen": 200_000_000,
            "committed_fen": 0,
            "available_fen": 200_000_000,
        }
        # an award is issued from the budget (the issuing code comes later; the ledger move is the same)
        ledger = Ledger()
        payout = (await run_in_transaction(engine, lambda c: ledger.open_account(c, f"{unique('t')}:payout"))).code
        await run_in_transaction(
            engine,
            lambda c: ledger.transfer(
                c,
                key=unique("award-"),
                postings=[debit(budget_account("data.trusted_space", year), 150_000_000), credit(payout, 150_000_000)],
            ),
        )
        state = (await client.get(path, headers=auditor)).json()
        assert (state["budget_fen"], state["committed_fen"], state["available_fen"]) == (
            200_000_000,
            150_000_000,
            50_000_000,
        )
        assert_problem(
            await client.put(path, json={"amount_fen": 149_999_999}, headers=admin), 409, "budget_below_committed"
        )
        shrunk = (await client.put(path, json={"amount_fen": 150_000_000}, headers=admin)).json()
        assert (shrunk["budget_fen"], shrunk["available_fen"]) == (150_000_000, 0)
        # all programs of a year together stay within the appropriation (500,000,000 元 by default)
        other = f"/v1/programs/model.industry_rollout/budgets/{year}"
        rest = settings.appropriation_fen - 150_000_000
        assert_problem(
            await client.put(other, json={"amount_fen": rest + 1}, headers=admin), 409, "appropriation_exceeded"
        )
        assert (await client.put(other, json={"amount_fen": rest}, headers=admin)).status_code == 200
        async with engine.connect() as conn:
            assert (await ledger.balance(conn, appropriation_account(year))).available_fen == 0
            assert await ledger.verify_cached_balances(conn) == []


async def test_budget_routes_refuse_bad_input_and_the_wrong_callers(settings: Settings, engine: AsyncEngine) -> None:
    admin = bearer(await create_key(engine, Role.ADMIN))
    compute_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE))
    ok = {"amount_fen": 100}
    async with running_app(settings) as client:
        put = client.put
        assert_problem(
            await put("/v1/programs/data.trusted_space/budgets/2028", json=ok, headers=auditor), 403, "forbidden"
        )
        assert_problem(
            await put("/v1/programs/data.trusted_space/budgets/2028", json=ok, headers=enterprise), 403, "forbidden"
        )
        assert_problem(
            await put("/v1/programs/data.trusted_space/budgets/2028", json=ok, headers=compute_admin), 403, "forbidden"
        )
        assert_problem(await put("/v1/programs/no.such/budgets/2028", json=ok, headers=admin), 422, "validation_error")
        assert_problem(
            await put("/v1/programs/compute.purchase/budgets/2031", json=ok, headers=admin), 422, "outside_policy_term"
        )
        assert_problem(
            await put("/v1/programs/compute.purchase/budgets/2025", json=ok, headers=admin), 422, "outside_policy_term"
        )
        for bad in (
            {"amount_fen": -1},
            {"amount_fen": 1.5},
            {"amount_fen": "100"},
            {"amount_fen": True},
            {"amount_fen": 10**16},
            {},
            {"amount_fen": 1, "extra": 1},
        ):
            assert_problem(
                await put("/v1/programs/compute.purchase/budgets/2028", json=bad, headers=admin),
                422,
                "validation_error",
            )
        untouched = (await client.get("/v1/programs/compute.purchase/budgets/2028", headers=auditor)).json()
        assert untouched["budget_fen"] == 0


async def test_concurrent_budget_settings_never_exceed_the_appropriation(
    settings: Settings, engine: AsyncEngine
) -> None:
    year = 2030
    admin = bearer(await create_key(engine, Role.ADMIN))
    share = settings.appropriation_fen // 4
    codes = [
        "compute.purchase",
        "data.pilot_dataset",
        "scenario.benchmark",
        "model.first_filing",
        "model.first_purchase",
        "data.dataset_benchmark",
    ]
    async with running_app(settings) as client:

        async def put(code: str) -> httpx.Response:
            return await client.put(f"/v1/programs/{code}/budgets/{year}", json={"amount_fen": share}, headers=admin)

        results = await asyncio.gather(*(put(code) for code in codes))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 200, 409, 409], [r.text for r in results]
    ledger = Ledger()
    async with engine.connect() as conn:
        held = sum(
            b.available_fen
            for b in await ledger.balances(conn, prefix="program")
            if b.account.code.endswith(f":{year}:budget")
        )
        assert held == 4 * share
        assert (
            await ledger.balance(conn, appropriation_account(year))
        ).available_fen == settings.appropriation_fen - held
