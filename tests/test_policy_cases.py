"""Issue 13's acceptance cases, end to end through the real app: each is one way money was paid that was
not owed (POLICY.md, "Basis documents, sanctions and timing"), now refused or deducted.

Every case runs in the current program year (Asia/Shanghai): an award for a later year cannot be approved
before it begins, so the suite follows the real clock.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.rules import program_year

YUAN = 100
YEAR = program_year(datetime.now(UTC))


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
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any], year: int = YEAR
) -> httpx.Response:
    return await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": year, "basis": basis},
        headers=admin,
    )


async def award(
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any], **approve: Any
) -> httpx.Response:
    """Submit and approve; the approval's response."""
    submitted = await submit(client, admin, program, entity, basis)
    assert submitted.status_code == 201, submitted.text
    return await client.post(f"/v1/applications/{submitted.json()['id']}/approve", json=approve or None, headers=admin)


def invoice(provider: str, number: str, amount_yuan: int, category: str = "compute", on: str = "") -> dict[str, Any]:
    return {
        "provider_entity_id": provider,
        "invoice_no": number,
        "category": category,
        "amount_fen": amount_yuan * YUAN,
        "purchased_on": on or f"{YEAR - 1}-06-01",
    }


async def relate(
    client: httpx.AsyncClient, admin: dict[str, str], holder: str, held: str, valid_from: date, valid_to: date | None
) -> None:
    body: dict[str, Any] = {
        "from_entity_id": holder,
        "to_entity_id": held,
        "kind": "equity",
        "equity_pct": "100",
        "valid_from": valid_from.isoformat(),
    }
    if valid_to is not None:
        body["valid_to"] = valid_to.isoformat()
    response = await client.post("/v1/affiliations", json=body, headers=admin)
    assert response.status_code == 201, response.text


async def filed_model(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, model: str) -> None:
    """A model on record as filed: its first filing supports an award under another policy."""
    developer = await create_entity(engine)
    response = await client.post(
        "/v1/external-awards",
        json={
            "entity_id": developer,
            "basis_ref": f"model:{model}",
            "policy": "national filing support",
            "amount_fen": 100 * YUAN,
            "awarded_on": f"{YEAR}-01-02",
        },
        headers=admin,
    )
    assert response.status_code == 201, response.text


def first_purchase(model: str, vendor: str, contract: str, fen: int) -> dict[str, Any]:
    return {
        "model_ref": model,
        "vendor_entity_id": vendor,
        "industry": "manufacturing",
        "contract_no": contract,
        "contract_fen": fen,
        "rd_project": False,
    }


async def test_one_paper_supports_one_award_whatever_it_is_called(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 1_000_000 * YUAN)
    await fund(client, admin, "model.first_purchase", 2_000_000 * YUAN)
    buyer, vendor = await create_entity(engine), await create_entity(engine, kind="provider")
    number = f"P-{buyer[-8:]}"
    issued = await award(client, admin, "compute.purchase", buyer, {"purchases": [invoice(vendor, number, 1_500_000)]})
    assert issued.status_code == 201, issued.text
    model = f"M-{buyer[-8:]}"
    await filed_model(client, admin, engine, model)
    # the invoice behind the compute award, offered again as a model contract with the same vendor
    again = await award(
        client, admin, "model.first_purchase", buyer, first_purchase(model, vendor, number, 150_000_000)
    )
    assert_problem(again, 409, "basis_already_used")
    # two vendors whose contract numbers collide are two documents
    other_model = f"N-{buyer[-8:]}"
    await filed_model(client, admin, engine, other_model)
    first_vendor, second_vendor = await create_entity(engine), await create_entity(engine)
    shared_no = f"C-{buyer[-8:]}"
    a = await award(
        client,
        admin,
        "model.first_purchase",
        await create_entity(engine),
        {**first_purchase(other_model, first_vendor, shared_no, 10_000_000), "industry": "finance"},
    )
    b = await award(
        client,
        admin,
        "model.first_purchase",
        await create_entity(engine),
        {**first_purchase(other_model, second_vendor, shared_no, 10_000_000), "industry": "energy"},
    )
    assert a.status_code == 201, a.text
    assert b.status_code == 201, b.text


