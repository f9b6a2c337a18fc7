"""Redemption by providers through the real app: exactly once, never beyond a balance, refusals that stay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def compute_voucher(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, face_yuan: int
) -> tuple[str, str]:
    """A compute voucher of `face_yuan` 元 for a fresh holder: (voucher id, holder)."""
    path = f"/v1/programs/compute.purchase/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    assert (await client.put(path, headers=admin, json={"amount_fen": current + face_yuan * YUAN})).status_code == 200
    holder = await create_entity(engine)
    seller = await create_entity(engine, kind="provider")
    submitted = await client.post(
        "/v1/applications",
        headers=admin,
        json={
            "program": "compute.purchase",
            "applicant_entity_id": holder,
            "year": YEAR,
            "basis": {
                "purchases": [
                    {
                        "provider_entity_id": seller,
                        "invoice_no": f"B-{holder[-8:]}",
                        "category": "compute",
                        "amount_fen": 2 * face_yuan * YUAN,
                        "purchased_on": f"{YEAR - 1}-05-01",
                    }
                ]
            },
        },
    )
    assert submitted.status_code == 201, submitted.text
    issued = await client.post(f"/v1/applications/{submitted.json()['id']}/approve", headers=admin)
    assert issued.status_code == 201, issued.text
    assert issued.json()["face_value_fen"] == face_yuan * YUAN
    return issued.json()["id"], holder


async def token_for(client: httpx.AsyncClient, admin: dict[str, str], voucher: str, **narrow: Any) -> str:
    response = await client.post(f"/v1/vouchers/{voucher}/token", headers=admin, json=narrow or None)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def compute_lines(*amounts_yuan: int, other_yuan: int = 0) -> list[dict[str, Any]]:
    lines = [{"category": "compute", "amount_fen": a * YUAN, "description": "GPU hours"} for a in amounts_yuan]
    if other_yuan:
        lines.append({"category": "storage", "amount_fen": other_yuan * YUAN, "description": "object storage"})
    return lines


async def test_redeem_pays_eligible_lines_partially_and_refuses_what_is_left(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
    provider = await create_entity(engine, kind="provider")
    key = {**bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))}
    token = await token_for(client, admin, voucher)
    body = {"token": token, "invoice_no": "INV-1", "lines": compute_lines(600_000, other_yuan=50_000)}
    first = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "k1"}, json=body)
    assert first.status_code == 201, first.text
    assert (first.json()["eligible_fen"], first.json()["subsidy_fen"], first.json()["holder_pays_fen"]) == (
        600_000 * YUAN,
        600_000 * YUAN,
        50_000 * YUAN,
    )
    assert [e["category"] for e in first.json()["excluded"]] == ["storage"]
    again = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "k1"}, json=body)
    assert again.json() == first.json()  # the same answer, nothing new posted
    assert_problem(
        await client.post(
            "/v1/redemptions", headers={**key, "Idempotency-Key": "k1"}, json={**body, "invoice_no": "INV-other"}
        ),
        422,
        "idempotency_conflict",
    )
    partial = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "k2"},
        json={**body, "invoice_no": "INV-2", "lines": compute_lines(500_000)},
    )
    assert partial.json()["subsidy_fen"] == 400_000 * YUAN  # what was left
    assert partial.json()["holder_pays_fen"] == 100_000 * YUAN
    empty = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "k3"},
        json={**body, "invoice_no": "INV-3", "lines": compute_lines(1)},
    )
    assert_problem(empty, 409, "voucher_exhausted")
    # a refused redemption stays refused on retry, even after value comes back
    refunded = await client.post(
        f"/v1/redemptions/{partial.json()['id']}/refund",
        headers={**key, "Idempotency-Key": "r1"},
        json={"amount_fen": 100, "reason": "x"},
    )
    assert refunded.status_code == 200, refunded.text
    assert_problem(
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "k3"},
            json={**body, "invoice_no": "INV-3", "lines": compute_lines(1)},
        ),
        409,
        "voucher_exhausted",
    )
    voucher_now = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()
    assert (voucher_now["available_fen"], voucher_now["redeemed_fen"]) == (100, 1_000_000 * YUAN - 100)


async def test_sixty_four_concurrent_redemptions_never_overspend(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    token = await token_for(client, admin, voucher)

    async def one(i: int) -> httpx.Response:
        return await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": f"race-{i}"},
            json={"token": token, "invoice_no": f"R-{i}", "lines": compute_lines(20_000)},
        )

    results = await asyncio.gather(*(one(i) for i in range(64)))
    assert all(r.status_code < 500 for r in results), [r.text for r in results if r.status_code >= 500][:2]
    ok = [r for r in results if r.status_code == 201]
    assert len(ok) == 50, [r.text for r in results if r.status_code != 201][:3]
    assert {r.json()["code"] for r in results if r.status_code != 201} == {"voucher_exhausted"}
    assert sum(r.json()["subsidy_fen"] for r in ok) == 1_000_000 * YUAN
    async with engine.connect() as conn:
        paid = await conn.scalar(text("SELECT sum(subsidy_fen) FROM redemption WHERE voucher_id = :v"), {"v": voucher})
        assert paid == 1_000_000 * YUAN
        assert await Ledger().verify_cached_balances(conn) == []


async def test_fifty_identical_redemptions_make_one_entry(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 2_000_000)
    provider = await create_entity(engine, kind="provider")
    headers = {**bearer(await create_key(engine, Role.PROVIDER, entity_id=provider)), "Idempotency-Key": "same"}
    body = {"token": await token_for(client, admin, voucher), "invoice_no": "SAME-1", "lines": compute_lines(100)}
    results = await asyncio.gather(*(client.post("/v1/redemptions", headers=headers, json=body) for _ in range(50)))
    assert {r.status_code for r in results} == {201}, [r.text for r in results if r.status_code != 201][:2]
    assert len({r.json()["id"] for r in results}) == 1
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM redemption WHERE voucher_id = :v"), {"v": voucher}) == 1


async def test_holds_capture_void_and_narrowed_tokens(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
    provider, other = await create_entity(engine, kind="provider"), await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    other_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=other))
    narrowed = await token_for(client, admin, voucher, provider_entity_id=provider, max_amount_fen=300_000 * YUAN)
    assert_problem(
        await client.post(
            "/v1/holds", headers={**other_key, "Idempotency-Key": "h0"}, json={"token": narrowed, "amount_fen": 1}
        ),
        403,
        "wrong_provider",
    )
    assert_problem(
        await client.post(
            "/v1/holds",
            headers={**key, "Idempotency-Key": "h1"},
            json={"token": narrowed, "amount_fen": 300_000 * YUAN + 1},
        ),
        409,
        "token_limit_reached",
    )
    held = await client.post(
        "/v1/holds",
        headers={**key, "Idempotency-Key": "h2"},
        json={"token": narrowed, "amount_fen": 200_000 * YUAN, "expires_in_s": 3600},
    )
    assert held.status_code == 201, held.text
    hold_id = held.json()["id"]
    assert (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()["held_fen"] == 200_000 * YUAN
    captured = await client.post(
        f"/v1/holds/{hold_id}/capture",
        headers={**key, "Idempotency-Key": "c1"},
        json={"invoice_no": "M-1", "lines": compute_lines(150_000, other_yuan=10)},
    )
    assert captured.status_code == 201, captured.text
    assert captured.json()["subsidy_fen"] == 150_000 * YUAN
    state = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()
    assert (state["held_fen"], state["redeemed_fen"], state["available_fen"]) == (0, 150_000 * YUAN, 850_000 * YUAN)
    assert_problem(
        await client.post(f"/v1/holds/{hold_id}/void", headers={**key, "Idempotency-Key": "v1"}), 409, "conflict"
    )
    # the token's limit holds across every redemption made with it
    over = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "n1"},
        json={"token": narrowed, "invoice_no": "M-2", "lines": compute_lines(400_000)},
    )
    assert over.json()["subsidy_fen"] == 150_000 * YUAN
    assert_problem(
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "n2"},
            json={"token": narrowed, "invoice_no": "M-3", "lines": compute_lines(1)},
        ),
        409,
        "token_limit_reached",
    )
    second = await client.post(
        "/v1/holds",
        headers={**key, "Idempotency-Key": "h3"},
        json={"token": await token_for(client, admin, voucher), "amount_fen": 100},
    )
    voided = await client.post(f"/v1/holds/{second.json()['id']}/void", headers={**key, "Idempotency-Key": "v2"})
    assert voided.json()["status"] == "voided"


async def test_affiliated_providers_and_ended_vouchers_are_refused(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, holder = await compute_voucher(client, admin, engine, 600_000)
    sister = await create_entity(engine, kind="provider")
    assert (
        await client.post(
            "/v1/affiliations",
            headers=admin,
            json={"from_entity_id": holder, "to_entity_id": sister, "kind": "control", "valid_from": "2020-01-01"},
        )
    ).status_code == 201
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=sister))
    token = await token_for(client, admin, voucher)
    refused = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "a1"},
        json={"token": token, "invoice_no": "A-1", "lines": compute_lines(10)},
    )
    assert_problem(refused, 403, "affiliated_party")
    assert refused.json()["errors"][0]["path"][0]["to_entity_id"] == sister
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    assert (
        await client.post(
            f"/v1/vouchers/{voucher}/revoke", headers=admin, json={"reason": "test", "grounds": "administrative"}
        )
    ).status_code == 200
    assert_problem(
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "a2"},
            json={"token": token, "invoice_no": "A-2", "lines": compute_lines(10)},
        ),
        409,
        "voucher_revoked",
    )


async def test_reverse_returns_value_and_bad_input_changes_nothing(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    token = await token_for(client, admin, voucher)
    redeemed = (
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "x1"},
            json={"token": token, "invoice_no": "X-1", "lines": compute_lines(40_000)},
        )
    ).json()
    assert_problem(
        await client.post(
            f"/v1/redemptions/{redeemed['id']}/reverse",
            headers=key,
            json={"reason": "fraud", "grounds": "administrative"},
        ),
        403,
        "forbidden",
    )
    reversed_ = await client.post(
        f"/v1/redemptions/{redeemed['id']}/reverse",
        headers=admin,
        json={"reason": "invoice forged", "grounds": "administrative"},
    )
    assert reversed_.status_code == 200 and reversed_.json()["reversed_at"] is not None
    assert (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()["available_fen"] == 600_000 * YUAN
    before = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()
    for bad in (
        {"token": token, "invoice_no": "X-2", "lines": []},
        {"token": token, "invoice_no": "X-2", "lines": [{"category": "gpu", "amount_fen": 1}]},
        {"token": token, "invoice_no": "X-2", "lines": [{"category": "compute", "amount_fen": -5}]},
        {"token": token, "invoice_no": "X-2", "lines": [{"category": "compute", "amount_fen": 1.5}]},
        {"token": token, "invoice_no": "X-2", "lines": compute_lines(1), "tip": 1},
    ):
        assert_problem(
            await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "bad"}, json=bad),
            422,
            "validation_error",
        )
    assert_problem(
        await client.post(
            "/v1/redemptions", headers=key, json={"token": token, "invoice_no": "X-2", "lines": compute_lines(1)}
        ),
        422,
        "validation_error",
    )  # no Idempotency-Key
    assert_problem(
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "t1"},
            json={"token": token + "x", "invoice_no": "X-3", "lines": compute_lines(1)},
        ),
        401,
        "invalid_token",
    )
    assert (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json() == before


async def approved_voucher(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    program: str,
    holder: str,
    basis: dict[str, Any],
    award_fen: int | None = None,
) -> str:
    path = f"/v1/programs/{program}/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    await client.put(path, headers=admin, json={"amount_fen": current + 5_000_000 * YUAN})
    submitted = await client.post(
        "/v1/applications",
        headers=admin,
        json={"program": program, "applicant_entity_id": holder, "year": YEAR, "basis": basis},
    )
    assert submitted.status_code == 201, submitted.text
    approved = await client.post(
        f"/v1/applications/{submitted.json()['id']}/approve",
        headers=admin,
        json={"award_fen": award_fen} if award_fen else None,
    )
    assert approved.status_code == 201, approved.text
    voucher: str = approved.json()["id"]
    return voucher


async def test_program_rates_at_redemption(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    # data.pilot_dataset: 30% of the dataset lines, floored once on their total
    holder = await create_entity(engine)
    pilot = await approved_voucher(
        client,
        admin,
        "data.pilot_dataset",
        holder,
        {"project_ref": f"PD-{holder[-8:]}", "pilot_base": "中试基地"},
        1_000_000 * YUAN,
    )
    exchange = await create_entity(engine, kind="provider")
    key = {**bearer(await create_key(engine, Role.PROVIDER, entity_id=exchange))}
    paid = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "p1"},
        json={
            "token": await token_for(client, admin, pilot),
            "invoice_no": "D-1",
            "lines": [
                {"category": "dataset", "amount_fen": 22_222},
                {"category": "dataset", "amount_fen": 11_111},
                {"category": "compute", "amount_fen": 50_000},
            ],
        },
    )
    assert paid.status_code == 201, paid.text
    assert (paid.json()["eligible_fen"], paid.json()["subsidy_fen"]) == (33_333, 9_999)  # 30% of 333.33 元

    # model.first_purchase: only the named vendor redeems; 45% with the uplift
    developer, buyer = await create_entity(engine, kind="provider"), await create_entity(engine)  # a model vendor
    model = f"M-{developer[-8:]}"
    path = f"/v1/programs/model.first_filing/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    await client.put(path, headers=admin, json={"amount_fen": current + 1_000_000 * YUAN})
    filing = await client.post(
        "/v1/applications",
        headers=admin,
        json={
            "program": "model.first_filing",
            "applicant_entity_id": developer,
            "year": YEAR,
            "basis": {"model_ref": model, "filing_no": f"F-{model}"},
        },
    )
    await client.post(f"/v1/applications/{filing.json()['id']}/approve", headers=admin, json={"award_fen": 100})
    voucher = await approved_voucher(
        client,
        admin,
        "model.first_purchase",
        buyer,
        {
            "model_ref": model,
            "vendor_entity_id": developer,
            "industry": "finance",
            "contract_no": f"C-{model}",
            "contract_fen": 1_000_000 * YUAN,
            "rd_project": True,
        },
    )
    token = await token_for(client, admin, voucher)
    stranger = bearer(await create_key(engine, Role.PROVIDER))
    assert_problem(
        await client.post(
            "/v1/redemptions",
            headers={**stranger, "Idempotency-Key": "m0"},
            json={"token": token, "invoice_no": "V-1", "lines": [{"category": "api_calls", "amount_fen": 100}]},
        ),
        403,
        "wrong_provider",
    )
    vendor = bearer(await create_key(engine, Role.PROVIDER, entity_id=developer))
    paid = await client.post(
        "/v1/redemptions",
        headers={**vendor, "Idempotency-Key": "m1"},
        json={
            "token": token,
            "invoice_no": "V-1",
            "lines": [{"category": "api_calls", "amount_fen": 333}, {"category": "compute", "amount_fen": 1_000}],
        },
    )
    assert (paid.json()["eligible_fen"], paid.json()["subsidy_fen"]) == (333, 149)  # 45% of 3.33 元 = 1.49 元


async def test_a_clawback_after_expiry_returns_to_the_budget(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    redeemed = (
        await client.post(
            "/v1/redemptions",
            headers={**key, "Idempotency-Key": "e1"},
            json={
                "token": await token_for(client, admin, voucher),
                "invoice_no": "E-1",
                "lines": compute_lines(100_000),
            },
        )
    ).json()
    budget_path = f"/v1/programs/compute.purchase/budgets/{YEAR}"
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE voucher SET expires_at = now() - interval '1 second' WHERE id = :v"), {"v": voucher}
        )
    before = (await client.get(budget_path, headers=admin)).json()["available_fen"]
    reversed_ = await client.post(
        f"/v1/redemptions/{redeemed['id']}/reverse",
        headers=admin,
        json={"reason": "not delivered", "grounds": "administrative"},
    )
    assert reversed_.status_code == 200, reversed_.text
    after = (await client.get(budget_path, headers=admin)).json()["available_fen"]
    assert after - before == 100_000 * YUAN  # the voucher has ended: the value goes back to the budget
    state = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()
    assert (state["status"], state["redeemed_fen"], state["available_fen"]) == ("expired", 0, 0)
    async with engine.connect() as conn:
        assert await Ledger().verify_cached_balances(conn) == []


# -- the one-round-trip path (voucher_redeem, migration 0011) ---------------------------------------------


async def test_the_answer_built_by_the_database_is_the_redemption_as_read(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, holder = await compute_voucher(client, admin, engine, 600_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    body = {
        "token": await token_for(client, admin, voucher),
        "invoice_no": "  DB-1  ",
        "lines": compute_lines(300, other_yuan=7),
    }
    created = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "db-1"}, json=body)
    assert created.status_code == 201, created.text
    assert created.headers["content-type"] == "application/json"
    read = await client.get(f"/v1/redemptions/{created.json()['id']}", headers=key)
    assert read.status_code == 200, read.text
    assert created.json() == read.json()
    assert created.json()["invoice_no"] == "DB-1" and created.json()["voucher_id"] == voucher
    replayed = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "db-1"}, json=body)
    assert replayed.status_code == 201 and replayed.json() == created.json()
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT e.memo, e.metadata::text AS metadata, r.jti FROM redemption r "
                    "JOIN ledger_entry e ON e.id = r.entry_id WHERE r.id = :id"
                ),
                {"id": created.json()["id"]},
            )
        ).one()
    assert row.memo.startswith(f"compute.purchase: redemption {created.json()['id']} of voucher {voucher}")
    assert holder not in row.metadata and provider in row.metadata


async def test_timestamps_written_by_the_database_read_as_pydantic_writes_them(engine: AsyncEngine) -> None:
    from datetime import UTC, datetime

    from pydantic import TypeAdapter

    moments = [
        datetime(2027, 1, 1, tzinfo=UTC),
        datetime(2027, 3, 4, 5, 6, 7, 1, tzinfo=UTC),
        datetime(2027, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2027, 6, 1, 12, 0, 0, 120_000, tzinfo=UTC),
    ]
    adapter = TypeAdapter(datetime)
    async with engine.connect() as conn:
        for moment in moments:
            written = await conn.scalar(text("SELECT vl_json_time(:t)"), {"t": moment})
            assert written == adapter.dump_python(moment, mode="json"), moment


async def test_a_relation_recorded_by_another_process_is_seen_by_a_cached_graph(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """The graph cached by the first redemption is not trusted blindly: a relation recorded elsewhere (here
    straight through the domain layer, so this process's cache is not told) moves the registry version,
    and the next redemption sees it."""
    from datetime import date

    from sqlalchemy.ext.asyncio import AsyncSession

    from vouchers.affiliations import NewAffiliation, record_affiliation

    voucher, holder = await compute_voucher(client, admin, engine, 600_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    token = await token_for(client, admin, voucher)
    first = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "g-1"},
        json={"token": token, "invoice_no": "G-1", "lines": compute_lines(10)},
    )
    assert first.status_code == 201, first.text
    async with AsyncSession(engine) as session:
        await record_affiliation(session, NewAffiliation(holder, provider, "control", date(2020, 1, 1)))
        await session.commit()
    refused = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": "g-2"},
        json={"token": token, "invoice_no": "G-2", "lines": compute_lines(10)},
    )
    assert_problem(refused, 403, "affiliated_party")
    assert refused.json()["errors"][0]["path"][0]["to_entity_id"] == provider


async def test_one_invoice_under_many_keys_at_once_is_redeemed_once(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    provider = await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    token = await token_for(client, admin, voucher)
    results = await asyncio.gather(
        *(
            client.post(
                "/v1/redemptions",
                headers={**key, "Idempotency-Key": f"twin-{i}"},
                json={"token": token, "invoice_no": "TWIN-1", "lines": compute_lines(10)},
            )
            for i in range(16)
        )
    )
    assert sorted(r.status_code for r in results) == [201] + [409] * 15, [r.text for r in results][:3]
    assert {r.json()["code"] for r in results if r.status_code == 409} == {"conflict"}
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM redemption WHERE voucher_id = :v"), {"v": voucher}) == 1
    # each refusal is that key's answer from now on
    again = await client.post(
        "/v1/redemptions",
        headers={**key, "Idempotency-Key": next(f"twin-{i}" for i, r in enumerate(results) if r.status_code == 409)},
        json={"token": token, "invoice_no": "TWIN-1", "lines": compute_lines(10)},
    )
    assert_problem(again, 409, "conflict")


async def test_a_refusal_found_before_the_database_is_stored_and_replayed(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """A narrowed token at the wrong provider is refused in Python, before the database is asked; the
    refusal is still the key's answer, and a success stored first under a key is never overwritten by one."""
    voucher, _holder = await compute_voucher(client, admin, engine, 600_000)
    provider, other = await create_entity(engine, kind="provider"), await create_entity(engine, kind="provider")
    key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    other_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=other))
    narrowed = await token_for(client, admin, voucher, provider_entity_id=provider)
    body = {"token": narrowed, "invoice_no": "W-1", "lines": compute_lines(10)}
    refused = await client.post("/v1/redemptions", headers={**other_key, "Idempotency-Key": "w-1"}, json=body)
    assert_problem(refused, 403, "wrong_provider")
    again = await client.post("/v1/redemptions", headers={**other_key, "Idempotency-Key": "w-1"}, json=body)
    assert again.status_code == 403 and again.json() == refused.json()
    paid = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "w-2"}, json=body)
    assert paid.status_code == 201, paid.text
    jti = jwt.decode(narrowed, options={"verify_signature": False})["jti"]
    async with engine.connect() as conn:
        await conn.execute(text("UPDATE voucher_token SET revoked_at = now() WHERE jti = :j"), {"j": jti})
        await conn.commit()
    # the first answer stands for its key; a new request with the revoked token is refused
    replayed = await client.post("/v1/redemptions", headers={**key, "Idempotency-Key": "w-2"}, json=body)
    assert replayed.status_code == 201 and replayed.json() == paid.json()
    assert_problem(
        await client.post(
            "/v1/redemptions", headers={**key, "Idempotency-Key": "w-3"}, json={**body, "invoice_no": "W-3"}
        ),
        401,
        "invalid_token",
    )
