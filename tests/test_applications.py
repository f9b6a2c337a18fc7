"""Applications through the real app: evaluation by POLICY.md, approval issuing from the budget, and the
limits that hold under concurrent approvals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR, expected_expiry
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.budgets import budget_account

YUAN = 100


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def fund(client: httpx.AsyncClient, admin: dict[str, str], program: str, year: int, amount_fen: int) -> None:
    """Add `amount_fen` to a program-year budget."""
    path = f"/v1/programs/{program}/budgets/{year}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    response = await client.put(path, json={"amount_fen": current + amount_fen}, headers=admin)
    assert response.status_code == 200, response.text


async def apply(
    client: httpx.AsyncClient, headers: dict[str, str], program: str, entity: str, year: int, basis: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": year, "basis": basis},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def line(
    provider: str, invoice: str, amount_yuan: int, on: str = f"{CURRENT_YEAR - 1}-03-01", category: str = "compute"
) -> dict[str, Any]:
    return {
        "provider_entity_id": provider,
        "invoice_no": invoice,
        "category": category,
        "amount_fen": amount_yuan * YUAN,
        "purchased_on": on,
    }


async def test_compute_purchase_excludes_lines_tops_up_and_never_double_counts(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR  # the award reimburses last year's purchases
    await fund(client, admin, "compute.purchase", year, 5_000_000 * YUAN)
    applicant = await create_entity(engine)
    provider = await create_entity(engine, kind="provider")
    sister = await create_entity(engine, kind="provider")
    parent = await create_entity(engine)
    for controlled in (applicant, sister):  # one parent controls the applicant and a provider
        response = await client.post(
            "/v1/affiliations",
            headers=admin,
            json={
                "from_entity_id": parent,
                "to_entity_id": controlled,
                "kind": "equity",
                "equity_pct": "60.00",
                "valid_from": "2020-01-01",
            },
        )
        assert response.status_code == 201, response.text
    provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    reported = await client.post(
        "/v1/purchases",
        headers=provider_key,
        json={
            "buyer_entity_id": applicant,
            "invoice_no": "A-1",
            "category": "compute",
            "amount_fen": 900_000 * YUAN,  # more than claimed: flagged; a report caps, never raises, a line
            "purchased_on": f"{year - 1}-03-01",
        },
    )
    assert reported.status_code == 201, reported.text

    first = await apply(
        client,
        admin,
        "compute.purchase",
        applicant,
        year,
        {
            "purchases": [
                line(provider, "A-1", 800_000),
                line(provider, "A-2", 100_000, category="storage"),
                line(provider, "A-3", 300_000, on=f"{year - 2}-12-31"),
                line(sister, "S-1", 500_000),
            ]
        },
    )
    computed = first["computed"]
    assert computed["eligible_fen"] == 800_000 * YUAN and computed["award_fen"] == 0  # not above 1,000,000 元
    reasons = {e["document"]: e["reason"] for e in computed["excluded"]}
    assert reasons == {
        f"doc:{provider}:A-2": "category",
        f"doc:{provider}:A-3": "outside_prior_year",
        f"doc:{sister}:S-1": "affiliated_provider",
    }
    affiliated = next(e for e in computed["excluded"] if e["reason"] == "affiliated_provider")
    assert {r["to_entity_id"] for r in affiliated["path"]} >= {applicant, sister}
    assert any("A-1" in flag and "90000000" in flag for flag in computed["flags"])
    assert_problem(await client.post(f"/v1/applications/{first['id']}/approve", headers=admin), 409, "nothing_owed")
    assert (
        await client.post(
            f"/v1/applications/{first['id']}/reject", headers=admin, json={"reason": "below the threshold"}
        )
    ).json()["status"] == "rejected"

    second = await apply(
        client,
        admin,
        "compute.purchase",
        applicant,
        year,
        {"purchases": [line(provider, "A-1", 800_000), line(provider, "A-4", 400_000)]},
    )
    assert second["computed"]["award_fen"] == 600_000 * YUAN  # 50% of 1,200,000 元
    approving = datetime.now(UTC)
    issued = (await client.post(f"/v1/applications/{second['id']}/approve", headers=admin)).json()
    approved = datetime.now(UTC)
    assert (issued["kind"], issued["face_value_fen"], issued["holder_entity_id"]) == (
        "voucher",
        600_000 * YUAN,
        applicant,
    )
    # the end of the year or 90 days after issue, whichever is later (in December, the 90 days)
    expires_at = datetime.fromisoformat(issued["expires_at"])
    assert expected_expiry(year, approving) <= expires_at <= expected_expiry(year, approved)

    third = await apply(
        client,
        admin,
        "compute.purchase",
        applicant,
        year,
        {"purchases": [line(provider, "A-1", 800_000), line(provider, "B-1", 2_000_000)]},
    )
    excluded = {e["document"]: e["reason"] for e in third["computed"]["excluded"]}
    assert excluded == {f"doc:{provider}:A-1": "basis_already_used"}
    # the year's entitlement: 50% of 3,200,000 元 on record = 1,600,000 元, less the 600,000 元 issued
    assert third["computed"]["award_fen"] == 1_000_000 * YUAN
    topped = (await client.post(f"/v1/applications/{third['id']}/approve", headers=admin)).json()
    assert topped["face_value_fen"] == 1_000_000 * YUAN

    budget = (await client.get(f"/v1/programs/compute.purchase/budgets/{year}", headers=admin)).json()
    assert budget["committed_fen"] >= 1_600_000 * YUAN
    async with engine.connect() as conn:
        assert await Ledger().verify_cached_balances(conn) == []


async def test_no_double_support_across_programs_and_policies(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR
    await fund(client, admin, "data.trusted_space", year, 1_000_000 * YUAN)
    await fund(client, admin, "model.industry_rollout", year, 1_000_000 * YUAN)
    lead = await create_entity(engine, kind="association")
    project = f"P-{lead[-8:]}"
    external = await client.post(
        "/v1/external-awards",
        headers=admin,
        json={
            "entity_id": lead,
            "basis_ref": f"project:{project}-X",
            "policy": "穗府办 2025 第 1 号",
            "amount_fen": 100 * YUAN,
            "awarded_on": f"{year - 1}-05-01",
        },
    )
    assert external.status_code == 201, external.text
    claimed = await apply(
        client,
        admin,
        "data.trusted_space",
        lead,
        year,
        {"project_ref": f"{project}-X", "investment_fen": 1_000_000 * YUAN},
    )
    assert claimed["computed"]["award_fen"] == 0
    assert claimed["computed"]["excluded"][0]["reason"] == "basis_already_used"
    assert external.json()["id"] in claimed["computed"]["excluded"][0]["detail"]
    problem = assert_problem(
        await client.post(f"/v1/applications/{claimed['id']}/approve", headers=admin), 409, "basis_already_used"
    )
    assert external.json()["id"] in problem["detail"]

    space = await apply(
        client, admin, "data.trusted_space", lead, year, {"project_ref": project, "investment_fen": 1_000_000 * YUAN}
    )
    rollout = await apply(
        client,
        admin,
        "model.industry_rollout",
        lead,
        year,
        {"project_ref": project, "deployment_cost_fen": 2_000_000 * YUAN},
    )
    assert space["computed"]["award_fen"] == 300_000 * YUAN
    first = await client.post(f"/v1/applications/{space['id']}/approve", headers=admin)
    assert first.status_code == 201 and first.json()["kind"] == "payout"
    problem = assert_problem(
        await client.post(f"/v1/applications/{rollout['id']}/approve", headers=admin), 409, "basis_already_used"
    )
    assert space["id"] in problem["detail"]


async def test_concurrent_approvals_never_exceed_the_entity_year_cap(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR
    await fund(client, admin, "data.pilot_dataset", year, 10_000_000 * YUAN)
    holder = await create_entity(engine)
    ids = [
        (
            await apply(
                client,
                admin,
                "data.pilot_dataset",
                holder,
                year,
                {"project_ref": f"PD-{holder[-6:]}-{i}", "pilot_base": "国家人工智能行业应用中试基地"},
            )
        )["id"]
        for i in range(6)
    ]
    results = await asyncio.gather(
        *(client.post(f"/v1/applications/{i}/approve", headers=admin, json={"award_fen": 600_000 * YUAN}) for i in ids)
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 201, 409, 409, 409], [r.text for r in results]
    assert all(r.json()["code"] == "cap_exceeded" for r in results if r.status_code == 409)
    async with engine.connect() as conn:
        held = await conn.scalar(
            text("SELECT sum(face_value_fen) FROM voucher WHERE holder_entity_id = :h"), {"h": holder}
        )
    assert held == 1_800_000 * YUAN  # within 2,000,000 元 per entity-year


async def test_concurrent_approvals_never_exceed_the_yearly_award_limit(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR  # scenario.benchmark is awarded in this file only: the ten a year are its own
    await fund(client, admin, "scenario.benchmark", year, 10_000_000 * YUAN)
    ids = []
    for i in range(12):
        provider = await create_entity(engine, kind="institution")
        ids.append(
            (
                await apply(
                    client,
                    admin,
                    "scenario.benchmark",
                    provider,
                    year,
                    {"scenario_ref": f"SC-{provider[-8:]}-{i}", "field": "smart_manufacturing"},
                )
            )["id"]
        )
    results = await asyncio.gather(
        *(client.post(f"/v1/applications/{i}/approve", headers=admin, json={"award_fen": 100_000 * YUAN}) for i in ids)
    )
    assert sorted(r.status_code for r in results) == [201] * 10 + [409] * 2, [r.text for r in results]
    assert {r.json()["code"] for r in results if r.status_code == 409} == {"award_limit_reached"}


async def test_concurrent_approvals_never_exceed_the_budget(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR
    # other tests fund this program-year too: top it up so that exactly 1,000,000 元 is available
    path = f"/v1/programs/model.industry_rollout/budgets/{year}"
    held = (await client.get(path, headers=admin)).json()
    exact = held["budget_fen"] - held["available_fen"] + 1_000_000 * YUAN
    assert (await client.put(path, json={"amount_fen": exact}, headers=admin)).status_code == 200
    ids = []
    for i in range(5):
        lead = await create_entity(engine, kind="department")
        ids.append(
            (
                await apply(
                    client,
                    admin,
                    "model.industry_rollout",
                    lead,
                    year,
                    {"project_ref": f"R-{lead[-8:]}-{i}", "deployment_cost_fen": 1_000_000 * YUAN},
                )
            )["id"]
        )
    results = await asyncio.gather(*(client.post(f"/v1/applications/{i}/approve", headers=admin) for i in ids))
    assert sorted(r.status_code for r in results) == [201] * 3 + [409] * 2, [r.text for r in results]
    assert {r.json()["code"] for r in results if r.status_code == 409} == {"budget_exhausted"}
    refused = [i for i, r in zip(ids, results, strict=True) if r.status_code == 409]
    for application_id in refused:  # a refused approval changes nothing
        assert (await client.get(f"/v1/applications/{application_id}", headers=admin)).json()["status"] == "submitted"
    async with engine.connect() as conn:
        budget = await Ledger().balance(conn, budget_account("model.industry_rollout", year))
        claims = await conn.scalar(
            text("SELECT count(*) FROM basis_claim WHERE application_id = ANY(:ids)"), {"ids": refused}
        )
    assert budget.available_fen == 100_000 * YUAN and claims == 0


async def test_first_purchase_needs_a_filed_model_and_one_first_purchaser(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    year = CURRENT_YEAR
    await fund(client, admin, "model.first_filing", year, 2_000_000 * YUAN)
    await fund(client, admin, "model.first_purchase", year, 5_000_000 * YUAN)
    developer = await create_entity(engine)
    buyer, other_buyer = await create_entity(engine), await create_entity(engine)
    model = f"M-{developer[-8:]}"
    basis = {
        "model_ref": model,
        "vendor_entity_id": developer,
        "industry": "healthcare",
        "contract_no": f"C-{model}",
        "contract_fen": 4_000_000 * YUAN,
        "rd_project": True,
    }
    unfiled = await apply(client, admin, "model.first_purchase", buyer, year, basis)
    assert unfiled["computed"]["award_fen"] == 0 and "not on record as filed" in unfiled["computed"]["reasons"][0]
    filing = await apply(
        client, admin, "model.first_filing", developer, year, {"model_ref": model, "filing_no": f"Guangdong-{model}"}
    )
    assert_problem(
        await client.post(f"/v1/applications/{filing['id']}/approve", headers=admin, json={}), 422, "validation_error"
    )  # a reviewer-set program needs the reviewer's figure
    assert_problem(
        await client.post(
            f"/v1/applications/{filing['id']}/approve", headers=admin, json={"award_fen": 1_000_000 * YUAN + 1}
        ),
        409,
        "cap_exceeded",
    )
    assert (
        await client.post(f"/v1/applications/{filing['id']}/approve", headers=admin, json={"award_fen": 800_000 * YUAN})
    ).status_code == 201
    bought = await apply(client, admin, "model.first_purchase", buyer, year, basis)
    assert bought["computed"]["award_fen"] == 1_500_000 * YUAN  # 45%, uplifted cap 1,500,000 元
    voucher = (await client.post(f"/v1/applications/{bought['id']}/approve", headers=admin)).json()
    assert voucher["face_value_fen"] == 1_500_000 * YUAN
    second = await apply(
        client,
        admin,
        "model.first_purchase",
        other_buyer,
        year,
        {**basis, "contract_no": f"C2-{model}", "rd_project": False},
    )
    assert second["computed"]["award_fen"] == 0
    assert any("first purchaser" in r for r in second["computed"]["reasons"])
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT vendor_entity_id, redemption_rate_bp FROM voucher WHERE id = :v"), {"v": voucher["id"]}
            )
        ).one()
    assert (row.vendor_entity_id, row.redemption_rate_bp) == (developer, 4500)


async def test_ineligible_entities_and_closed_years_get_nothing(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    shenzhen = await create_entity(engine, division="440300")
    application = await apply(
        client,
        admin,
        "data.trusted_space",
        shenzhen,
        2027,
        {"project_ref": f"SZ-{shenzhen[-8:]}", "investment_fen": 1_000_000 * YUAN},
    )
    assert application["computed"]["award_fen"] == 0
    assert "art. 25" in application["computed"]["reasons"][0]
    guangzhou = await create_entity(engine)
    past = await apply(
        client,
        admin,
        "data.trusted_space",
        guangzhou,
        2026,
        {"project_ref": f"GZ-{guangzhou[-8:]}", "investment_fen": 1_000_000 * YUAN},
    )
    assert past["computed"]["award_fen"] == 300_000 * YUAN


async def test_who_sees_and_does_what(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    mine, theirs = await create_entity(engine), await create_entity(engine)
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=mine))
    provider = bearer(await create_key(engine, Role.PROVIDER))
    compute_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    basis = {"project_ref": f"V-{mine[-8:]}", "investment_fen": 100 * YUAN}
    own = await apply(client, enterprise, "data.trusted_space", mine, 2027, basis)
    other = await apply(client, admin, "data.trusted_space", theirs, 2027, {**basis, "project_ref": f"W-{theirs[-8:]}"})
    assert (await client.get(f"/v1/applications/{own['id']}", headers=enterprise)).status_code == 200
    assert_problem(await client.get(f"/v1/applications/{other['id']}", headers=enterprise), 404, "not_found")
    listed = (await client.get("/v1/applications", headers=enterprise, params={"entity_id": theirs})).json()
    assert {a["applicant_entity_id"] for a in listed["data"]} == {mine}
    assert_problem(
        await client.post(
            "/v1/applications",
            headers=enterprise,
            json={"program": "data.trusted_space", "applicant_entity_id": theirs, "year": 2027, "basis": basis},
        ),
        403,
        "forbidden",
    )
    assert_problem(await client.post(f"/v1/applications/{own['id']}/approve", headers=enterprise), 403, "forbidden")
    assert_problem(await client.post(f"/v1/applications/{own['id']}/approve", headers=compute_admin), 403, "forbidden")
    assert_problem(await client.get("/v1/applications", headers=provider), 403, "forbidden")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"program": "no.such", "year": 2027, "basis": {}}, "validation_error"),
        (
            {"program": "data.trusted_space", "year": 2027, "basis": {"project_ref": "X", "investment_fen": -1}},
            "validation_error",
        ),
        (
            {"program": "data.trusted_space", "year": 2027, "basis": {"project_ref": "X", "investment_fen": 1.5}},
            "validation_error",
        ),
        (
            {"program": "data.trusted_space", "year": 2027, "basis": {"project_ref": "X", "investment_fen": "100"}},
            "validation_error",
        ),
        (
            {"program": "data.trusted_space", "year": 2027, "basis": {"project_ref": "X", "investment_fen": 1, "x": 1}},
            "validation_error",
        ),
        (
            {"program": "data.trusted_space", "year": 2031, "basis": {"project_ref": "X", "investment_fen": 1}},
            "outside_policy_term",
        ),
        (
            {
                "program": "compute.purchase",
                "year": 2027,
                "basis": {
                    "purchases": [
                        {
                            "provider_entity_id": "ent_" + "0" * 24,
                            "invoice_no": "I",
                            "category": "compute",
                            "amount_fen": 1,
                            "purchased_on": "2026-01-01",
                        }
                    ]
                },
            },
            "validation_error",
        ),
        ({"program": "compute.purchase", "year": 2027, "basis": {"purchases": []}}, "validation_error"),
    ],
)
async def test_bad_applications_are_refused_and_change_nothing(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, body: dict[str, Any], code: str
) -> None:
    applicant = await create_entity(engine)
    async with engine.connect() as conn:
        before = await conn.scalar(text("SELECT count(*) FROM application"))
    response = await client.post("/v1/applications", headers=admin, json={**body, "applicant_entity_id": applicant})
    assert_problem(response, 422, code)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM application")) == before


async def test_purchases_and_external_awards_refuse_bad_input_and_wrong_callers(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    buyer = await create_entity(engine)
    provider = bearer(await create_key(engine, Role.PROVIDER))
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=buyer))
    sale = {
        "buyer_entity_id": buyer,
        "invoice_no": f"X-{buyer[-6:]}",
        "category": "compute",
        "amount_fen": 100,
        "purchased_on": "2026-02-01",
    }
    assert_problem(await client.post("/v1/purchases", headers=admin, json=sale), 403, "forbidden")
    assert_problem(await client.post("/v1/purchases", headers=enterprise, json=sale), 403, "forbidden")
    for bad in (
        {**sale, "amount_fen": -1},
        {**sale, "amount_fen": 1.5},
        {**sale, "category": "dataset"},
        {**sale, "buyer_entity_id": "ent_" + "1" * 24},
        {**sale, "purchased_on": "yesterday"},
        {**sale, "extra": True},
    ):
        response = await client.post("/v1/purchases", headers=provider, json=bad)
        assert_problem(response, 422, "validation_error")
    assert (await client.post("/v1/purchases", headers=provider, json=sale)).status_code == 201
    assert_problem(await client.post("/v1/purchases", headers=provider, json=sale), 409, "conflict")

    award = {
        "entity_id": buyer,
        "basis_ref": f"project:E-{buyer[-6:]}",
        "policy": "another policy",
        "amount_fen": 100,
        "awarded_on": "2026-01-05",
    }
    assert_problem(await client.post("/v1/external-awards", headers=enterprise, json=award), 403, "forbidden")
    for bad in (
        {**award, "basis_ref": "no-kind"},
        {**award, "basis_ref": "receipt:1"},
        {**award, "amount_fen": 0},
        {**award, "entity_id": "ent_" + "2" * 24},
    ):
        assert_problem(await client.post("/v1/external-awards", headers=admin, json=bad), 422, "validation_error")
    assert (await client.post("/v1/external-awards", headers=admin, json=award)).status_code == 201
    assert_problem(await client.post("/v1/external-awards", headers=admin, json=award), 409, "basis_already_used")


async def test_an_admin_limited_to_voucher_types_records_no_external_award(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """API.md, "Admin scope": an external award claims its basis document against every program (art. 25, no
    double support), so only an admin limited to no voucher type records one."""
    entity = await create_entity(engine)
    limited = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
    award = {
        "entity_id": entity,
        "basis_ref": f"project:S-{entity[-6:]}",
        "policy": "another policy",
        "amount_fen": 100,
        "awarded_on": "2026-01-05",
    }
    assert_problem(await client.post("/v1/external-awards", headers=limited, json=award), 403, "forbidden")
    async with engine.connect() as conn:
        recorded = await conn.scalar(text("SELECT count(*) FROM external_award WHERE entity_id = :e"), {"e": entity})
        claimed = await conn.scalar(
            text("SELECT count(*) FROM basis_claim WHERE document = :d"), {"d": award["basis_ref"]}
        )
    assert (recorded, claimed) == (0, 0)
    assert (await client.post("/v1/external-awards", headers=admin, json=award)).status_code == 201


async def test_approval_with_an_idempotency_key_answers_retries_the_same(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "data.trusted_space", CURRENT_YEAR, 400_000 * YUAN)
    lead = await create_entity(engine)
    submitted = await apply(
        client,
        admin,
        "data.trusted_space",
        lead,
        CURRENT_YEAR,
        {"project_ref": f"I-{lead[-8:]}", "investment_fen": 1_000_000 * YUAN},
    )
    path = f"/v1/applications/{submitted['id']}/approve"
    first = await client.post(path, headers={**admin, "Idempotency-Key": f"approve-{lead}"})
    again = await client.post(path, headers={**admin, "Idempotency-Key": f"approve-{lead}"})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert_problem(await client.post(path, headers=admin), 409, "conflict")  # no key: a second approval is refused
    assert_problem(
        await client.post(path, headers={**admin, "Idempotency-Key": f"approve-{lead}"}, json={"award_fen": 1}),
        422,
        "idempotency_conflict",
    )
    async with engine.connect() as conn:
        payouts = await conn.scalar(
            text("SELECT count(*) FROM payout WHERE application_id = :a"), {"a": submitted["id"]}
        )
    assert payouts == 1
