"""Vouchers after issue, through the real app: reads and who sees them, revocation, expiry (exactly once under
concurrent sweepers), and reversing an award so the same basis can support a higher one (就高, art. 25)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from ledger.postings import credit, debit
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR, expected_expiry
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.vouchers import expire_due_vouchers, return_released_holds, voucher_account

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
PILOT = "data.pilot_dataset"


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


async def budget_available(client: httpx.AsyncClient, admin: dict[str, str], program: str) -> int:
    response = await client.get(f"/v1/programs/{program}/budgets/{YEAR}", headers=admin)
    assert response.status_code == 200, response.text
    available: int = response.json()["available_fen"]
    return available


async def apply(
    client: httpx.AsyncClient, admin: dict[str, str], program: str, entity: str, basis: dict[str, Any]
) -> str:
    response = await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": YEAR, "basis": basis},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    application_id: str = response.json()["id"]
    return application_id


async def approve(
    client: httpx.AsyncClient, admin: dict[str, str], application_id: str, award_fen: int | None = None
) -> httpx.Response:
    body = {} if award_fen is None else {"award_fen": award_fen}
    return await client.post(f"/v1/applications/{application_id}/approve", headers=admin, json=body)


def pilot_basis(ref: str) -> dict[str, Any]:
    return {"project_ref": ref, "pilot_base": "国家人工智能行业应用中试基地"}


async def pilot_voucher(
    client: httpx.AsyncClient, admin: dict[str, str], holder: str, award_fen: int
) -> dict[str, Any]:
    """A data.pilot_dataset voucher for `holder`, issued; returns the approval's answer."""
    application_id = await apply(client, admin, PILOT, holder, pilot_basis(f"PD-{uuid.uuid4().hex[:12]}"))
    response = await approve(client, admin, application_id, award_fen)
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


async def provider_payable(engine: AsyncEngine) -> str:
    code = f"test:provider:{uuid.uuid4().hex[:12]}:payable"
    async with engine.begin() as conn:
        await Ledger().open_account(conn, code)
    return code


async def redeem(engine: AsyncEngine, voucher_id: str, amount_fen: int) -> None:
    """What a redemption does to the ledger (redemption itself is not built yet): voucher -> provider."""
    payable = await provider_payable(engine)
    async with engine.begin() as conn:
        await Ledger().transfer(
            conn,
            key=f"test-redeem:{uuid.uuid4()}",
            postings=[debit(voucher_account(voucher_id), amount_fen), credit(payable, amount_fen)],
        )


async def hold(engine: AsyncEngine, voucher_id: str, amount_fen: int) -> int:
    payable = await provider_payable(engine)
    async with engine.begin() as conn:
        entry = await Ledger().hold(
            conn,
            key=f"test-hold:{uuid.uuid4()}",
            postings=[debit(voucher_account(voucher_id), amount_fen), credit(payable, amount_fen)],
            timeout_s=3_600,
        )
    return entry.id