async def test_an_invoice_is_claimed_whole_and_never_counted_twice(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 2_000_000 * YUAN)
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    split = f"S-{buyer[-8:]}"
    issued = await award(
        client,
        admin,
        "compute.purchase",
        buyer,
        {
            "purchases": [
                invoice(provider, f"A-{buyer[-8:]}", 1_200_000),
                invoice(provider, split, 300_000, category="storage"),
            ]
        },
    )
    assert issued.status_code == 201, issued.text
    # the invoice whose storage line was excluded is claimed all the same: its "compute line" earns nothing
    later = await submit(client, admin, "compute.purchase", buyer, {"purchases": [invoice(provider, split, 300_000)]})
    assert later.status_code == 201, later.text
    excluded = later.json()["computed"]["excluded"]
    assert [e["reason"] for e in excluded] == ["basis_already_used"], excluded
    assert later.json()["computed"]["eligible_fen"] == 0
    # one invoice listed twice in one application is refused, not summed
    twice = f"T-{buyer[-8:]}"
    other = await create_entity(engine)
    assert_problem(
        await submit(
            client,
            admin,
            "compute.purchase",
            other,
            {"purchases": [invoice(provider, twice, 1_500_000), invoice(provider, twice, 1_500_000)]},
        ),
        422,
        "duplicate_basis",
    )


async def test_a_reported_sale_caps_what_its_invoice_counts(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    number = f"R-{buyer[-8:]}"
    reported = await client.post(
        "/v1/purchases",
        json={
            "buyer_entity_id": buyer,
            "invoice_no": number,
            "category": "compute",
            "amount_fen": 1_500_000 * YUAN,
            "purchased_on": f"{YEAR - 1}-06-01",
        },
        headers=provider_key,
    )
    assert reported.status_code == 201, reported.text
    claimed = await submit(
        client, admin, "compute.purchase", buyer, {"purchases": [invoice(provider, number, 3_000_000)]}
    )
    assert claimed.status_code == 201, claimed.text
    computed = claimed.json()["computed"]
    assert computed["eligible_fen"] == 1_500_000 * YUAN, computed
    assert computed["award_fen"] == 750_000 * YUAN
    assert computed["flags"], computed


async def test_what_a_voucher_paid_is_not_the_entitys_own_purchase(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 1_000_000 * YUAN)
    holder, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    voucher = await award(
        client, admin, "compute.purchase", holder, {"purchases": [invoice(provider, f"V-{holder[-8:]}", 2_000_000)]}
    )
    assert voucher.status_code == 201, voucher.text
    token = (await client.post(f"/v1/vouchers/{voucher.json()['id']}/token", headers=admin)).json()["token"]
    provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    spent = f"W-{holder[-8:]}"
    redeemed = await client.post(
        "/v1/redemptions",
        headers={**provider_key, "Idempotency-Key": spent},
        json={
            "token": token,
            "invoice_no": spent,
            "lines": [{"category": "compute", "amount_fen": 1_500_000 * YUAN, "description": "GPU hours"}],
        },
    )
    assert redeemed.status_code == 201, redeemed.text
    assert redeemed.json()["subsidy_fen"] == 1_000_000 * YUAN  # the voucher paid two thirds of the invoice
    # next year's application offers the same invoice as the entity's own spending: only what it paid counts
    today = datetime.now(UTC).astimezone().date()
    offered = await submit(
        client,
        admin,
        "compute.purchase",
        holder,
        {"purchases": [invoice(provider, spent, 1_500_000, on=today.isoformat())]},
        year=YEAR + 1,
    )
    assert offered.status_code == 201, offered.text
    computed = offered.json()["computed"]
    assert computed["eligible_fen"] == 500_000 * YUAN, computed
    assert computed["award_fen"] == 0  # 500,000 元 does not exceed the 1,000,000 元 threshold
    assert [d["amount_fen"] for d in computed["deductions"]] == [1_000_000 * YUAN], computed


async def test_a_vendor_is_never_its_own_first_purchaser(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "model.first_purchase", 1_000_000 * YUAN)
    vendor = await create_entity(engine, kind="provider")
    model = f"O-{vendor[-8:]}"
    await filed_model(client, admin, engine, model)
    itself = await submit(
        client, admin, "model.first_purchase", vendor, first_purchase(model, vendor, "K-1", 10_000_000)
    )
    assert_problem(itself, 403, "affiliated_party")
    subsidiary = await create_entity(engine)
    await relate(client, admin, vendor, subsidiary, date(YEAR - 3, 1, 1), None)
    refused = await submit(
        client, admin, "model.first_purchase", subsidiary, first_purchase(model, vendor, "K-2", 10_000_000)
    )
    body = assert_problem(refused, 403, "affiliated_party")
    assert vendor in refused.text and subsidiary in refused.text, body
    # a purchaser that becomes the vendor's affiliate after its award cannot spend the voucher there
    buyer = await create_entity(engine)
    issued = await award(client, admin, "model.first_purchase", buyer, first_purchase(model, vendor, "K-3", 10_000_000))
    assert issued.status_code == 201, issued.text
    await relate(client, admin, vendor, buyer, datetime.now(UTC).date() - timedelta(days=1), None)
    token = (await client.post(f"/v1/vouchers/{issued.json()['id']}/token", headers=admin)).json()["token"]
    vendor_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=vendor))
    refused_redemption = await client.post(
        "/v1/redemptions",
        headers={**vendor_key, "Idempotency-Key": f"self-{buyer[-8:]}"},
        json={
            "token": token,
            "invoice_no": f"K-3-{buyer[-8:]}",
            "lines": [{"category": "model_purchase", "amount_fen": 1_000_000 * YUAN, "description": "licence"}],
        },
    )
    assert_problem(refused_redemption, 403, "affiliated_party")


