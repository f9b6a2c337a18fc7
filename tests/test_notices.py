"""Public notice (公示) with a configured period: approved awards wait, listed publicly; an objection holds
one until an administrator resolves it; otherwise it is issued when the period ends.

The shipped definitions set no period, so these tests run the service with a definitions file that adds a
new version of `data.trusted_space` with a five-day notice, on a database of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.background import seal_all
from app.db import make_engine
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers import sanctions
from vouchers.budgets import budget_account
from vouchers.catalog import Catalog
from vouchers.notices import issue_due_notices
from vouchers.programs import DEFINITIONS_FILE

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
NOTICE_VERSION = f"""

[[program]]
code = "data.trusted_space"
version = 2
from_year = {YEAR}
article = "9.1"
name = "数据券 industry trusted data space, with public notice"
voucher_type = "data"
mode = "payout"
award = "rate"
rate_bp = 3000
cap_fen = 300_000_000
cap_applies_to = "project"
notice_days = 5
"""


@pytest.fixture
async def noticed(fresh_db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Settings, AsyncEngine]]:
    url = fresh_db_url
    programs = tmp_path / "programs.toml"
    programs.write_text(DEFINITIONS_FILE.read_text() + NOTICE_VERSION)
    settings = Settings(database_url=url, background_tasks=False, api_key_cache_ttl_s=0, programs_file=programs)
    engine = make_engine(url, settings)
    try:
        yield settings, engine
    finally:
        await engine.dispose()


async def approve_one(
    client: httpx.AsyncClient, engine: AsyncEngine, admin: dict[str, str], ref: str
) -> dict[str, str]:
    lead = await create_entity(engine)
    submitted = await client.post(
        "/v1/applications",
        headers=admin,
        json={
            "program": "data.trusted_space",
            "applicant_entity_id": lead,
            "year": YEAR,
            "basis": {"project_ref": ref, "investment_fen": 1_000_000 * YUAN},
        },
    )
    assert submitted.status_code == 201, submitted.text
    approved = await client.post(f"/v1/applications/{submitted.json()['id']}/approve", headers=admin)
    assert approved.status_code == 201, approved.text
    return {
        "application": submitted.json()["id"],
        "issue": approved.json()["id"],
        "kind": approved.json()["kind"],
        "status": approved.json()["status"],
    }


async def end_notice(engine: AsyncEngine, application_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE application SET notice_ends_at = now() - interval '1 second' WHERE id = :id"),
            {"id": application_id},
        )


async def test_an_award_waits_out_its_notice_then_is_issued(noticed: tuple[Settings, AsyncEngine]) -> None:
    settings, engine = noticed
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        assert (
            await client.put(
                f"/v1/programs/data.trusted_space/budgets/{YEAR}", headers=admin, json={"amount_fen": 1_000_000 * YUAN}
            )
        ).status_code == 200
        first = await approve_one(client, engine, admin, "P-1")
        assert (first["kind"], first["status"]) == ("notice", "in_notice")
        listed = (await client.get("/v1/notices")).json()["data"]  # public: no key
        assert [(n["application_id"], n["amount_fen"], n["status"]) for n in listed] == [
            (first["application"], 300_000 * YUAN, "in_notice")
        ]
        assert listed[0]["beneficiary_name"].startswith("test entity")
        budget = (await client.get(f"/v1/programs/data.trusted_space/budgets/{YEAR}", headers=admin)).json()
        assert budget["available_fen"] == 700_000 * YUAN  # held for the award through the notice

        ledger = Ledger()
        assert await issue_due_notices(engine, ledger, client_catalog(client)) == 0  # the period has not ended
        await end_notice(engine, first["application"])
        results = await asyncio.gather(
            issue_due_notices(engine, ledger, client_catalog(client)),
            issue_due_notices(engine, ledger, client_catalog(client)),
        )
        assert sorted(results) == [0, 1]  # exactly once, whoever sweeps
        application = (await client.get(f"/v1/applications/{first['application']}", headers=admin)).json()
        assert (application["status"], application["payout_id"]) == ("issued", first["issue"])
        assert (await client.get("/v1/notices")).json()["data"] == []
        await seal_all(engine, ledger)
        async with engine.connect() as conn:
            payable = await ledger.balance(conn, f"entity:{application['applicant_entity_id']}:payable")
            assert payable.credits_posted_fen == 300_000 * YUAN
            assert (await ledger.balance(conn, budget_account("data.trusted_space", YEAR))).available_fen == (
                700_000 * YUAN
            )
            assert await ledger.verify_cached_balances(conn) == []


def client_catalog(client: httpx.AsyncClient) -> Catalog:
    """The catalog of the app behind `client` (the one the sweeper of that service would use)."""
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    catalog: Catalog = transport.app.state.catalog  # type: ignore[attr-defined]
    return catalog


async def test_objections_hold_an_award_until_resolved(noticed: tuple[Settings, AsyncEngine]) -> None:
    settings, engine = noticed
    admin = bearer(await create_key(engine, Role.ADMIN))
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    neighbour = bearer(await create_key(engine, Role.ENTERPRISE))
    async with running_app(settings) as client:
        await client.put(
            f"/v1/programs/data.trusted_space/budgets/{YEAR}", headers=admin, json={"amount_fen": 1_000_000 * YUAN}
        )
        upheld = await approve_one(client, engine, admin, "P-2")
        dismissed = await approve_one(client, engine, admin, "P-3")
        assert_problem(
            await client.post(f"/v1/applications/{upheld['application']}/objections", json={"reason": "x"}),
            401,
            "unauthorized",
        )
        objection = await client.post(
            f"/v1/applications/{upheld['application']}/objections",
            headers=neighbour,
            json={"reason": "the project was never built"},
        )
        assert objection.status_code == 201, objection.text
        second = (
            await client.post(
                f"/v1/applications/{dismissed['application']}/objections",
                headers=auditor,
                json={"reason": "please check the investment"},
            )
        ).json()
        held = {n["application_id"]: n["status"] for n in (await client.get("/v1/notices")).json()["data"]}
        assert held == {upheld["application"]: "held", dismissed["application"]: "held"}

        # a held award is not issued when its period ends
        for application in (upheld, dismissed):
            await end_notice(engine, application["application"])
        catalog = client_catalog(client)
        assert await issue_due_notices(engine, Ledger(), catalog) == 0

        resolve = f"/v1/objections/{objection.json()['id']}/resolve"
        assert_problem(
            await client.post(resolve, headers=neighbour, json={"outcome": "upheld", "note": "n"}), 403, "forbidden"
        )
        assert_problem(
            await client.post(resolve, headers=admin, json={"outcome": "maybe", "note": "n"}), 422, "validation_error"
        )
        done = await client.post(resolve, headers=admin, json={"outcome": "upheld", "note": "site visit: no project"})
        assert done.json()["status"] == "upheld"
        assert_problem(
            await client.post(resolve, headers=admin, json={"outcome": "dismissed", "note": "again"}), 409, "conflict"
        )
        rejected = (await client.get(f"/v1/applications/{upheld['application']}", headers=admin)).json()
        assert rejected["status"] == "rejected" and "site visit" in rejected["decision_reason"]

        # the dismissed one is issued at once: its period is over
        await client.post(
            f"/v1/objections/{second['id']}/resolve",
            headers=admin,
            json={"outcome": "dismissed", "note": "investment verified"},
        )
        issued = (await client.get(f"/v1/applications/{dismissed['application']}", headers=admin)).json()
        assert issued["status"] == "issued"
        budget = (await client.get(f"/v1/programs/data.trusted_space/budgets/{YEAR}", headers=admin)).json()
        assert (budget["committed_fen"], budget["available_fen"]) == (300_000 * YUAN, 700_000 * YUAN)

        # the upheld basis is free again: the project can support a new application
        again = await approve_one(client, engine, admin, "P-2")
        assert again["status"] == "in_notice"
        assert_problem(
            await client.post(f"/v1/applications/{issued['id']}/objections", headers=auditor, json={"reason": "late"}),
            409,
            "conflict",
        )


async def test_objecting_to_an_application_not_in_notice_reveals_nothing(noticed: tuple[Settings, AsyncEngine]) -> None:
    settings, engine = noticed
    admin = bearer(await create_key(engine, Role.ADMIN))
    stranger = bearer(await create_key(engine, Role.ENTERPRISE))
    provider = bearer(await create_key(engine, Role.PROVIDER))
    async with running_app(settings) as client:
        lead = await create_entity(engine)
        submitted = await client.post(
            "/v1/applications",
            headers=admin,
            json={
                "program": "data.trusted_space",
                "applicant_entity_id": lead,
                "year": YEAR,
                "basis": {"project_ref": "P-9", "investment_fen": 1_000 * YUAN},
            },
        )
        path = f"/v1/applications/{submitted.json()['id']}/objections"
        for caller in (stranger, provider):
            assert_problem(await client.post(path, headers=caller, json={"reason": "x"}), 404, "not_found")
        assert_problem(await client.post(path, headers=admin, json={"reason": "x"}), 409, "conflict")


async def test_an_award_in_notice_is_not_issued_to_an_entity_sanctioned_meanwhile(
    noticed: tuple[Settings, AsyncEngine],
) -> None:
    """art. 25: no new award while a sanction is in force, even one approved before the decision."""
    settings, engine = noticed
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings) as client:
        path = f"/v1/programs/data.trusted_space/budgets/{YEAR}"
        assert (await client.put(path, headers=admin, json={"amount_fen": 1_000_000 * YUAN})).status_code == 200
        waiting = await approve_one(client, engine, admin, "P-S")
        lead = (await client.get(f"/v1/applications/{waiting['application']}", headers=admin)).json()
        async with engine.begin() as conn:
            sanction = await sanctions.impose(
                conn,
                entity_id=lead["applicant_entity_id"],
                reason="false invoices on another award",
                source_kind="application",
                source_id=waiting["application"],
                years=3,
                actor=None,
                now=datetime.now(UTC),
            )
        await end_notice(engine, waiting["application"])
        assert await issue_due_notices(engine, Ledger(), client_catalog(client)) == 0
        refused = (await client.get(f"/v1/applications/{waiting['application']}", headers=admin)).json()
        assert (refused["status"], refused["payout_id"]) == ("rejected", None)
        assert sanction.id in refused["decision_reason"]
        budget = (await client.get(path, headers=admin)).json()
        assert budget["available_fen"] == 1_000_000 * YUAN  # the hold was voided: nothing left the budget
        # the project was not the misconduct: once the sanction is lifted it may support an award again
        lifted = await client.post(f"/v1/sanctions/{sanction.id}/lift", headers=admin, json={"reason": "appeal"})
        assert lifted.status_code == 200, lifted.text
        assert (await approve_one(client, engine, admin, "P-S"))["status"] == "in_notice"