async def ledger_is_sound(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await Ledger().verify_cached_balances(conn) == []


async def test_reads_balances_and_who_sees_them(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 5_000_000 * YUAN)
    holder, other = await create_entity(engine), await create_entity(engine)
    approving = datetime.now(UTC)
    mine = await pilot_voucher(client, admin, holder, 500_000 * YUAN)
    approved = datetime.now(UTC)
    second = await pilot_voucher(client, admin, holder, 200_000 * YUAN)
    theirs = await pilot_voucher(client, admin, other, 100_000 * YUAN)
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=holder))
    provider = bearer(await create_key(engine, Role.PROVIDER))
    auditor = bearer(await create_key(engine, Role.AUDITOR))

    await redeem(engine, mine["id"], 100_000 * YUAN)
    await hold(engine, mine["id"], 50_000 * YUAN)
    body = (await client.get(f"/v1/vouchers/{mine['id']}", headers=enterprise)).json()
    assert {k: body[k] for k in ("status", "face_value_fen", "available_fen", "held_fen", "redeemed_fen")} == {
        "status": "active",
        "face_value_fen": 500_000 * YUAN,
        "available_fen": 350_000 * YUAN,
        "held_fen": 50_000 * YUAN,
        "redeemed_fen": 100_000 * YUAN,
    }
    assert (body["released_fen"], body["year"], body["program"], body["holder_entity_id"]) == (0, YEAR, PILOT, holder)
    assert body["application_id"] == mine["application_id"] and body["redemption_rate_bp"] == 3000
    assert body["vendor_entity_id"] is None
    # the end of its year or 90 days after issue, whichever is later (in December, the 90 days)
    assert expected_expiry(YEAR, approving) <= datetime.fromisoformat(body["expires_at"])
    assert datetime.fromisoformat(body["expires_at"]) <= expected_expiry(YEAR, approved)
    assert body["ended_at"] is None and body["created_at"]

    for headers in (admin, auditor):
        assert (await client.get(f"/v1/vouchers/{theirs['id']}", headers=headers)).status_code == 200
    assert_problem(await client.get(f"/v1/vouchers/{theirs['id']}", headers=enterprise), 404, "not_found")
    assert_problem(await client.get(f"/v1/vouchers/vch_{'0' * 24}", headers=admin), 404, "not_found")
    assert_problem(await client.get("/v1/vouchers/not-an-id", headers=admin), 422, "validation_error")
    assert_problem(await client.get("/v1/vouchers", headers=provider), 403, "forbidden")
    assert_problem(await client.get(f"/v1/vouchers/{mine['id']}", headers=provider), 403, "forbidden")
    assert (await client.get("/v1/vouchers")).status_code == 401

    listed = (await client.get("/v1/vouchers", headers=enterprise)).json()
    assert {v["holder_entity_id"] for v in listed["data"]} == {holder}
    assert {v["id"] for v in listed["data"]} == {mine["id"], second["id"]}
    hidden = await client.get("/v1/vouchers", headers=enterprise, params={"holder_entity_id": other})
    assert hidden.json() == {"data": [], "next_cursor": None}
    filters = {"holder_entity_id": holder, "program": PILOT, "year": YEAR}
    first_page = (await client.get("/v1/vouchers", headers=auditor, params={**filters, "limit": 1})).json()
    assert [v["id"] for v in first_page["data"]] == [mine["id"]] and first_page["next_cursor"]
    rest = await client.get(
        "/v1/vouchers", headers=auditor, params={**filters, "limit": 1, "cursor": first_page["next_cursor"]}
    )
    assert [v["id"] for v in rest.json()["data"]] == [second["id"]] and rest.json()["next_cursor"] is None
    assert (await client.get("/v1/vouchers", headers=admin, params={**filters, "status": "revoked"})).json()[
        "data"
    ] == []
    for bad in ({"status": "spent"}, {"year": "soon"}, {"program": "no.such"}, {"cursor": "%%%"}, {"limit": 0}):
        assert_problem(await client.get("/v1/vouchers", headers=admin, params=bad), 422, "validation_error")

    balances = (await client.get(f"/v1/entities/{holder}/balances", headers=enterprise, params={"year": YEAR})).json()
    assert balances["entity_id"] == holder and balances["year"] == YEAR
    (pilot,) = balances["data"]
    assert pilot == {
        "program": PILOT,
        "year": YEAR,
        "cap_fen": 2_000_000 * YUAN,
        "cap_applies_to": "entity_year",
        "cap_used_fen": 700_000 * YUAN,
        "issued_fen": 700_000 * YUAN,
        "available_fen": 550_000 * YUAN,
        "held_fen": 50_000 * YUAN,
        "redeemed_fen": 100_000 * YUAN,
        "released_fen": 0,
        "paid_fen": 0,
        "vouchers": 2,
        "payouts": 0,
    }
    this_year = (await client.get(f"/v1/entities/{holder}/balances", headers=auditor)).json()
    assert this_year == balances  # by default the current year, the one these vouchers were awarded for
    next_year = await client.get(f"/v1/entities/{holder}/balances", headers=auditor, params={"year": YEAR + 1})
    assert next_year.json()["data"] == []  # nothing held for next year
    assert_problem(await client.get(f"/v1/entities/{other}/balances", headers=enterprise), 404, "not_found")
    assert_problem(await client.get(f"/v1/entities/{holder}/balances", headers=provider), 404, "not_found")
    assert_problem(await client.get(f"/v1/entities/ent_{'0' * 24}/balances", headers=admin), 404, "not_found")
    assert_problem(
        await client.get(f"/v1/entities/{holder}/balances", headers=admin, params={"year": "x"}),
        422,
        "validation_error",
    )