async def test_a_misconduct_sanction_holds_and_administrative_grounds_do_not_sanction(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 2_000_000 * YUAN)
    holder, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    issued = await award(
        client, admin, "compute.purchase", holder, {"purchases": [invoice(provider, f"X-{holder[-8:]}", 2_000_000)]}
    )
    assert issued.status_code == 201, issued.text
    assert_problem(
        await client.post(f"/v1/vouchers/{issued.json()['id']}/revoke", json={"reason": "misuse"}, headers=admin),
        422,
        "validation_error",
    )
    revoked = await client.post(
        f"/v1/vouchers/{issued.json()['id']}/revoke",
        json={"reason": "spent on storage", "grounds": "misconduct"},
        headers=admin,
    )
    assert revoked.status_code == 200, revoked.text
    # a trivial follow-up application no longer re-issues the voucher
    follow_up = await submit(
        client, admin, "compute.purchase", holder, {"purchases": [invoice(provider, f"Y-{holder[-8:]}", 10)]}
    )
    body = assert_problem(follow_up, 409, "entity_sanctioned")
    entity = (await client.get(f"/v1/entities/{holder}", headers=admin)).json()
    [sanction] = entity["sanctions"]
    assert sanction["id"] in body["detail"] or sanction["id"] in follow_up.text
    assert date.fromisoformat(sanction["until"]).year == date.fromisoformat(sanction["decided_on"]).year + 3
    # lifted with a reason by an unrestricted admin: applications are heard again, but the cap room stays used
    lifted = await client.post(f"/v1/sanctions/{sanction['id']}/lift", json={"reason": "appeal upheld"}, headers=admin)
    assert lifted.status_code == 200, lifted.text
    again = await submit(
        client, admin, "compute.purchase", holder, {"purchases": [invoice(provider, f"Z-{holder[-8:]}", 2_000_000)]}
    )
    assert again.status_code == 201, again.text
    # entitlement 50% of 4,000,000 元 on record = 2,000,000 元, less the 1,000,000 元 voucher whose cap room
    # the misconduct kept used (an administrative revocation would have given it back: 2,000,000 元)
    assert again.json()["computed"]["award_fen"] == 1_000_000 * YUAN, again.json()["computed"]


async def test_a_fraudulent_award_reversed_cannot_be_earned_again_on_the_same_invoices(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "data.trusted_space", 1_000_000 * YUAN)
    cheat = await create_entity(engine)
    project = f"F-{cheat[-8:]}"
    paid = await award(
        client, admin, "data.trusted_space", cheat, {"project_ref": project, "investment_fen": 10_000_000}
    )
    assert paid.status_code == 201, paid.text
    application = paid.json()["application_id"]
    reversed_ = await client.post(
        f"/v1/applications/{application}/reverse",
        json={"reason": "false invoices", "grounds": "misconduct"},
        headers=admin,
    )
    assert reversed_.status_code == 200, reversed_.text
    # the same project, claimed by someone else: the document stays claimed for ever
    other = await create_entity(engine)
    refused = await award(
        client, admin, "data.trusted_space", other, {"project_ref": project, "investment_fen": 10_000_000}
    )
    assert_problem(refused, 409, "basis_already_used")


