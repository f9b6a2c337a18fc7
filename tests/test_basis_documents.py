"""Basis documents (POLICY.md, "Basis documents, sanctions and timing"; arts. 8, 11, 25): a document is its
counterparty plus its number, it is claimed whole, voucher money and sums above a reported sale are not the
applicant's own purchase, and a model vendor is never its own (or its affiliate's) first purchaser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.applications import new_id
from vouchers.bases import (
    ComputePurchaseBasis,
    DatasetBenchmarkBasis,
    FirstPurchaseBasis,
    document_id,
    documents,
    duplicates,
    external_document,
)
from vouchers.evaluation import Context, evaluate
from vouchers.programs import governing, load_file

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
DEFINITIONS = load_file()


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
    assert (await client.put(path, json={"amount_fen": current + amount_fen}, headers=admin)).status_code == 200


async def submit(
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any], year: int = YEAR
) -> httpx.Response:
    return await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": year, "basis": basis},
        headers=admin,
    )


async def apply(
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any], year: int = YEAR
) -> dict[str, Any]:
    response = await submit(client, admin, program, entity, basis, year)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def approve(client: httpx.AsyncClient, admin: dict[str, str], app_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"/v1/applications/{app_id}/approve", headers=admin, json=body or None)


def line(
    provider: str, invoice: str, yuan: int, category: str = "compute", on: str = f"{YEAR - 1}-04-01"
) -> dict[str, Any]:
    return {
        "provider_entity_id": provider,
        "invoice_no": invoice,
        "category": category,
        "amount_fen": yuan * YUAN,
        "purchased_on": on,
    }


def contract(counterparty: str, number: str, yuan: int, on: str = f"{YEAR - 1}-06-01") -> dict[str, Any]:
    return {"counterparty_entity_id": counterparty, "contract_no": number, "amount_fen": yuan * YUAN, "signed_on": on}


async def relate(client: httpx.AsyncClient, admin: dict[str, str], holder: str, held: str, since: str) -> None:
    response = await client.post(
        "/v1/affiliations",
        headers=admin,
        json={
            "from_entity_id": holder,
            "to_entity_id": held,
            "kind": "equity",
            "equity_pct": "100.00",
            "valid_from": since,
        },
    )
    assert response.status_code == 201, response.text


async def filed_model(client: httpx.AsyncClient, admin: dict[str, str], developer: str) -> str:
    """A model on record as filed (its first filing supports an award)."""
    model = f"M-{developer[-10:]}"
    filing = await apply(
        client, admin, "model.first_filing", developer, {"model_ref": model, "filing_no": f"F-{model}"}
    )
    assert (await approve(client, admin, filing["id"], award_fen=100)).status_code == 201
    return model


def first_purchase(model: str, vendor: str, number: str, industry: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_ref": model,
        "vendor_entity_id": vendor,
        "industry": industry,
        "contract_no": number,
        "contract_fen": 1_000_000 * YUAN,
        "rd_project": False,
        **extra,
    }


# -- pure: the identity and the evaluation -------------------------------------------------------------------

P, Q = "ent_" + "p" * 24, "ent_" + "q" * 24


def program(code: str) -> Any:
    return governing(DEFINITIONS.program, code, 2027)


def test_a_document_is_its_counterparty_plus_its_number_whatever_it_is_called() -> None:
    invoice = ComputePurchaseBasis.model_validate({"purchases": [line(P, "X-1", 10)]})
    model_contract = FirstPurchaseBasis.model_validate(first_purchase("m", P, "X-1", "energy"))
    dataset = DatasetBenchmarkBasis.model_validate(
        {"dataset_ref": "d", "contracts": [contract(P, "X-1", 1), contract(Q, "X-1", 1)]}
    )
    assert documents(invoice) == documents(model_contract) == [document_id(P, "X-1")]
    assert documents(dataset) == ["dataset:d", document_id(P, "X-1"), document_id(Q, "X-1")]  # two counterparties
    # an external award names the same document as `invoice:`, `contract:` or `doc:`
    assert {external_document(f"{k}:{P}:X-1")[0] for k in ("invoice", "contract", "doc")} == {document_id(P, "X-1")}
    assert external_document("project:R-1") == ("project:R-1", None)
    for bad in ("contract:X-1", "invoice:X-1", f"invoice:{P}:", "receipt:1"):
        with pytest.raises(ValueError):
            external_document(bad)


def test_one_document_twice_is_a_duplicate_but_its_lines_of_other_categories_are_not() -> None:
    ok = ComputePurchaseBasis.model_validate(
        {"purchases": [line(P, "X", 10), line(P, "X", 5, "storage"), line(Q, "X", 10)]}
    )
    assert duplicates(ok) == []
    assert documents(ok) == [document_id(P, "X"), document_id(Q, "X")]  # each document once
    twice = ComputePurchaseBasis.model_validate(
        {"purchases": [line(P, "X", 10), line(Q, "Y", 5), line(P, "X", 10), line(P, "X", 1, "storage")]}
    )
    assert duplicates(twice) == [(document_id(P, "X"), [0, 2])]
    same_contract = DatasetBenchmarkBasis.model_validate(
        {"dataset_ref": "d", "contracts": [contract(P, "C", 1), contract(P, "C", 2)]}
    )
    assert duplicates(same_contract) == [(document_id(P, "C"), [0, 1])]


def test_the_reported_sale_caps_and_voucher_money_is_deducted_before_the_award_is_sized() -> None:
    basis = ComputePurchaseBasis.model_validate(
        {
            "purchases": [
                line(P, "A", 3_000_000),  # reported at 1,500,000: counts 1,500,000
                line(P, "A", 200_000, "storage"),  # excluded by category, deducts nothing
                line(P, "B", 1_000_000),  # a voucher paid 400,000 of it: counts 600,000
                line(Q, "C", 800_000),  # reported 2,000,000 and a voucher paid it all: counts nothing
            ]
        }
    )
    context = Context(
        year=YEAR,
        reported={
            document_id(P, "A"): ("compute", 1_500_000 * YUAN),
            document_id(Q, "C"): ("compute", 2_000_000 * YUAN),
        },
        voucher_paid={
            document_id(P, "A"): 0,
            document_id(P, "B"): 400_000 * YUAN,
            document_id(Q, "C"): 900_000 * YUAN,
        },
    )
    computed = evaluate(program("compute.purchase"), basis, context)
    assert computed.eligible_fen == 2_100_000 * YUAN
    assert computed.award_fen == 1_050_000 * YUAN  # 50% of what is the applicant's own, after deductions
    assert [(d.document, d.index, d.amount_fen, d.reason) for d in computed.deductions] == [
        (document_id(P, "A"), 0, 1_500_000 * YUAN, "above_reported"),
        (document_id(P, "B"), 2, 400_000 * YUAN, "voucher_paid"),
        (document_id(Q, "C"), 3, 800_000 * YUAN, "voucher_paid"),  # never more than the line counted
    ]
    assert all("art. 8" in d.detail for d in computed.deductions)
    assert any("1500000" in f for f in computed.flags)
    # a report at exactly the claimed amount deducts nothing
    exact = Context(year=YEAR, reported={document_id(P, "A"): ("compute", 3_000_000 * YUAN)})
    assert evaluate(program("compute.purchase"), basis, exact).deductions == ()
    # a report caps the amount and the voucher money comes off what is left of it
    both = Context(
        year=YEAR,
        reported={document_id(P, "B"): ("compute", 500_000 * YUAN)},
        voucher_paid={document_id(P, "B"): 400_000 * YUAN},
    )
    only_b = ComputePurchaseBasis.model_validate({"purchases": [line(P, "B", 1_000_000)]})
    assert evaluate(program("compute.purchase"), only_b, both).eligible_fen == 100_000 * YUAN


def test_voucher_money_on_a_model_contract_is_not_the_purchasers_own() -> None:
    basis = FirstPurchaseBasis.model_validate(first_purchase("m", P, "K", "energy"))
    computed = evaluate(
        program("model.first_purchase"), basis, Context(year=YEAR, voucher_paid={document_id(P, "K"): 100_000 * YUAN})
    )
    assert (computed.eligible_fen, computed.award_fen) == (900_000 * YUAN, 270_000 * YUAN)  # 30% of 900,000 元


# -- through the service ---------------------------------------------------------------------------------------


async def test_an_invoice_and_a_contract_with_one_counterparty_and_number_are_one_document(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 2_000_000 * YUAN)
    await fund(client, admin, "model.first_filing", 1_000 * YUAN)
    await fund(client, admin, "model.first_purchase", 5_000_000 * YUAN)
    buyer, other = await create_entity(engine), await create_entity(engine)
    vendor_p, vendor_q, vendor_r = [await create_entity(engine, kind="provider") for _ in range(3)]
    number = f"X-{buyer[-8:]}"
    compute = await apply(client, admin, "compute.purchase", buyer, {"purchases": [line(vendor_p, number, 2_400_000)]})
    assert (await approve(client, admin, compute["id"])).status_code == 201
    model = await filed_model(client, admin, await create_entity(engine))

    # the invoice behind the compute award, offered again as a model contract with the same vendor
    again = await apply(client, admin, "model.first_purchase", other, first_purchase(model, vendor_p, number, "energy"))
    assert again["computed"]["award_fen"] == 0
    assert again["computed"]["excluded"][0]["document"] == f"doc:{vendor_p}:{number}"
    assert compute["id"] in again["computed"]["excluded"][0]["detail"]
    assert_problem(await approve(client, admin, again["id"]), 409, "basis_already_used")

    # two other vendors' contracts numbered alike are two documents: neither blocks the other
    for vendor, industry in ((vendor_q, "energy"), (vendor_r, "finance")):
        bought = await apply(
            client, admin, "model.first_purchase", other, first_purchase(model, vendor, number, industry)
        )
        assert bought["computed"]["award_fen"] == 300_000 * YUAN, bought["computed"]
        assert (await approve(client, admin, bought["id"])).status_code == 201

    # an external award names the document by its counterparty too, in any of the three spellings
    external = {"entity_id": other, "policy": "another policy", "amount_fen": 100, "awarded_on": f"{YEAR}-01-05"}
    refused = await client.post(
        "/v1/external-awards", headers=admin, json={**external, "basis_ref": f"contract:{vendor_q}:{number}"}
    )
    assert_problem(refused, 409, "basis_already_used")
    no_counterparty = await client.post(
        "/v1/external-awards", headers=admin, json={**external, "basis_ref": f"contract:{number}"}
    )
    assert "counterparty" in assert_problem(no_counterparty, 422, "validation_error")["detail"]
    recorded = await client.post(
        "/v1/external-awards", headers=admin, json={**external, "basis_ref": f"contract:{vendor_p}:Y-{number}"}
    )
    assert recorded.status_code == 201, recorded.text
    dataset = await apply(
        client,
        admin,
        "data.dataset_benchmark",
        other,
        {
            "dataset_ref": f"D-{number}",
            "contracts": [contract(vendor_p, f"Y-{number}", 500), contract(vendor_q, f"Y-{number}", 700)],
        },
    )
    excluded = {e["document"]: e["reason"] for e in dataset["computed"]["excluded"]}
    assert excluded == {f"doc:{vendor_p}:Y-{number}": "basis_already_used"}
    assert dataset["computed"]["eligible_fen"] == 700 * YUAN  # the other counterparty's contract counts


async def test_a_document_is_claimed_whole_and_listed_once(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 3_000_000 * YUAN)
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    tag = buyer[-8:]

    # the same invoice twice in one category: refused, naming the document and its lines
    doubled = await submit(
        client,
        admin,
        "compute.purchase",
        buyer,
        {
            "purchases": [
                line(provider, f"D-{tag}", 1_500_000),
                line(provider, f"E-{tag}", 10),
                line(provider, f"D-{tag}", 1_500_000),
            ]
        },
    )
    body = assert_problem(doubled, 422, "duplicate_basis")
    assert body["errors"] == [{"document": f"doc:{provider}:D-{tag}", "indexes": [0, 2]}]
    assert "art. 25" in body["detail"]
    same_contract = await submit(
        client,
        admin,
        "data.dataset_benchmark",
        buyer,
        {
            "dataset_ref": f"D-{tag}",
            "contracts": [contract(provider, f"C-{tag}", 1), contract(provider, f"C-{tag}", 2)],
        },
    )
    assert_problem(same_contract, 422, "duplicate_basis")

    # a compute line and a storage line of one invoice are that invoice's lines; an invoice with only an
    # excluded line is claimed as well
    whole = await apply(
        client,
        admin,
        "compute.purchase",
        buyer,
        {
            "purchases": [
                line(provider, f"D-{tag}", 2_400_000),
                line(provider, f"D-{tag}", 100_000, "storage"),
                line(provider, f"S-{tag}", 50_000, "storage"),
            ]
        },
    )
    assert whole["computed"]["eligible_fen"] == 2_400_000 * YUAN
    assert (await approve(client, admin, whole["id"])).status_code == 201
    async with engine.connect() as conn:
        claimed = (
            (
                await conn.execute(
                    text("SELECT document FROM basis_claim WHERE application_id = :a ORDER BY document"),
                    {"a": whole["id"]},
                )
            )
            .scalars()
            .all()
        )
    assert claimed == [f"doc:{provider}:D-{tag}", f"doc:{provider}:S-{tag}"]
    # the storage-only invoice offered again as compute by someone else supports no second award
    other = await create_entity(engine)
    second = await apply(
        client, admin, "compute.purchase", other, {"purchases": [line(provider, f"S-{tag}", 2_000_000)]}
    )
    assert [e["reason"] for e in second["computed"]["excluded"]] == ["basis_already_used"]
    assert_problem(await approve(client, admin, second["id"]), 409, "basis_already_used")

    # approval checks again: a basis that lists a document twice (written before the rule) is refused
    late = await apply(client, admin, "compute.purchase", other, {"purchases": [line(provider, f"L-{tag}", 2_400_000)]})
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE application SET basis = CAST(:b AS jsonb) WHERE id = :id"),
            {"b": json.dumps({"purchases": [line(provider, f"L-{tag}", 2_400_000)] * 2}), "id": late["id"]},
        )
    assert_problem(await approve(client, admin, late["id"]), 422, "duplicate_basis")


async def test_the_sale_a_provider_reported_caps_the_amount_counted(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "compute.purchase", 2_000_000 * YUAN)
    buyer, provider = await create_entity(engine), await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    number = f"R-{buyer[-8:]}"
    sale = {
        "buyer_entity_id": buyer,
        "invoice_no": number,
        "category": "compute",
        "amount_fen": 1_500_000 * YUAN,
        "purchased_on": f"{YEAR - 1}-03-01",
    }
    assert (await client.post("/v1/purchases", headers=key, json=sale)).status_code == 201
    applied = await apply(
        client,
        admin,
        "compute.purchase",
        buyer,
        {"purchases": [line(provider, number, 3_000_000), line(provider, f"U-{number}", 500_000)]},
    )
    computed = applied["computed"]
    assert computed["eligible_fen"] == 2_000_000 * YUAN  # 1,500,000 as reported + 500,000 nobody reported
    assert computed["award_fen"] == 1_000_000 * YUAN
    [deduction] = computed["deductions"]
    assert (deduction["document"], deduction["index"], deduction["amount_fen"], deduction["reason"]) == (
        f"doc:{provider}:{number}",
        0,
        1_500_000 * YUAN,
        "above_reported",
    )
    assert "art. 8" in deduction["detail"] and "reported" in deduction["detail"]
    assert any(number in f and "150000000" in f for f in computed["flags"])
    issued = await approve(client, admin, applied["id"])
    assert issued.status_code == 201, issued.text
    assert issued.json()["application"]["computed"]["deductions"] == computed["deductions"]
    async with engine.connect() as conn:
        metadata = await conn.scalar(
            text("SELECT metadata FROM ledger_entry WHERE idempotency_key = :k"), {"k": f"issue:{applied['id']}"}
        )
    assert metadata["deducted_fen"] == 1_500_000 * YUAN  # an export of the journal shows it


async def test_what_a_voucher_paid_is_not_next_years_purchase(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """An invoice paid by this year's voucher, in full or in part, offered as next year's 实际采购."""
    await fund(client, admin, "compute.purchase", 1_000_000 * YUAN)
    holder, seller = await create_entity(engine), await create_entity(engine, kind="provider")
    awarded = await apply(
        client, admin, "compute.purchase", holder, {"purchases": [line(seller, f"H-{holder}", 2_000_000)]}
    )
    voucher = (await approve(client, admin, awarded["id"])).json()["id"]  # 1,000,000 元
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    token = (await client.post(f"/v1/vouchers/{voucher}/token", headers=admin)).json()["token"]

    async def redeem(invoice: str, compute_yuan: int, storage_yuan: int = 0) -> dict[str, Any]:
        lines = [{"category": "compute", "amount_fen": compute_yuan * YUAN}]
        if storage_yuan:
            lines.append({"category": "storage", "amount_fen": storage_yuan * YUAN})
        response = await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": invoice},
            json={"token": token, "invoice_no": invoice, "lines": lines},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    tag = holder[-8:]
    await redeem(f"N1-{tag}", 600_000)  # paid in full
    partly = await redeem(f"N2-{tag}", 1_000_000, storage_yuan=20_000)  # 400,000 left on the voucher: paid in part
    assert partly["subsidy_fen"] == 400_000 * YUAN
    refunded = await client.post(
        f"/v1/redemptions/{partly['id']}/refund",
        headers={**key, "Idempotency-Key": f"refund-{tag}"},
        json={"amount_fen": 100_000 * YUAN, "reason": "undelivered"},
    )
    assert refunded.status_code == 200, refunded.text  # net 300,000 paid by the voucher
    reversed_ = await redeem(f"N4-{tag}", 100_000)
    clawed = await client.post(
        f"/v1/redemptions/{reversed_['id']}/reverse",
        headers=admin,
        json={"reason": "entered twice", "grounds": "administrative"},
    )
    assert clawed.status_code == 200, clawed.text  # reversed: the voucher paid nothing of it

    next_year = await apply(
        client,
        admin,
        "compute.purchase",
        holder,
        {
            "purchases": [
                line(provider, f"N1-{tag}", 600_000, on=f"{YEAR}-06-01"),
                line(provider, f"N2-{tag}", 1_000_000, on=f"{YEAR}-06-01"),
                line(provider, f"N2-{tag}", 20_000, "storage", on=f"{YEAR}-06-01"),
                line(provider, f"N3-{tag}", 1_500_000, on=f"{YEAR}-06-01"),
                line(provider, f"N4-{tag}", 100_000, on=f"{YEAR}-06-01"),
            ]
        },
        year=YEAR + 1,
    )
    computed = next_year["computed"]
    assert [(d["document"], d["index"], d["amount_fen"], d["reason"]) for d in computed["deductions"]] == [
        (f"doc:{provider}:N1-{tag}", 0, 600_000 * YUAN, "voucher_paid"),
        (f"doc:{provider}:N2-{tag}", 1, 300_000 * YUAN, "voucher_paid"),
    ]
    assert "实际采购" in computed["deductions"][0]["detail"]
    assert computed["eligible_fen"] == (700_000 + 1_500_000 + 100_000) * YUAN
    assert computed["award_fen"] == 1_150_000 * YUAN  # 50% of 2,300,000 元 of the holder's own spending


async def test_a_model_vendor_is_never_its_own_first_purchaser(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "model.first_filing", 1_000 * YUAN)
    await fund(client, admin, "model.first_purchase", 3_000_000 * YUAN)
    vendor = await create_entity(engine, kind="provider")
    model = await filed_model(client, admin, vendor)
    tag = vendor[-8:]

    itself = await submit(
        client, admin, "model.first_purchase", vendor, first_purchase(model, vendor, f"S-{tag}", "energy")
    )
    body = assert_problem(itself, 403, "affiliated_party")
    assert "vendor" in body["detail"] and "art. 11" in body["detail"] and body["errors"] == [{"path": []}]

    subsidiary = await create_entity(engine)
    await relate(client, admin, vendor, subsidiary, f"{YEAR - 1}-01-01")
    owned = await submit(
        client, admin, "model.first_purchase", subsidiary, first_purchase(model, vendor, f"T-{tag}", "energy")
    )
    body = assert_problem(owned, 403, "affiliated_party")
    assert [(r["from_entity_id"], r["to_entity_id"]) for r in body["errors"][0]["path"]] == [(vendor, subsidiary)]

    # on the contract date: a company that became the vendor's subsidiary after it signed bought at arm's length
    later = await create_entity(engine)
    await relate(client, admin, vendor, later, f"{YEAR}-06-01")
    signed_before = first_purchase(model, vendor, f"U-{tag}", "finance", signed_on=f"{YEAR}-05-31")
    assert (await submit(client, admin, "model.first_purchase", later, signed_before)).status_code == 201
    # with no contract date, the decision date stands in: affiliated today
    undated = first_purchase(model, vendor, f"V-{tag}", "transport")
    assert_problem(await submit(client, admin, "model.first_purchase", later, undated), 403, "affiliated_party")

    # approval checks again, and the vendor cannot redeem a voucher held by an affiliate (definition v2)
    buyer = await create_entity(engine)
    bought = await apply(
        client, admin, "model.first_purchase", buyer, first_purchase(model, vendor, f"W-{tag}", "retail")
    )
    assert bought["definition_version"] == 2
    stranger = await create_entity(engine)
    pending = await apply(
        client, admin, "model.first_purchase", stranger, first_purchase(model, vendor, f"Z-{tag}", "mining")
    )
    voucher = (await approve(client, admin, bought["id"])).json()["id"]
    await relate(client, admin, vendor, buyer, f"{YEAR}-01-01")
    await relate(client, admin, vendor, stranger, f"{YEAR}-01-01")
    assert_problem(await approve(client, admin, pending["id"]), 403, "affiliated_party")
    token = (await client.post(f"/v1/vouchers/{voucher}/token", headers=admin)).json()["token"]
    vendor_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=vendor))
    redeemed = await client.post(
        "/v1/redemptions",
        headers={**vendor_key, "Idempotency-Key": f"self-{tag}"},
        json={"token": token, "invoice_no": f"W-{tag}", "lines": [{"category": "api_calls", "amount_fen": 100_000}]},
    )
    assert_problem(redeemed, 403, "affiliated_party")


# -- the migration ---------------------------------------------------------------------------------------------


async def test_migration_0015_rekeys_every_claim_and_keeps_double_awards_for_an_auditor(fresh_db_url: str) -> None:
    """Claims recorded under the old keys: none is lost or merged, a double award stays visible."""
    settings = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings)
    try:
        async with running_app(settings):  # publishes the program definitions
            pass
        buyer, other, vendor, vendor_q = [await create_entity(engine) for _ in range(4)]
        await engine.dispose()
        await asyncio.to_thread(migrate.downgrade, fresh_db_url, "0014")

        async def application(program: str, entity: str, basis: dict[str, Any]) -> str:
            app_id = new_id("app_")
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO application (id, program, definition_version, applicant_entity_id, year, basis, "
                        "status, computed, eligible_fen, computed_award_fen, award_fen) VALUES (:id, :p, 1, :e, 2026, "
                        "CAST(:b AS jsonb), 'issued', '{}', 1, 1, 1)"
                    ),
                    {"id": app_id, "p": program, "e": entity, "b": json.dumps(basis)},
                )
            return app_id

        compute = await application("compute.purchase", buyer, {"purchases": []})
        model = await application("model.first_purchase", other, {"vendor_entity_id": vendor})
        model_q = await application("model.first_purchase", buyer, {"vendor_entity_id": vendor_q, "x": 1})
        rows = [
            ("invoice:" + vendor + ":X", compute, None, False),  # the compute award's invoice...
            ("contract:X", model, None, False),  # ...accepted again as a model contract with the same vendor
            ("contract:Y", model_q, None, True),  # released (reversed): re-keyed all the same
            ("first_purchase:M:energy", model, None, False),
            ("contract:Z", None, "ext", False),  # an external award's contract: counterparty unknown
        ]
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO external_award (id, entity_id, basis_ref, policy, amount_fen, awarded_on) "
                    "VALUES (:id, :e, 'contract:Z', 'p', 1, '2026-01-01')"
                ),
                {"id": "ext_" + "z" * 24, "e": other},
            )
            for document, app_id, ext, released in rows:
                await conn.execute(
                    text(
                        "INSERT INTO basis_claim (document, application_id, external_award_id, released_at) "
                        "VALUES (:d, :a, :x, CASE WHEN :r THEN now() END)"
                    ),
                    {"d": document, "a": app_id, "x": "ext_" + "z" * 24 if ext else None, "r": released},
                )
        await engine.dispose()
        await asyncio.to_thread(migrate.upgrade, fresh_db_url)

        async with engine.connect() as conn:
            claims = (
                await conn.execute(
                    text(
                        "SELECT id, document, original_document, duplicate_of, released_at IS NOT NULL AS released, "
                        "coalesce(application_id, external_award_id) AS holder FROM basis_claim ORDER BY id"
                    )
                )
            ).all()
        first_id = claims[0].id
        assert [(c.document, c.original_document, c.duplicate_of, c.released, c.holder) for c in claims] == [
            (f"doc:{vendor}:X", f"invoice:{vendor}:X", None, False, compute),
            (f"doc:{vendor}:X", "contract:X", first_id, False, model),  # kept, marked for the auditor
            (f"doc:{vendor_q}:Y", "contract:Y", None, True, model_q),
            ("first_purchase:M:energy", None, None, False, model),
            ("number:Z", "contract:Z", None, False, "ext_" + "z" * 24),
        ]

        # the service reads the re-keyed claims: the duplicated invoice and any document numbered Z are taken
        admin = bearer(await create_key(engine, Role.ADMIN))
        async with running_app(settings) as client:
            budget = await client.put(
                f"/v1/programs/compute.purchase/budgets/{YEAR}", json={"amount_fen": 10_000_000 * YUAN}, headers=admin
            )
            assert budget.status_code == 200, budget.text
            applied = await apply(
                client,
                admin,
                "compute.purchase",
                await create_entity(engine),
                {
                    "purchases": [
                        line(vendor, "X", 1_000_000),
                        line(vendor_q, "Z", 1_000_000),
                        line(vendor_q, "Y", 2_000_000),
                    ]
                },
            )
            holders = {e["document"]: e["detail"] for e in applied["computed"]["excluded"]}
            assert set(holders) == {f"doc:{vendor}:X", f"doc:{vendor_q}:Z"}
            assert compute in holders[f"doc:{vendor}:X"] and "ext_" + "z" * 24 in holders[f"doc:{vendor_q}:Z"]
            assert applied["computed"]["eligible_fen"] == 2_000_000 * YUAN  # the released contract is free

        # and back: every row takes its old key again
        await engine.dispose()
        await asyncio.to_thread(migrate.downgrade, fresh_db_url, "0014")
        async with engine.connect() as conn:
            old = (await conn.execute(text("SELECT document FROM basis_claim ORDER BY id"))).scalars().all()
        assert old[:5] == [r[0] for r in rows]
        await engine.dispose()
        await asyncio.to_thread(migrate.upgrade, fresh_db_url)
    finally:
        await engine.dispose()


def test_signed_on_is_optional_and_a_date() -> None:
    basis = FirstPurchaseBasis.model_validate(first_purchase("m", P, "K", "energy", signed_on="2026-03-01"))
    assert basis.signed_on == date(2026, 3, 1)
    assert FirstPurchaseBasis.model_validate(first_purchase("m", P, "K", "energy")).signed_on is None