async def test_revoke_returns_the_available_value_and_frees_cap_room(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 5_000_000 * YUAN)
    holder = await create_entity(engine)
    full = await pilot_voucher(client, admin, holder, 2_000_000 * YUAN)  # the whole entity-year cap
    waiting = await apply(client, admin, PILOT, holder, pilot_basis(f"PD-{uuid.uuid4().hex[:12]}"))
    assert_problem(await approve(client, admin, waiting, 1_000_000 * YUAN), 409, "cap_exceeded")

    path = f"/v1/vouchers/{full['id']}/revoke"
    data_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"]))
    compute_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=holder))
    before = await budget_available(client, admin, PILOT)
    assert_problem(await client.post(path, headers=compute_admin, json={"grounds": "administrative"}), 403, "forbidden")
    assert_problem(await client.post(path, headers=enterprise, json={"grounds": "administrative"}), 403, "forbidden")
    for bad in (
        {"reason": "", "grounds": "administrative"},
        {"reason": 5, "grounds": "administrative"},
        {"reason": "x" * 1001, "grounds": "administrative"},
        {"why": "x", "grounds": "administrative"},
        {"reason": "no grounds"},
        {"reason": "x", "grounds": "error"},
    ):
        assert_problem(await client.post(path, headers=admin, json=bad), 422, "validation_error")
    assert_problem(
        await client.post(f"/v1/vouchers/vch_{'0' * 24}/revoke", headers=admin, json={"grounds": "administrative"}),
        404,
        "not_found",
    )
    unchanged = (await client.get(f"/v1/vouchers/{full['id']}", headers=admin)).json()
    assert (unchanged["status"], unchanged["available_fen"]) == ("active", 2_000_000 * YUAN)
    assert await budget_available(client, admin, PILOT) == before

    await redeem(engine, full["id"], 300_000 * YUAN)
    revoked = await client.post(
        path, headers=data_admin, json={"reason": "project abandoned", "grounds": "administrative"}
    )
    assert revoked.status_code == 200, revoked.text
    body = revoked.json()
    assert (body["status"], body["available_fen"], body["released_fen"], body["redeemed_fen"]) == (
        "revoked",
        0,
        1_700_000 * YUAN,
        300_000 * YUAN,
    )
    assert body["end_reason"] == "project abandoned" and body["ended_at"]
    assert await budget_available(client, admin, PILOT) == before + 1_700_000 * YUAN
    assert_problem(await client.post(path, headers=admin, json={"grounds": "administrative"}), 409, "voucher_revoked")

    # the cap counts what was issued less what was released: 300,000 元 used, so 1,000,000 元 fits again
    assert (await approve(client, admin, waiting, 1_000_000 * YUAN)).status_code == 201
    (pilot,) = (await client.get(f"/v1/entities/{holder}/balances", headers=admin, params={"year": YEAR})).json()[
        "data"
    ]
    assert (pilot["cap_used_fen"], pilot["released_fen"], pilot["available_fen"]) == (
        1_300_000 * YUAN,
        1_700_000 * YUAN,
        1_000_000 * YUAN,
    )
    await ledger_is_sound(engine)


async def test_revocation_keeps_holds_in_flight_and_returns_what_they_give_back(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 1_000_000 * YUAN)
    voucher = await pilot_voucher(client, admin, await create_entity(engine), 400_000 * YUAN)
    hold_id = await hold(engine, voucher["id"], 150_000 * YUAN)
    before = await budget_available(client, admin, PILOT)
    body = (
        await client.post(f"/v1/vouchers/{voucher['id']}/revoke", headers=admin, json={"grounds": "administrative"})
    ).json()
    assert (body["status"], body["released_fen"], body["held_fen"]) == ("revoked", 250_000 * YUAN, 150_000 * YUAN)
    assert body["end_reason"] == "revoked by an administrator"
    assert await budget_available(client, admin, PILOT) == before + 250_000 * YUAN

    async with engine.begin() as conn:  # the provider voids its hold: the value comes back to the voucher
        await Ledger().void_pending(conn, key=f"test-void:{uuid.uuid4()}", pending_entry_id=hold_id)
    body = (await client.get(f"/v1/vouchers/{voucher['id']}", headers=admin)).json()
    assert (body["available_fen"], body["held_fen"], body["released_fen"]) == (0, 0, 400_000 * YUAN)
    await asyncio.gather(*(return_released_holds(engine, Ledger()) for _ in range(2)))
    assert await budget_available(client, admin, PILOT) == before + 400_000 * YUAN
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT released_fen, awaiting_holds FROM voucher WHERE id = :id"), {"id": voucher["id"]}
            )
        ).one()
    assert (row.released_fen, row.awaiting_holds) == (400_000 * YUAN, False)
    await ledger_is_sound(engine)