async def test_jiu_gao_can_choose_a_higher_award_over_a_smaller_one_elsewhere(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "data.trusted_space", 1_000_000 * YUAN)
    lead = await create_entity(engine)
    project = f"J-{lead[-8:]}"
    external = await client.post(
        "/v1/external-awards",
        json={
            "entity_id": lead,
            "basis_ref": f"project:{project}",
            "policy": "district support",
            "amount_fen": 100 * YUAN,
            "awarded_on": f"{YEAR}-01-05",
        },
        headers=admin,
    )
    assert external.status_code == 201, external.text
    blocked = await award(
        client, admin, "data.trusted_space", lead, {"project_ref": project, "investment_fen": 500_000_000}
    )
    assert_problem(blocked, 409, "basis_already_used")
    reversed_ = await client.post(
        f"/v1/external-awards/{external.json()['id']}/reverse",
        json={"reason": "就高: the applicant chose the city's award", "grounds": "administrative"},
        headers=admin,
    )
    assert reversed_.status_code == 200, reversed_.text
    chosen = await award(
        client, admin, "data.trusted_space", lead, {"project_ref": project, "investment_fen": 500_000_000}
    )
    assert chosen.status_code == 201, chosen.text
    assert chosen.json()["amount_fen"] == 1_500_000 * YUAN  # 30% of 5,000,000 元


async def test_next_years_award_is_not_approved_before_the_year_begins(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    today = datetime.now(UTC).date().isoformat()
    early = await submit(
        client,
        admin,
        "compute.purchase",
        buyer,
        {"purchases": [invoice(provider, f"E-{buyer[-8:]}", 3_000_000, on=today)]},
        year=YEAR + 1,
    )
    assert early.status_code == 201, early.text
    approved = await client.post(f"/v1/applications/{early.json()['id']}/approve", headers=admin)
    assert approved.status_code == 409, approved.text
    assert str(YEAR + 1) in approved.json()["detail"]


async def test_a_relation_that_ended_within_twelve_months_still_relates(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    buyer = await create_entity(engine)
    recent, old = await create_entity(engine, kind="provider"), await create_entity(engine, kind="provider")
    bought = date(YEAR - 1, 6, 1)
    await relate(client, admin, recent, buyer, date(YEAR - 5, 1, 1), bought - timedelta(days=1))
    # 12 months and one day before the purchase: no longer related
    await relate(client, admin, old, buyer, date(YEAR - 5, 1, 1), date(YEAR - 2, 5, 31))
    submitted = await submit(
        client,
        admin,
        "compute.purchase",
        buyer,
        {"purchases": [invoice(recent, f"L-{buyer[-8:]}", 800_000), invoice(old, f"M-{buyer[-8:]}", 800_000)]},
    )
    assert submitted.status_code == 201, submitted.text
    computed = submitted.json()["computed"]
    assert [(e["reason"], e["amount_fen"]) for e in computed["excluded"]] == [("affiliated_provider", 800_000 * YUAN)]
    assert computed["eligible_fen"] == 800_000 * YUAN


async def test_two_companies_controlled_by_one_person_are_one_group(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    number = f"440106{secrets.randbelow(10**11):011d}X"
    person = await client.post(
        "/v1/entities", json={"kind": "person", "name": "张三", "id_document_no": number}, headers=admin
    )
    assert person.status_code == 201, person.text
    assert number not in person.text
    person_id = person.json()["id"]
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    await relate(client, admin, person_id, buyer, date(YEAR - 3, 1, 1), None)
    await relate(client, admin, person_id, provider, date(YEAR - 3, 1, 1), None)
    check = await client.get("/v1/affiliations/check", params={"a": buyer, "b": provider}, headers=admin)
    assert check.status_code == 200, check.text
    assert check.json()["affiliated"] is True
    assert number not in check.text
