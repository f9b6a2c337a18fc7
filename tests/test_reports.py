"""Reports through the real app, on a database of their own (so a program-year holds only what we put in):
a program-year's figures derived by hand and reconciled, an entity's statement and its pages, who may
read them, and the trial balance `as_of` past moments equal to what it read at those moments."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.rules import program_year
from vouchers.vouchers import expire_due_vouchers

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
COMPUTE = "compute.purchase"
TRUSTED = "data.trusted_space"


@pytest.fixture
async def own(fresh_db_url: str) -> AsyncIterator[tuple[Settings, AsyncEngine]]:
    settings = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings)
    yield settings, engine
    await engine.dispose()


async def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


class World:
    def __init__(self, client: httpx.AsyncClient, engine: AsyncEngine, admin: dict[str, str]) -> None:
        self.client, self.engine, self.admin = client, engine, admin

    async def budget(self, program: str, yuan: int) -> None:
        path = f"/v1/programs/{program}/budgets/{YEAR}"
        await ok(await self.client.put(path, headers=self.admin, json={"amount_fen": yuan * YUAN}))

    async def award(self, program: str, holder: str, basis: dict[str, Any]) -> dict[str, Any]:
        body = {"program": program, "applicant_entity_id": holder, "year": YEAR, "basis": basis}
        submitted = await ok(await self.client.post("/v1/applications", headers=self.admin, json=body), 201)
        url = f"/v1/applications/{submitted['id']}/approve"
        return await ok(await self.client.post(url, headers=self.admin, json={}), 201)

    async def compute_voucher(self, holder: str, purchased_yuan: int) -> str:
        seller = await create_entity(self.engine, kind="provider")
        purchase = {
            "provider_entity_id": seller,
            "invoice_no": f"B-{holder[-8:]}",
            "category": "compute",
            "amount_fen": purchased_yuan * YUAN,
            "purchased_on": f"{YEAR - 1}-05-01",
        }
        issued = await self.award(COMPUTE, holder, {"purchases": [purchase]})
        voucher_id: str = issued["id"]
        return voucher_id

    async def token(self, voucher: str) -> str:
        body = await ok(await self.client.post(f"/v1/vouchers/{voucher}/token", headers=self.admin, json={}), 201)
        token: str = body["token"]
        return token

    async def provider_post(self, key: dict[str, str], path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {**key, "Idempotency-Key": uuid.uuid4().hex}
        response = await self.client.post(path, headers=headers, json=body)
        assert response.status_code in (200, 201), response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def redeem(self, key: dict[str, str], token: str, invoice: str, yuan: int) -> str:
        lines = [{"category": "compute", "amount_fen": yuan * YUAN, "description": "GPU hours"}]
        body = {"token": token, "invoice_no": invoice, "lines": lines}
        redemption = await self.provider_post(key, "/v1/redemptions", body)
        assert redemption["subsidy_fen"] == yuan * YUAN
        redemption_id: str = redemption["id"]
        return redemption_id

    async def report(self, program: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"/v1/reports/programs/{program}/{YEAR}"
        return await ok(await self.client.get(url, headers=headers or self.admin))

    async def trial_balance(self, as_of: datetime | None = None) -> dict[str, Any]:
        params = {} if as_of is None else {"as_of": as_of.isoformat()}
        return await ok(await self.client.get("/v1/ledger/trial-balance", headers=self.admin, params=params))

    async def moment(self) -> datetime:
        async with self.engine.connect() as conn:
            now: datetime = await conn.scalar(text("SELECT clock_timestamp()"))
        return now


def reconciles(report: dict[str, Any]) -> None:
    """The identities vouchers/reports.py promises, whatever the figures."""
    assert report["budget_fen"] == report["committed_fen"] + report["available_fen"]
    assert report["committed_fen"] == report["issued_fen"] - report["released_fen"] + report["in_notice_fen"]
    assert report["committed_fen"] == sum(
        report[f] for f in ("paid_out_fen", "redeemed_fen", "held_fen", "unspent_fen", "returning_fen", "in_notice_fen")
    )
    counts = report["vouchers"]
    assert counts["total"] == counts["active"] + counts["expired"] + counts["revoked"]


def figures(report: dict[str, Any]) -> dict[str, int]:
    """The money figures in 元 (each assertion below is derived by hand from the story)."""
    return {k.removesuffix("_fen"): v // YUAN for k, v in report.items() if k.endswith("_fen")}


def money(
    budget: int,
    issued: int,
    released: int,
    committed: int,
    available: int,
    *,
    paid_out: int = 0,
    redeemed: int = 0,
    held: int = 0,
    unspent: int = 0,
    returning: int = 0,
) -> dict[str, int]:
    return {
        "budget": budget,
        "issued": issued,
        "released": released,
        "in_notice": 0,
        "committed": committed,
        "available": available,
        "paid_out": paid_out,
        "redeemed": redeemed,
        "held": held,
        "unspent": unspent,
        "returning": returning,
    }


def rows_of(trial: dict[str, Any]) -> tuple[Any, ...]:
    return (
        trial["total_debits_fen"],
        trial["total_credits_fen"],
        trial["total_debits_pending_fen"],
        trial["total_credits_pending_fen"],
        tuple(
            sorted(
                (
                    r["code"],
                    r["debits_posted_fen"],
                    r["credits_posted_fen"],
                    r["debits_pending_fen"],
                    r["credits_pending_fen"],
                )
                for r in trial["rows"]
            )
        ),
    )


async def test_a_program_year_reconciles_and_the_trial_balance_answers_for_past_moments(
    own: tuple[Settings, AsyncEngine],
) -> None:
    settings, engine = own
    async with running_app(settings) as client:
        w = World(client, engine, bearer(await create_key(engine, Role.ADMIN)))
        await w.budget(COMPUTE, 2_000_000)
        empty = await w.report(COMPUTE)
        reconciles(empty)
        assert figures(empty) == money(2_000_000, 0, 0, 0, 2_000_000)

        h1, h2 = await create_entity(engine), await create_entity(engine)
        v1 = await w.compute_voucher(h1, 1_200_000)  # 50 %: 600,000 元
        v2 = await w.compute_voucher(h2, 1_100_000)  # 550,000 元
        issued = await w.report(COMPUTE)
        reconciles(issued)
        assert figures(issued) == money(2_000_000, 1_150_000, 0, 1_150_000, 850_000, unspent=1_150_000)
        assert issued["awards"] == {
            "issued": 2,
            "reversed": 0,
            "in_notice": 0,
            "vouchers": 2,
            "payouts": 0,
            "reversed_misconduct": 0,
        }
        assert issued["vouchers"] == {
            "active": 2,
            "expired": 0,
            "revoked": 0,
            "total": 2,
            "revoked_misconduct": 0,
            "misconduct": 0,
        }
        moments = [(await w.moment(), await w.trial_balance())]

        provider = await create_entity(engine, kind="provider")
        p_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
        t1, t2 = await w.token(v1), await w.token(v2)
        r1 = await w.redeem(p_key, t1, "INV-1", 100_000)
        r2 = await w.redeem(p_key, t1, "INV-2", 50_000)
        await w.provider_post(p_key, f"/v1/redemptions/{r2}/refund", {"amount_fen": 20_000 * YUAN, "reason": "unused"})
        await w.redeem(p_key, t2, "INV-3", 80_000)
        hold = await w.provider_post(p_key, "/v1/holds", {"token": t2, "amount_fen": 10_000 * YUAN})
        spent = await w.report(COMPUTE)
        reconciles(spent)
        # redeemed 100,000 + 50,000 − 20,000 + 80,000; V1 keeps 600,000 − 130,000, V2 550,000 − 80,000 − 10,000
        assert figures(spent) == money(
            2_000_000, 1_150_000, 0, 1_150_000, 850_000, redeemed=210_000, held=10_000, unspent=930_000
        )
        moments.append((await w.moment(), await w.trial_balance()))

        await w.provider_post(p_key, f"/v1/holds/{hold['id']}/void", None)
        revoked = await ok(
            await client.post(
                f"/v1/vouchers/{v1}/revoke", headers=w.admin, json={"reason": "test", "grounds": "administrative"}
            )
        )
        assert revoked["released_fen"] == 470_000 * YUAN
        clawback = await client.post(
            f"/v1/redemptions/{r1}/reverse",
            headers={**w.admin, "Idempotency-Key": "claw"},
            json={"reason": "test", "grounds": "administrative"},
        )
        assert clawback.status_code == 200, clawback.text  # V1 has ended: the 100,000 元 go to the budget
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE voucher SET expires_at = now() - interval '1 second' WHERE id = :id"), {"id": v2}
            )
        ended = await w.report(COMPUTE)
        reconciles(ended)
        # released: V1's 470,000 + the clawback's 100,000; V2 reads expired, its 470,000 not yet swept back
        assert figures(ended) == money(
            2_000_000, 1_150_000, 570_000, 580_000, 1_420_000, redeemed=110_000, returning=470_000
        )
        assert ended["vouchers"] == {
            "active": 0,
            "expired": 1,
            "revoked": 1,
            "total": 2,
            "revoked_misconduct": 0,
            "misconduct": 0,
        }
        assert ended["awards"]["issued"] == 2
        moments.append((await w.moment(), await w.trial_balance()))

        assert await expire_due_vouchers(engine, Ledger(), datetime.now(UTC)) == [v2]
        swept = await w.report(COMPUTE, bearer(await create_key(engine, Role.AUDITOR)))
        reconciles(swept)
        assert figures(swept) == money(2_000_000, 1_150_000, 1_040_000, 110_000, 1_890_000, redeemed=110_000)
        budget = await ok(await client.get(f"/v1/programs/{COMPUTE}/budgets/{YEAR}", headers=w.admin))
        assert (budget["committed_fen"], budget["available_fen"]) == (swept["committed_fen"], swept["available_fen"])

        # the trial balance as of each recorded moment is what it was then, while the money kept moving
        assert len({rows_of(trial) for _, trial in moments}) == 3
        for at, trial in moments:
            past = await w.trial_balance(as_of=at)
            assert rows_of(past) == rows_of(trial) and past["balanced"]
        assert rows_of(await w.trial_balance(as_of=await w.moment())) == rows_of(await w.trial_balance())

        # payouts: a standing one is paid out; a reversed one is released
        await w.budget(TRUSTED, 1_000_000)
        lead1, lead2 = await create_entity(engine, kind="association"), await create_entity(engine, kind="association")
        await w.award(TRUSTED, lead1, {"project_ref": "TS-1", "investment_fen": 1_000_000 * YUAN})
        second = await w.award(TRUSTED, lead2, {"project_ref": "TS-2", "investment_fen": 500_000 * YUAN})
        assert second["amount_fen"] == 150_000 * YUAN
        application = second["application_id"]
        await ok(
            await client.post(
                f"/v1/applications/{application}/reverse",
                headers=w.admin,
                json={"reason": "x", "grounds": "administrative"},
            )
        )
        paid = await w.report(TRUSTED)
        reconciles(paid)
        assert figures(paid) == money(1_000_000, 450_000, 150_000, 300_000, 700_000, paid_out=300_000)
        assert paid["awards"] == {
            "issued": 1,
            "reversed": 1,
            "in_notice": 0,
            "vouchers": 0,
            "payouts": 1,
            "reversed_misconduct": 0,
        }
        assert paid["vouchers"] == {
            "active": 0,
            "expired": 0,
            "revoked": 0,
            "total": 0,
            "revoked_misconduct": 0,
            "misconduct": 0,
        }

        # statements: the holder's voucher, and the provider's payable account, line by line
        this_year = program_year(datetime.now(UTC))
        h1_key = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=h1))
        url = f"/v1/entities/{h1}/statement"
        whole = await ok(await client.get(url, headers=h1_key, params={"year": this_year}))
        assert whole["next_cursor"] is None
        assert [
            (line["in_fen"] // YUAN, line["out_fen"] // YUAN, line["balance_fen"] // YUAN) for line in whole["data"]
        ] == [
            (600_000, 0, 600_000),  # issued
            (0, 100_000, 500_000),  # INV-1
            (0, 50_000, 450_000),  # INV-2
            (20_000, 0, 470_000),  # the refund
            (0, 470_000, 0),  # revoked: back to the budget
        ]
        assert {line["account"] for line in whole["data"]} == {f"voucher:{v1}"}
        assert [line["kind"] for line in whole["data"]] == ["transfer"] * 5
        assert "revoked" in whole["data"][-1]["memo"]
        assert whole["accounts"] == [
            {
                "account": f"voucher:{v1}",
                "voucher_id": v1,
                "opening_balance_fen": 0,
                "in_fen": 620_000 * YUAN,
                "out_fen": 620_000 * YUAN,
                "closing_balance_fen": 0,
                "opening_pending_fen": 0,
                "closing_pending_fen": 0,
            }
        ]
        collected: list[dict[str, Any]] = []
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"year": this_year, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = await ok(await client.get(url, headers=w.admin, params=params))
            assert page["accounts"] == whole["accounts"]  # every page carries the year's totals
            collected += page["data"]
            pages.append(len(page["data"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [2, 2, 1] and collected == whole["data"]
        other_year = await ok(await client.get(url, headers=h1_key, params={"year": this_year + 1}))
        assert (other_year["data"], other_year["accounts"]) == ([], [])

        payable = await ok(
            await client.get(f"/v1/entities/{provider}/statement", headers=p_key, params={"year": this_year})
        )
        assert [
            (line["in_fen"] // YUAN, line["out_fen"] // YUAN, line["balance_fen"] // YUAN, line["pending_fen"] // YUAN)
            for line in payable["data"]
        ] == [
            (100_000, 0, 100_000, 0),  # INV-1
            (50_000, 0, 150_000, 0),  # INV-2
            (0, 20_000, 130_000, 0),  # the refund
            (80_000, 0, 210_000, 0),  # INV-3
            (0, 0, 210_000, 10_000),  # the hold
            (0, 0, 210_000, 0),  # voided
            (0, 100_000, 110_000, 0),  # the clawback
        ]
        assert [line["kind"] for line in payable["data"]][4:6] == ["pending", "void_pending"]
        (account,) = payable["accounts"]
        assert (account["account"], account["voucher_id"], account["closing_balance_fen"]) == (
            f"entity:{provider}:payable",
            None,
            110_000 * YUAN,
        )

        # who may read, and bad input
        h2_key = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=h2))
        assert_problem(await client.get(url, headers=h2_key), 404, "not_found")
        assert_problem(await client.get(url, headers=p_key), 404, "not_found")
        assert_problem(await client.get(f"/v1/entities/ent_{'0' * 24}/statement", headers=w.admin), 404, "not_found")
        assert_problem(await client.get(url, headers=w.admin, params={"cursor": "nonsense"}), 422, "validation_error")
        assert_problem(await client.get(url, headers=w.admin, params={"year": 1999}), 422, "validation_error")
        assert (await client.get(url, headers=bearer(await create_key(engine, Role.AUDITOR)))).status_code == 200
        report_url = f"/v1/reports/programs/{COMPUTE}/{YEAR}"
        assert_problem(await client.get(report_url, headers=h1_key), 403, "forbidden")
        assert_problem(await client.get(report_url, headers=p_key), 403, "forbidden")
        assert_problem(await client.get(report_url), 401, "unauthorized")
        limited = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
        assert (await client.get(report_url, headers=limited)).status_code == 200
        assert_problem(
            await client.get(f"/v1/reports/programs/nosuch.program/{YEAR}", headers=w.admin), 422, "validation_error"
        )
        assert_problem(
            await client.get(f"/v1/reports/programs/{COMPUTE}/2031", headers=w.admin), 422, "outside_policy_term"
        )
        assert_problem(
            await client.get(f"/v1/reports/programs/{COMPUTE}/2025", headers=w.admin), 422, "outside_policy_term"
        )
        # a program-year nobody funded reads as zeros, and still reconciles
        unfunded = await w.report("model.first_purchase")
        reconciles(unfunded)
        assert figures(unfunded) == money(0, 0, 0, 0, 0)