async def test_expiry_releases_exactly_once_under_concurrent_sweepers(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 1_000_000 * YUAN)
    voucher = await pilot_voucher(client, admin, await create_entity(engine), 300_000 * YUAN)
    await redeem(engine, voucher["id"], 20_000 * YUAN)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE voucher SET expires_at = now() - interval '1 second' WHERE id = :id"), {"id": voucher["id"]}
        )
    before = await budget_available(client, admin, PILOT)

    # read-time rule: past its expiry it reads expired, with nothing available, before any sweep
    body = (await client.get(f"/v1/vouchers/{voucher['id']}", headers=admin)).json()
    assert (body["status"], body["available_fen"], body["released_fen"]) == ("expired", 0, 280_000 * YUAN)
    assert_problem(
        await client.post(f"/v1/vouchers/{voucher['id']}/revoke", headers=admin, json={"grounds": "administrative"}),
        409,
        "voucher_expired",
    )
    expired = (await client.get("/v1/vouchers", headers=admin, params={"status": "expired"})).json()["data"]
    active = (await client.get("/v1/vouchers", headers=admin, params={"status": "active", "limit": 500})).json()
    assert voucher["id"] in {v["id"] for v in expired}
    assert voucher["id"] not in {v["id"] for v in active["data"]}

    now = datetime.now(UTC)
    first, second = await asyncio.gather(
        expire_due_vouchers(engine, Ledger(), now), expire_due_vouchers(engine, Ledger(), now)
    )
    assert (first + second).count(voucher["id"]) == 1
    assert voucher["id"] not in await expire_due_vouchers(engine, Ledger(), datetime.now(UTC))
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT status, released_fen, ended_at FROM voucher WHERE id = :id"), {"id": voucher["id"]}
            )
        ).one()
        entries = await conn.scalar(
            text("SELECT count(*) FROM ledger_entry WHERE idempotency_key = :k"), {"k": f"expire:{voucher['id']}"}
        )
    assert (row.status, row.released_fen, entries) == ("expired", 280_000 * YUAN, 1) and row.ended_at is not None
    assert await budget_available(client, admin, PILOT) == before + 280_000 * YUAN
    body = (await client.get(f"/v1/vouchers/{voucher['id']}", headers=admin)).json()
    assert (body["status"], body["available_fen"], body["released_fen"], body["redeemed_fen"]) == (
        "expired",
        0,
        280_000 * YUAN,
        20_000 * YUAN,
    )
    await ledger_is_sound(engine)


async def test_reversal_lets_the_same_basis_support_a_higher_award(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "data.trusted_space", 1_000_000 * YUAN)
    await fund(client, admin, "model.industry_rollout", 1_000_000 * YUAN)
    lead = await create_entity(engine, kind="association")
    project = f"P-{uuid.uuid4().hex[:12]}"
    space = await apply(
        client, admin, "data.trusted_space", lead, {"project_ref": project, "investment_fen": 1_000_000 * YUAN}
    )
    rollout = await apply(
        client,
        admin,
        "model.industry_rollout",
        lead,
        {"project_ref": project, "deployment_cost_fen": 2_000_000 * YUAN},
    )
    paid = await approve(client, admin, space)
    assert paid.status_code == 201 and paid.json()["kind"] == "payout"
    assert_problem(await approve(client, admin, rollout), 409, "basis_already_used")
    before = await budget_available(client, admin, "data.trusted_space")

    path = f"/v1/applications/{space}/reverse"
    model_admin = bearer(await create_key(engine, Role.ADMIN, voucher_types=["model"]))
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=lead))
    assert_problem(await client.post(path, headers=admin, json={}), 422, "validation_error")
    assert_problem(
        await client.post(path, headers=admin, json={"reason": "  ", "grounds": "administrative"}),
        422,
        "validation_error",
    )
    assert_problem(await client.post(path, headers=admin, json={"reason": "higher"}), 422, "validation_error")
    assert_problem(
        await client.post(path, headers=model_admin, json={"reason": "higher", "grounds": "administrative"}),
        403,
        "forbidden",
    )
    assert_problem(
        await client.post(path, headers=enterprise, json={"reason": "higher", "grounds": "administrative"}),
        403,
        "forbidden",
    )
    assert_problem(
        await client.post(
            f"/v1/applications/{rollout}/reverse", headers=admin, json={"reason": "x", "grounds": "administrative"}
        ),
        409,
        "conflict",
    )
    assert_problem(
        await client.post(
            f"/v1/applications/app_{'0' * 24}/reverse", headers=admin, json={"reason": "x", "grounds": "administrative"}
        ),
        404,
        "not_found",
    )
    assert await budget_available(client, admin, "data.trusted_space") == before

    response = await client.post(
        path, headers=admin, json={"reason": "就高: the rollout award pays more", "grounds": "administrative"}
    )
    assert response.status_code == 200, response.text
    reversal = response.json()
    assert (reversal["status"], reversal["kind"], reversal["returned_fen"]) == ("reversed", "payout", 300_000 * YUAN)
    assert reversal["released_documents"] == [f"project:{project}"] and reversal["entry_id"]
    assert await budget_available(client, admin, "data.trusted_space") == before + 300_000 * YUAN
    assert (await client.get(f"/v1/applications/{space}", headers=admin)).json()["status"] == "reversed"
    assert_problem(
        await client.post(path, headers=admin, json={"reason": "again", "grounds": "administrative"}), 409, "conflict"
    )

    higher = await approve(client, admin, rollout)
    assert higher.status_code == 201, higher.text
    assert higher.json()["amount_fen"] == 600_000 * YUAN
    rows = {
        r["program"]: r
        for r in (await client.get(f"/v1/entities/{lead}/balances", headers=admin, params={"year": YEAR})).json()[
            "data"
        ]
    }
    assert (rows["data.trusted_space"]["paid_fen"], rows["data.trusted_space"]["released_fen"]) == (0, 300_000 * YUAN)
    assert rows["model.industry_rollout"]["paid_fen"] == 600_000 * YUAN
    async with engine.connect() as conn:
        ledger = Ledger()
        payable = await ledger.balance(conn, f"entity:{lead}:payable")
        entry = await ledger.entry(conn, int(reversal["entry_id"]))
    assert payable.credits_posted_fen - payable.debits_posted_fen == 600_000 * YUAN  # both steps in the journal
    assert entry.kind == "reversal" and entry.idempotency_key == f"reverse:{space}"
    await ledger_is_sound(engine)


