"""Grounds of revocations and reversals, and sanctions (POLICY.md, "Grounds of a revocation or reversal",
"External awards can be reversed", "Art. 27 covers all 28 articles"; art. 25, art. 27), through the real app.

Administrative grounds give the cap room back and free the documents; misconduct keeps both used and bars
the beneficiary from every program from the decision date up to the day before `until` (its first free day),
unless an unrestricted admin lifts the sanction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.policy_tasks import grant_automatic
from app.settings import Settings
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.sanctions import sanction_until, shanghai_date

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
PILOT = "data.pilot_dataset"  # a voucher, capped per entity-year (2,000,000 元), reviewer-set
SPACE = "data.trusted_space"  # a payout, capped per project
ADMIN_GROUNDS = {"grounds": "administrative"}
MISCONDUCT = {"grounds": "misconduct"}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def fund(client: httpx.AsyncClient, admin: dict[str, str], program: str, amount_fen: int) -> None:
    path = f"/v1/programs/{program}/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    response = await client.put(path, json={"amount_fen": current + amount_fen}, headers=admin)
    assert response.status_code == 200, response.text


async def submit(
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": YEAR, "basis": basis},
        headers=admin,
    )


def pilot_basis() -> dict[str, Any]:
    return {"project_ref": f"PD-{uuid.uuid4().hex[:12]}", "pilot_base": "国家人工智能行业应用中试基地"}


async def pilot_voucher(client: httpx.AsyncClient, admin: dict[str, str], holder: str, award_yuan: int) -> str:
    submitted = await submit(client, admin, PILOT, holder, pilot_basis())
    assert submitted.status_code == 201, submitted.text
    approved = await client.post(
        f"/v1/applications/{submitted.json()['id']}/approve", headers=admin, json={"award_fen": award_yuan * YUAN}
    )
    assert approved.status_code == 201, approved.text
    voucher: str = approved.json()["id"]
    return voucher


async def cap_used(client: httpx.AsyncClient, admin: dict[str, str], entity: str) -> int:
    balances = (await client.get(f"/v1/entities/{entity}/balances", headers=admin, params={"year": YEAR})).json()
    [pilot] = [b for b in balances["data"] if b["program"] == PILOT]
    used: int = pilot["cap_used_fen"]
    return used


async def entry_metadata(engine: AsyncEngine, entry_id: int) -> dict[str, Any]:
    async with engine.connect() as conn:
        raw = await conn.scalar(text("SELECT metadata::text FROM ledger_entry WHERE id = :id"), {"id": entry_id})
    found: dict[str, Any] = json.loads(raw)
    return found


async def last_entry_for(engine: AsyncEngine, key_prefix: str) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT id FROM ledger_entry WHERE idempotency_key LIKE :k ORDER BY id DESC LIMIT 1"),
            {"k": key_prefix + "%"},
        )
    assert found is not None, key_prefix
    return int(found)


def test_until_is_the_first_free_day_and_a_leap_day_is_never_shortened() -> None:
    assert sanction_until(date(2026, 5, 20), 3) == date(2029, 5, 20)
    assert sanction_until(date(2028, 2, 29), 3) == date(2031, 3, 1)
    assert sanction_until(date(2028, 2, 29), 4) == date(2032, 2, 29)
    # the decision date is the Shanghai calendar day: 2026-12-31T16:30Z is already 1 January 2027 there
    assert shanghai_date(datetime(2026, 12, 31, 16, 30, tzinfo=UTC)) == date(2027, 1, 1)


async def test_grounds_are_required_and_administrative_revocation_gives_the_cap_room_back(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 2_000_000 * YUAN)
    holder = await create_entity(engine)
    voucher = await pilot_voucher(client, admin, holder, 500_000)
    path = f"/v1/vouchers/{voucher}/revoke"
    for bad in ({}, {"reason": "x"}, {"reason": "x", "grounds": "fraud"}, {"reason": "x", "grounds": None}):
        assert_problem(await client.post(path, headers=admin, json=bad), 422, "validation_error")
    revoked = await client.post(path, headers=admin, json={"reason": "issued in error", **ADMIN_GROUNDS})
    assert revoked.status_code == 200, revoked.text
    assert (revoked.json()["revocation_grounds"], revoked.json()["misconduct_sanction_id"]) == ("administrative", None)
    assert await cap_used(client, admin, holder) == 0
    assert (await client.get(f"/v1/entities/{holder}", headers=admin)).json()["sanctions"] == []
    metadata = await entry_metadata(engine, await last_entry_for(engine, f"revoke:{voucher}"))
    assert (metadata["grounds"], metadata["sanction"]) == ("administrative", None)
    again = await submit(client, admin, PILOT, holder, pilot_basis())
    assert again.status_code == 201, again.text


async def test_misconduct_revocation_keeps_the_cap_used_and_sanctions_the_holder_in_every_program(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 2_000_000 * YUAN)
    await fund(client, admin, SPACE, 1_000_000 * YUAN)
    holder = await create_entity(engine)
    voucher = await pilot_voucher(client, admin, holder, 500_000)
    # an application submitted before the decision, approved after it: refused at approval
    pending = await submit(client, admin, SPACE, holder, {"project_ref": f"S-{holder[-8:]}", "investment_fen": 10**8})
    assert pending.status_code == 201, pending.text

    revoked = await client.post(
        f"/v1/vouchers/{voucher}/revoke", headers=admin, json={"reason": "spent on storage", **MISCONDUCT}
    )
    assert revoked.status_code == 200, revoked.text
    body = revoked.json()
    assert body["revocation_grounds"] == "misconduct" and body["released_fen"] == 500_000 * YUAN
    # the budget got the unspent value back, but the holder's cap room stays used for the year
    assert await cap_used(client, admin, holder) == 500_000 * YUAN

    entity = (await client.get(f"/v1/entities/{holder}", headers=admin)).json()
    [sanction] = entity["sanctions"]
    today = shanghai_date(datetime.now(UTC))
    assert sanction["id"] == body["misconduct_sanction_id"] and sanction["id"].startswith("san_")
    assert (sanction["decided_on"], sanction["until"]) == (today.isoformat(), sanction_until(today, 3).isoformat())
    assert sanction["reason"] == "spent on storage"
    assert sanction["source"] == {"kind": "voucher", "id": voucher}
    metadata = await entry_metadata(engine, await last_entry_for(engine, f"revoke:{voucher}"))
    assert (metadata["grounds"], metadata["sanction"]) == ("misconduct", sanction["id"])

    # no new award under any program: refused at submission, and at approval of what was pending
    for program, basis in ((PILOT, pilot_basis()), (SPACE, {"project_ref": f"T-{holder[-8:]}", "investment_fen": 1})):
        refused = await submit(client, admin, program, holder, basis)
        problem = assert_problem(refused, 409, "entity_sanctioned")
        assert sanction["id"] in problem["detail"] and sanction["until"] in problem["detail"], problem
        assert problem["errors"][0]["sanction"]["id"] == sanction["id"]
    assert_problem(
        await client.post(f"/v1/applications/{pending.json()['id']}/approve", headers=admin, json={}),
        409,
        "entity_sanctioned",
    )
    history = (await client.get(f"/v1/entities/{holder}/history", headers=admin)).json()["data"]
    assert [e["kind"] for e in history if e["kind"].startswith("sanction")] == ["sanctioned"]
    statement = (await client.get(f"/v1/entities/{holder}/statement", headers=admin, params={"year": YEAR})).json()
    assert [s["id"] for s in statement["sanctions"]] == [sanction["id"]]
    report = (await client.get(f"/v1/reports/programs/{PILOT}/{YEAR}", headers=admin)).json()
    assert report["vouchers"]["revoked_misconduct"] >= 1 and report["vouchers"]["misconduct"] >= 1


async def test_a_sanction_ends_on_until_and_can_be_lifted_once_by_an_unrestricted_admin(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 2_000_000 * YUAN)
    holder = await create_entity(engine)
    voucher = await pilot_voucher(client, admin, holder, 100_000)
    revoked = await client.post(f"/v1/vouchers/{voucher}/revoke", headers=admin, json={"reason": "fraud", **MISCONDUCT})
    sanction = revoked.json()["misconduct_sanction_id"]
    today = shanghai_date(datetime.now(UTC))

    async def period(decided_on: date, until: date) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE sanction SET decided_on = :d, until = :u WHERE id = :id"),
                {"d": decided_on, "u": until, "id": sanction},
            )

    # the last day of the sanction (the day before `until`) is refused; `until` itself is free
    await period(today - timedelta(days=3 * 365), today + timedelta(days=1))
    assert_problem(await submit(client, admin, PILOT, holder, pilot_basis()), 409, "entity_sanctioned")
    await period(today - timedelta(days=3 * 365), today)
    assert (await submit(client, admin, PILOT, holder, pilot_basis())).status_code == 201
    # a decision dated tomorrow is not yet in force (dates are Asia/Shanghai calendar days)
    await period(today + timedelta(days=1), today + timedelta(days=30))
    assert (await submit(client, admin, PILOT, holder, pilot_basis())).status_code == 201
    await period(today, sanction_until(today, 3))
    assert_problem(await submit(client, admin, PILOT, holder, pilot_basis()), 409, "entity_sanctioned")

    lift = f"/v1/sanctions/{sanction}/lift"
    limited = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    for key in (limited, auditor):
        assert_problem(await client.post(lift, headers=key, json={"reason": "appeal"}), 403, "forbidden")
    assert_problem(await client.post(lift, headers=admin, json={}), 422, "validation_error")
    missing = f"/v1/sanctions/san_{'0' * 24}/lift"
    assert_problem(await client.post(missing, headers=admin, json={"reason": "appeal"}), 404, "not_found")
    lifted = await client.post(lift, headers=admin, json={"reason": "appeal upheld"})
    assert lifted.status_code == 200, lifted.text
    assert lifted.json()["lift_reason"] == "appeal upheld" and lifted.json()["lifted_at"]
    assert_problem(await client.post(lift, headers=admin, json={"reason": "again"}), 409, "sanction_already_lifted")
    assert (await submit(client, admin, PILOT, holder, pilot_basis())).status_code == 201
    # lifting bars nothing any more, but the cap room used by the misconduct stays used
    assert await cap_used(client, admin, holder) == 100_000 * YUAN
    history = (await client.get(f"/v1/entities/{holder}/history", headers=admin)).json()["data"]
    kinds = [e for e in history if e["kind"] in ("sanctioned", "sanction_lifted")]
    assert [e["kind"] for e in kinds] == ["sanctioned", "sanction_lifted"]
    assert kinds[1]["reason"] == "appeal upheld"


async def test_misconduct_reversal_keeps_the_documents_claimed_administrative_frees_them(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, SPACE, 3_000_000 * YUAN)

    async def paid(entity: str, project: str) -> str:
        submitted = await submit(client, admin, SPACE, entity, {"project_ref": project, "investment_fen": 10**8})
        assert submitted.status_code == 201, submitted.text
        approved = await client.post(f"/v1/applications/{submitted.json()['id']}/approve", headers=admin, json={})
        assert approved.status_code == 201, approved.text
        application: str = approved.json()["application"]["id"]
        return application

    cheat, honest, other = [await create_entity(engine) for _ in range(3)]
    fraud, error = f"F-{uuid.uuid4().hex[:10]}", f"E-{uuid.uuid4().hex[:10]}"
    first = await paid(cheat, fraud)
    second = await paid(honest, error)
    reversed_ = await client.post(
        f"/v1/applications/{first}/reverse", headers=admin, json={"reason": "false invoices", **MISCONDUCT}
    )
    assert reversed_.status_code == 200, reversed_.text
    body = reversed_.json()
    assert (body["grounds"], body["released_documents"]) == ("misconduct", [])
    assert body["kept_documents"] and body["sanction_id"]
    metadata = await entry_metadata(engine, int(body["entry_id"]))
    assert (metadata["grounds"], metadata["sanction"]) == ("misconduct", body["sanction_id"])
    entity = (await client.get(f"/v1/entities/{cheat}", headers=admin)).json()
    assert entity["sanctions"][0]["source"] == {"kind": "application", "id": first}
    # the same project, by anyone: the document stays claimed for ever
    again = await submit(client, admin, SPACE, other, {"project_ref": fraud, "investment_fen": 10**8})
    approved = await client.post(f"/v1/applications/{again.json()['id']}/approve", headers=admin, json={})
    assert_problem(approved, 409, "basis_already_used")

    freed = await client.post(
        f"/v1/applications/{second}/reverse", headers=admin, json={"reason": "就高", **ADMIN_GROUNDS}
    )
    assert freed.status_code == 200 and freed.json()["released_documents"] and freed.json()["sanction_id"] is None
    assert (await client.get(f"/v1/entities/{honest}", headers=admin)).json()["sanctions"] == []
    await paid(honest, error)  # free again for the higher award
    report = (await client.get(f"/v1/reports/programs/{SPACE}/{YEAR}", headers=admin)).json()
    assert report["awards"]["reversed_misconduct"] >= 1
    assert report["awards"]["reversed"] >= report["awards"]["reversed_misconduct"] + 1


async def test_a_redemption_reversed_for_misconduct_pays_the_budget_not_the_voucher(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 2_000_000 * YUAN)
    budget = f"/v1/programs/{PILOT}/budgets/{YEAR}"
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))

    async def redeemed(holder: str, voucher: str) -> str:
        token = (await client.post(f"/v1/vouchers/{voucher}/token", headers=admin, json={})).json()["token"]
        response = await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": uuid.uuid4().hex},
            json={
                "token": token,
                "invoice_no": f"R-{uuid.uuid4().hex[:10]}",
                "lines": [{"category": "dataset", "amount_fen": 100_000 * YUAN}],
            },
        )
        assert response.status_code == 201, response.text
        redemption: str = response.json()["id"]
        return redemption

    honest, cheat = await create_entity(engine), await create_entity(engine)
    honest_voucher, cheat_voucher = (
        await pilot_voucher(client, admin, honest, 200_000),
        await pilot_voucher(client, admin, cheat, 200_000),
    )
    honest_redemption = await redeemed(honest, honest_voucher)
    cheat_redemption = await redeemed(cheat, cheat_voucher)
    spent = (await client.get(f"/v1/vouchers/{cheat_voucher}", headers=admin)).json()
    subsidy = 200_000 * YUAN - spent["available_fen"]
    assert subsidy > 0

    # administrative: the value goes back to the voucher, as before
    reversed_ = await client.post(
        f"/v1/redemptions/{honest_redemption}/reverse", headers=admin, json={"reason": "wrong invoice", **ADMIN_GROUNDS}
    )
    assert reversed_.status_code == 200, reversed_.text
    assert (await client.get(f"/v1/vouchers/{honest_voucher}", headers=admin)).json()["available_fen"] == 200_000 * YUAN

    # misconduct: to the program budget; the voucher keeps only what it had, and its holder is sanctioned
    before = (await client.get(budget, headers=admin)).json()["available_fen"]
    reversed_ = await client.post(
        f"/v1/redemptions/{cheat_redemption}/reverse", headers=admin, json={"reason": "fake invoice", **MISCONDUCT}
    )
    assert reversed_.status_code == 200, reversed_.text
    after = (await client.get(f"/v1/vouchers/{cheat_voucher}", headers=admin)).json()
    assert after["available_fen"] == spent["available_fen"] and after["released_fen"] == subsidy
    assert after["misconduct_sanction_id"]
    assert (await client.get(budget, headers=admin)).json()["available_fen"] == before + subsidy
    assert await cap_used(client, admin, cheat) == 200_000 * YUAN
    [sanction] = (await client.get(f"/v1/entities/{cheat}", headers=admin)).json()["sanctions"]
    assert sanction["source"] == {"kind": "redemption", "id": cheat_redemption}
    assert (await client.get(f"/v1/entities/{provider}", headers=admin)).json()["sanctions"] == []
    metadata = await entry_metadata(engine, await last_entry_for(engine, f"reverse:{cheat_redemption}"))
    assert (metadata["grounds"], metadata["sanction"]) == ("misconduct", sanction["id"])


async def test_external_awards_reverse_on_their_grounds(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, SPACE, 2_000_000 * YUAN)
    lead, cheat = await create_entity(engine), await create_entity(engine)
    chosen, abused = f"J-{uuid.uuid4().hex[:10]}", f"K-{uuid.uuid4().hex[:10]}"

    async def record(entity: str, project: str) -> dict[str, Any]:
        body = {
            "entity_id": entity,
            "basis_ref": f"project:{project}",
            "policy": "district support",
            "amount_fen": 100 * YUAN,
            "awarded_on": f"{YEAR}-01-05",
        }
        response = await client.post("/v1/external-awards", headers=admin, json=body)
        assert response.status_code == 201, response.text
        recorded: dict[str, Any] = response.json()
        return recorded

    small = await record(lead, chosen)
    limited = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
    path = f"/v1/external-awards/{small['id']}/reverse"
    assert_problem(await client.post(path, headers=limited, json={"reason": "x", **ADMIN_GROUNDS}), 403, "forbidden")
    assert_problem(await client.post(path, headers=admin, json={"reason": "x"}), 422, "validation_error")
    reversed_ = await client.post(
        path, headers=admin, json={"reason": "就高: the city's award is higher", **ADMIN_GROUNDS}
    )
    assert reversed_.status_code == 200, reversed_.text
    assert reversed_.json()["reversal_grounds"] == "administrative" and reversed_.json()["released_documents"]
    assert_problem(await client.post(path, headers=admin, json={"reason": "again", **ADMIN_GROUNDS}), 409, "conflict")
    shown = (await client.get(f"/v1/external-awards/{small['id']}", headers=admin)).json()
    assert shown["reversed_at"] and shown["reversal_reason"] == "就高: the city's award is higher"
    higher = await submit(client, admin, SPACE, lead, {"project_ref": chosen, "investment_fen": 10**8})
    approved = await client.post(f"/v1/applications/{higher.json()['id']}/approve", headers=admin, json={})
    assert approved.status_code == 201, approved.text

    bad = await record(cheat, abused)
    reversed_ = await client.post(
        f"/v1/external-awards/{bad['id']}/reverse", headers=admin, json={"reason": "forged project", **MISCONDUCT}
    )
    assert reversed_.status_code == 200 and reversed_.json()["released_documents"] == []
    sanction = reversed_.json()["sanction_id"]
    [shown_sanction] = (await client.get(f"/v1/entities/{cheat}", headers=admin)).json()["sanctions"]
    assert shown_sanction["id"] == sanction and shown_sanction["source"] == {"kind": "external_award", "id": bad["id"]}
    other = await create_entity(engine)
    again = await submit(client, admin, SPACE, other, {"project_ref": abused, "investment_fen": 10**8})
    approved = await client.post(f"/v1/applications/{again.json()['id']}/approve", headers=admin, json={})
    assert_problem(approved, 409, "basis_already_used")


async def test_external_awards_drawing_the_appropriation_never_exceed_it(server_url: str, fresh_db_url: str) -> None:
    appropriation = 1_000_000 * YUAN
    settings = Settings(
        database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0, appropriation_fen=appropriation
    )
    engine = make_engine(fresh_db_url, settings)
    try:
        admin = bearer(await create_key(engine, Role.ADMIN))
        async with running_app(settings) as client:
            entity = await create_entity(engine)
            budget = await client.put(
                f"/v1/programs/{SPACE}/budgets/{YEAR}", headers=admin, json={"amount_fen": 700_000 * YUAN}
            )
            assert budget.status_code == 200, budget.text

            async def record(amount_yuan: int, draws: bool = True, year: int = YEAR) -> httpx.Response:
                return await client.post(
                    "/v1/external-awards",
                    headers=admin,
                    json={
                        "entity_id": entity,
                        "basis_ref": f"project:A-{uuid.uuid4().hex[:10]}",
                        "policy": "art. 14 talent support",
                        "amount_fen": amount_yuan * YUAN,
                        "awarded_on": f"{year}-03-01",
                        "draws_appropriation": draws,
                    },
                )

            first = await record(200_000)
            assert first.status_code == 201, first.text
            assert first.json()["draws_appropriation"] and first.json()["draw_entry_id"]
            # 700,000 in the budget + 200,000 drawn: 100,000 left, 100,001 is one fen too many
            assert_problem(await record(100_001), 409, "appropriation_exceeded")
            assert (await record(500_000, draws=False)).status_code == 201  # recorded only: draws nothing
            # and a budget cannot grow into what the draws took
            assert_problem(
                await client.put(
                    f"/v1/programs/{SPACE}/budgets/{YEAR}", headers=admin, json={"amount_fen": 800_001 * YUAN}
                ),
                409,
                "appropriation_exceeded",
            )
            exact = await record(100_000)
            assert exact.status_code == 201, exact.text
            # the reversal returns the draw to the appropriation, so the room is there again
            reversed_ = await client.post(
                f"/v1/external-awards/{first.json()['id']}/reverse",
                headers=admin,
                json={"reason": "paid in error", **ADMIN_GROUNDS},
            )
            assert reversed_.status_code == 200 and reversed_.json()["return_entry_id"], reversed_.text
            metadata = await entry_metadata(engine, int(reversed_.json()["return_entry_id"]))
            assert metadata["grounds"] == "administrative"
            assert (await record(200_000)).status_code == 201
            assert_problem(await record(1), 409, "appropriation_exceeded")
            # another year has its own appropriation
            assert (await record(300_000, year=YEAR + 1)).status_code == 201
            # a sanctioned entity is paid nothing new under any article (with room in the appropriation again,
            # the refusal is the sanction's)
            await sanction(engine, entity)
            freed = await client.put(f"/v1/programs/{SPACE}/budgets/{YEAR}", headers=admin, json={"amount_fen": 0})
            assert freed.status_code == 200, freed.text
            assert_problem(await record(1), 409, "entity_sanctioned")
            assert (await record(1, draws=False)).status_code == 201  # a fact from elsewhere is still recorded
    finally:
        await engine.dispose()


async def sanction(engine: AsyncEngine, entity: str) -> None:
    """A sanction in force from today, as a misconduct decision records it."""
    today = shanghai_date(datetime.now(UTC))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sanction (id, entity_id, decided_on, until, reason, source_kind, source_id) "
                "VALUES (:id, :e, :d, :u, 'misuse', 'voucher', 'vch_test')"
            ),
            {"id": "san_" + uuid.uuid4().hex[:24], "e": entity, "d": today, "u": sanction_until(today, 3)},
        )


async def test_automatic_grant_skips_a_sanctioned_entity(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 2_000_000 * YUAN)
    provider = await create_entity(engine, kind="provider")
    provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    sanctioned, clean = [await create_entity(engine, tags=["innovation_team"]) for _ in range(2)]
    for buyer in (sanctioned, clean):
        reported = await client.post(
            "/v1/purchases",
            headers=provider_key,
            json={
                "buyer_entity_id": buyer,
                "invoice_no": f"AUTO-{buyer[-8:]}",
                "category": "compute",
                "amount_fen": 1_500_000 * YUAN,
                "purchased_on": f"{YEAR - 1}-04-01",
            },
        )
        assert reported.status_code == 201, reported.text
    await sanction(engine, sanctioned)
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    state = transport.app.state  # type: ignore[attr-defined]
    assert await grant_automatic(state, sanctioned) is False
    assert await grant_automatic(state, clean) is True
    held = (await client.get("/v1/vouchers", headers=admin, params={"holder_entity_id": sanctioned})).json()
    assert held["data"] == []