async def test_reversing_a_voucher_award_refuses_while_value_is_at_providers(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 2_000_000 * YUAN)
    holder = await create_entity(engine)
    spent = await pilot_voucher(client, admin, holder, 100_000 * YUAN)
    await redeem(engine, spent["id"], 1 * YUAN)
    problem = assert_problem(
        await client.post(
            f"/v1/applications/{spent['application_id']}/reverse",
            headers=admin,
            json={"reason": "x", "grounds": "administrative"},
        ),
        409,
        "conflict",
    )
    assert "redeemed" in problem["detail"]
    assert (await client.get(f"/v1/vouchers/{spent['id']}", headers=admin)).json()["status"] == "active"
    assert (await client.get(f"/v1/applications/{spent['application_id']}", headers=admin)).json()["status"] == "issued"

    clean = await pilot_voucher(client, admin, holder, 500_000 * YUAN)
    before = await budget_available(client, admin, PILOT)
    response = await client.post(
        f"/v1/applications/{clean['application_id']}/reverse",
        headers=admin,
        json={"reason": "duplicate award", "grounds": "administrative"},
    )
    assert response.status_code == 200, response.text
    reversal = response.json()
    assert (reversal["kind"], reversal["award_id"], reversal["returned_fen"]) == (
        "voucher",
        clean["id"],
        500_000 * YUAN,
    )
    assert reversal["voucher"]["status"] == "revoked" and reversal["voucher"]["released_fen"] == 500_000 * YUAN
    assert reversal["voucher"]["end_reason"] == "award reversed: duplicate award"
    assert await budget_available(client, admin, PILOT) == before + 500_000 * YUAN
    (document,) = reversal["released_documents"]
    # the released project may support another award, here a trusted-space payout
    await fund(client, admin, "data.trusted_space", 100_000 * YUAN)
    again = await apply(
        client,
        admin,
        "data.trusted_space",
        holder,
        {"project_ref": document.removeprefix("project:"), "investment_fen": 100_000 * YUAN},
    )
    assert (await approve(client, admin, again)).status_code == 201
    await ledger_is_sound(engine)


async def test_concurrent_revocations_release_once(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, PILOT, 1_000_000 * YUAN)
    voucher = await pilot_voucher(client, admin, await create_entity(engine), 200_000 * YUAN)
    before = await budget_available(client, admin, PILOT)
    results = await asyncio.gather(
        *(
            client.post(f"/v1/vouchers/{voucher['id']}/revoke", headers=admin, json={"grounds": "administrative"})
            for _ in range(4)
        )
    )
    assert sorted(r.status_code for r in results) == [200, 409, 409, 409], [r.text for r in results]
    assert {r.json()["code"] for r in results if r.status_code == 409} == {"voucher_revoked"}
    assert await budget_available(client, admin, PILOT) == before + 200_000 * YUAN
    await ledger_is_sound(engine)
