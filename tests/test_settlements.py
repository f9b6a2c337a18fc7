"""Settlement through the real app: payable accounts paid out to `treasury:disbursed`, one entry per batch,
idempotent under retries and concurrent duplicates; and `app/idempotency.py` on its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import idempotency
from app.apikeys import Role
from app.db import make_engine
from app.settings import Settings
from ledger.postings import POSTINGS_MAX
from ledger.service import Ledger
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers import settlements
from vouchers.settlements import DISBURSED_ACCOUNT, SETTLEMENT_ITEMS_MAX, payable_account

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
FILING = "model.first_filing"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


def keyed(headers: dict[str, str], key: str | None = None) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key or f"stl-{uuid.uuid4().hex}"}


async def fund(client: httpx.AsyncClient, admin: dict[str, str], program: str, amount_fen: int) -> None:
    path = f"/v1/programs/{program}/budgets/{YEAR}"
    current = (await client.get(path, headers=admin)).json()["budget_fen"]
    response = await client.put(path, json={"amount_fen": current + amount_fen}, headers=admin)
    assert response.status_code == 200, response.text


async def payout(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    entity: str,
    program: str,
    basis: dict[str, Any],
    award_fen: int | None = None,
) -> dict[str, Any]:
    """Apply and approve a payout program: its award is credited to the entity's payable account."""
    applied = await client.post(
        "/v1/applications",
        json={"program": program, "applicant_entity_id": entity, "year": YEAR, "basis": basis},
        headers=admin,
    )
    assert applied.status_code == 201, applied.text
    approved = await client.post(
        f"/v1/applications/{applied.json()['id']}/approve",
        json=None if award_fen is None else {"award_fen": award_fen},
        headers=admin,
    )
    assert approved.status_code == 201 and approved.json()["kind"] == "payout", approved.text
    body: dict[str, Any] = approved.json()
    return body


async def make_payable(client: httpx.AsyncClient, admin: dict[str, str], entity_id: str, amount_fen: int) -> str:
    """A real payout of `amount_fen` to the entity (a reviewer-set `model.first_filing` award): settlement
    pays rows (redemptions, payouts), never a bare balance. Returns the payout's application id."""
    await fund(client, admin, FILING, amount_fen)
    basis = {"model_ref": f"M-{uuid.uuid4().hex}", "filing_no": uuid.uuid4().hex}
    award = await payout(client, admin, entity_id, FILING, basis, award_fen=amount_fen)
    return str(award["application_id"])


async def owed_fen(engine: AsyncEngine, code: str) -> int:
    async with engine.connect() as conn:
        balance = await Ledger().balance(conn, code)
    return balance.credits_posted_fen - balance.debits_posted_fen


async def sealed_and_sound(engine: AsyncEngine) -> None:
    ledger = Ledger()
    async with engine.connect() as conn:
        while await ledger.seal(conn):
            await conn.commit()
        await conn.commit()
        assert await ledger.verify_cached_balances(conn) == []
        assert (await ledger.verify_chain(conn)).ok


async def settlements_paying(engine: AsyncEngine, entity_id: str) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(text("SELECT count(*) FROM settlement_item WHERE entity_id = :e"), {"e": entity_id})
    return int(count or 0)


async def test_settles_two_payouts_in_one_entry_and_replays(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    await fund(client, admin, "data.trusted_space", 1_000_000 * YUAN)
    await fund(client, admin, "model.industry_rollout", 1_000_000 * YUAN)
    space_lead = await create_entity(engine, kind="association")
    rollout_lead = await create_entity(engine, kind="department")
    await payout(
        client,
        admin,
        space_lead,
        "data.trusted_space",
        {"project_ref": f"S-{uuid.uuid4().hex[:12]}", "investment_fen": 1_000_000 * YUAN},
    )
    await payout(
        client,
        admin,
        rollout_lead,
        "model.industry_rollout",
        {"project_ref": f"R-{uuid.uuid4().hex[:12]}", "deployment_cost_fen": 2_000_000 * YUAN},
    )
    owed = {e: await owed_fen(engine, payable_account(e)) for e in (space_lead, rollout_lead)}
    assert owed == {space_lead: 300_000 * YUAN, rollout_lead: 600_000 * YUAN}
    disbursed_before = await owed_fen(engine, DISBURSED_ACCOUNT) if await _exists(engine, DISBURSED_ACCOUNT) else 0

    key = f"stl-{uuid.uuid4().hex}"
    body = {"entity_ids": [rollout_lead, space_lead]}
    response = await client.post("/v1/settlements", json=body, headers=keyed(admin, key))
    assert response.status_code == 201, response.text
    settled = response.json()
    assert settled["total_fen"] == 900_000 * YUAN and settled["has_more"] is False
    assert settled["settlement_ids"] == [settled["id"]] and settled["id"].startswith("stl_")
    assert sorted((i["entity_id"], i["account"], i["amount_fen"]) for i in settled["items"]) == sorted(
        (e, payable_account(e), amount) for e, amount in owed.items()
    )

    async with engine.connect() as conn:
        entry = await Ledger().entry(conn, int(settled["entry_id"]))
    assert entry.kind == "transfer" and entry.metadata["settlement"] == settled["id"]
    assert sorted((p.account, p.direction, p.amount_fen) for p in entry.postings) == sorted(
        [
            (payable_account(space_lead), "debit", 300_000 * YUAN),
            (payable_account(rollout_lead), "debit", 600_000 * YUAN),
            (DISBURSED_ACCOUNT, "credit", 900_000 * YUAN),
        ]
    )
    assert [await owed_fen(engine, payable_account(e)) for e in owed] == [0, 0]
    assert await owed_fen(engine, DISBURSED_ACCOUNT) == disbursed_before + 900_000 * YUAN

    # the same key and body: the first answer again, nothing new posted
    again = await client.post("/v1/settlements", json=body, headers=keyed(admin, key))
    assert again.status_code == 201 and again.json() == settled
    # the same key with another body
    assert_problem(
        await client.post("/v1/settlements", json={"entity_ids": [space_lead]}, headers=keyed(admin, key)),
        422,
        "idempotency_conflict",
    )
    # a new request: nothing is payable any more
    assert_problem(await client.post("/v1/settlements", json=body, headers=keyed(admin)), 409, "nothing_to_settle")
    assert [await settlements_paying(engine, e) for e in owed] == [1, 1]

    read = await client.get(f"/v1/settlements/{settled['id']}", headers=admin)
    assert read.status_code == 200
    assert read.json() == {k: v for k, v in settled.items() if k not in ("settlement_ids", "has_more")}
    listed = await client.get("/v1/settlements", params={"entity_id": space_lead}, headers=admin)
    assert [s["id"] for s in listed.json()["data"]] == [settled["id"]] and listed.json()["next_cursor"] is None
    await sealed_and_sound(engine)


async def _exists(engine: AsyncEngine, code: str) -> bool:
    async with engine.connect() as conn:
        return bool(await Ledger().balances(conn, codes=[code]))


async def test_a_refusal_is_remembered_under_its_key(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entity = await create_entity(engine, kind="provider")
    key = f"stl-{uuid.uuid4().hex}"
    body = {"entity_ids": [entity]}
    first = assert_problem(
        await client.post("/v1/settlements", json=body, headers=keyed(admin, key)), 409, "nothing_to_settle"
    )
    await make_payable(client, admin, entity, 5 * YUAN)
    # the retry is the same request: it stays refused; a new key settles
    assert (
        assert_problem(
            await client.post("/v1/settlements", json=body, headers=keyed(admin, key)), 409, "nothing_to_settle"
        )
        == first
    )
    assert (await client.post("/v1/settlements", json=body, headers=keyed(admin))).status_code == 201
    assert await owed_fen(engine, payable_account(entity)) == 0


async def test_concurrent_duplicates_make_one_settlement(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entity = await create_entity(engine, kind="provider")
    await make_payable(client, admin, entity, 1_234 * YUAN)
    headers = keyed(admin)
    responses = await asyncio.gather(
        *(client.post("/v1/settlements", json={"entity_ids": [entity]}, headers=headers) for _ in range(6))
    )
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert all(r.json() == responses[0].json() for r in responses)
    assert await settlements_paying(engine, entity) == 1
    assert await owed_fen(engine, payable_account(entity)) == 0


async def test_concurrent_settlements_with_different_keys_never_pay_twice(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entities = [await create_entity(engine, kind="provider") for _ in range(3)]
    for entity in entities:
        await make_payable(client, admin, entity, 700 * YUAN)
    responses = await asyncio.gather(
        *(client.post("/v1/settlements", json={"entity_ids": entities}, headers=keyed(admin)) for _ in range(5))
    )
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409, 409], [r.text for r in responses]
    assert [await owed_fen(engine, payable_account(e)) for e in entities] == [0, 0, 0]
    assert [await settlements_paying(engine, e) for e in entities] == [1, 1, 1]
    await sealed_and_sound(engine)


async def test_a_payout_committed_during_a_settlement_waits_for_the_next(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """A payable row that commits while a settlement runs is not settled by it (the settlement pays exactly
    the rows it locked) and is left, unmarked, for the next one."""
    entity = await create_entity(engine, kind="provider")
    await make_payable(client, admin, entity, 100 * YUAN)
    ledger = Ledger()
    async with engine.connect() as settling:
        run = await settlements.settle(
            settling, ledger, entity_ids=[entity], items_max=10, actor=None, now=datetime.now(UTC)
        )
        # nothing the settlement holds is in the way of a new award to the same payee
        late = await asyncio.wait_for(make_payable(client, admin, entity, 7 * YUAN), 10)
        await settling.commit()
    assert run.settlements[0].total_fen == 100 * YUAN
    async with engine.connect() as conn:
        unsettled = await conn.scalar(
            text("SELECT p.settlement_id FROM payout p WHERE p.application_id = :a"), {"a": late}
        )
    assert unsettled is None
    response = await client.post("/v1/settlements", json={"entity_ids": [entity]}, headers=keyed(admin))
    assert response.json()["total_fen"] == 7 * YUAN
    assert await owed_fen(engine, payable_account(entity)) == 0


async def test_settles_everything_in_batches_of_63_and_pages(fresh_db_url: str) -> None:
    settings = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings)
    try:
        admin = bearer(await create_key(engine, Role.ADMIN))
        entities = [await create_entity(engine, kind="provider") for _ in range(70)]
        async with running_app(settings) as client:
            for n, entity in enumerate(entities, start=1):
                await make_payable(client, admin, entity, n * YUAN)
            assert_problem(
                await client.post("/v1/settlements", json={"max_items": 0}, headers=keyed(admin)),
                422,
                "validation_error",
            )
            first = await client.post("/v1/settlements", json={"max_items": 65}, headers=keyed(admin))
            assert first.status_code == 201, first.text
            body = first.json()
            assert body["has_more"] is True and len(body["settlement_ids"]) == 2
            assert body["id"] == body["settlement_ids"][0] and len(body["items"]) == SETTLEMENT_ITEMS_MAX
            second_batch = (await client.get(f"/v1/settlements/{body['settlement_ids'][1]}", headers=admin)).json()
            assert len(second_batch["items"]) == 2 and second_batch["entry_id"] != body["entry_id"]

            rest = await client.post("/v1/settlements", headers=keyed(admin))  # no body: everything payable
            assert rest.status_code == 201, rest.text
            assert rest.json()["has_more"] is False and len(rest.json()["items"]) == 5
            assert_problem(await client.post("/v1/settlements", headers=keyed(admin)), 409, "nothing_to_settle")

            ids, cursor = [], None
            while True:
                page = await client.get(
                    "/v1/settlements", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=admin
                )
                assert page.status_code == 200, page.text
                ids += [s["id"] for s in page.json()["data"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            assert sorted(ids) == sorted([*body["settlement_ids"], rest.json()["id"]])
            totals = [(await client.get(f"/v1/settlements/{i}", headers=admin)).json()["total_fen"] for i in ids]
            assert sum(totals) == sum(range(1, 71)) * YUAN

        ledger = Ledger()
        async with engine.connect() as conn:
            for settlement_id in ids:
                entry_id = await conn.scalar(
                    text("SELECT entry_id FROM settlement WHERE id = :i"), {"i": settlement_id}
                )
                assert len((await ledger.entry(conn, int(entry_id))).postings) <= POSTINGS_MAX
            owed = await ledger.balances(conn, codes=[payable_account(e) for e in entities])
            assert {b.credits_posted_fen - b.debits_posted_fen for b in owed} == {0}
            disbursed = await ledger.balance(conn, DISBURSED_ACCOUNT)
            assert disbursed.credits_posted_fen == sum(range(1, 71)) * YUAN
        await sealed_and_sound(engine)
    finally:
        await engine.dispose()


async def test_who_may_settle_and_read(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    entity = await create_entity(engine, kind="provider")
    await make_payable(client, admin, entity, 10 * YUAN)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    limited = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"]))
    enterprise = bearer(await create_key(engine, Role.ENTERPRISE))
    provider = bearer(await create_key(engine, Role.PROVIDER, entity_id=entity))
    body = {"entity_ids": [entity]}
    for headers in (auditor, limited, enterprise, provider):
        assert_problem(await client.post("/v1/settlements", json=body, headers=keyed(headers)), 403, "forbidden")
    for headers in (enterprise, provider):
        assert_problem(await client.get("/v1/settlements", headers=headers), 403, "forbidden")
    assert_problem(await client.post("/v1/settlements", json=body), 401, "unauthorized")
    assert await owed_fen(engine, payable_account(entity)) == 10 * YUAN

    settled = (await client.post("/v1/settlements", json=body, headers=keyed(admin))).json()
    for headers in (auditor, limited, admin):
        assert (await client.get(f"/v1/settlements/{settled['id']}", headers=headers)).status_code == 200
        assert (await client.get("/v1/settlements", params={"entity_id": entity}, headers=headers)).json()["data"][0][
            "id"
        ] == settled["id"]
    for headers in (enterprise, provider):
        assert_problem(await client.get(f"/v1/settlements/{settled['id']}", headers=headers), 403, "forbidden")
    assert_problem(await client.get(f"/v1/settlements/stl_{'0' * 24}", headers=auditor), 404, "not_found")
    assert_problem(await client.get("/v1/settlements/nope", headers=auditor), 422, "validation_error")
    assert_problem(
        await client.get("/v1/settlements", params={"cursor": "x"}, headers=auditor), 422, "validation_error"
    )


@pytest.mark.parametrize(
    "body",
    [
        {"entity_ids": []},
        {"entity_ids": ["not-an-id"]},
        {"entity_ids": "ent_" + "a" * 24},
        {"entity_ids": [f"ent_{i:024d}" for i in range(501)]},
        {"max_items": 0},
        {"max_items": 501},
        {"max_items": "5"},
        {"max_items": 5.0},
        {"max_items": True},
        {"unknown": 1},
        [],
    ],
)
async def test_bad_input_is_422_and_changes_nothing(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, body: Any
) -> None:
    entity = await create_entity(engine, kind="provider")
    await make_payable(client, admin, entity, 3 * YUAN)
    key = f"stl-{uuid.uuid4().hex}"
    assert_problem(await client.post("/v1/settlements", json=body, headers=keyed(admin, key)), 422, "validation_error")
    assert await owed_fen(engine, payable_account(entity)) == 3 * YUAN
    async with engine.connect() as conn:
        assert (
            await conn.scalar(text("SELECT count(*) FROM idempotency_record WHERE idempotency_key = :k"), {"k": key})
            == 0
        )


async def test_the_idempotency_key_header_is_required(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entity = await create_entity(engine, kind="provider")
    await make_payable(client, admin, entity, 3 * YUAN)
    for headers in (admin, {**admin, "Idempotency-Key": ""}, {**admin, "Idempotency-Key": "k" * 256}):
        assert_problem(
            await client.post("/v1/settlements", json={"entity_ids": [entity]}, headers=headers),
            422,
            "validation_error",
        )
    assert await owed_fen(engine, payable_account(entity)) == 3 * YUAN


async def test_a_duplicate_still_running_after_the_wait_is_request_in_progress(
    client: httpx.AsyncClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"settler-{uuid.uuid4().hex[:8]}"
    admin = bearer(await create_key(engine, Role.ADMIN, name=name))
    async with engine.connect() as conn:
        key_id = str(await conn.scalar(text("SELECT id FROM api_key WHERE name = :n"), {"n": name}))
    monkeypatch.setattr(idempotency, "WAIT_S", 1)
    key = f"stl-{uuid.uuid4().hex}"
    async with engine.connect() as first:  # the first request, still running
        assert await _look(first, key_id, key, b"\x01" * 32) is None
        assert_problem(
            await client.post("/v1/settlements", json={}, headers=keyed(admin, key)), 409, "request_in_progress"
        )
        await first.rollback()


# -- app/idempotency.py on its own -------------------------------------------------------------------------


async def _look(conn: AsyncConnection, caller: str, key: str, digest: bytes, route: str = "POST /test") -> Any:
    return await idempotency.replay_or_none(conn, caller_key_id=caller, key=key, route=route, request_hash=digest)


async def _keep(conn: AsyncConnection, caller: str, key: str, digest: bytes, body: dict[str, Any]) -> None:
    await idempotency.remember(
        conn, caller_key_id=caller, key=key, route="POST /test", request_hash=digest, status_code=201, body=body
    )


async def test_idempotency_records_replays_and_conflicts(engine: AsyncEngine) -> None:
    caller, key = f"key-{uuid.uuid4().hex[:8]}", "k-1"
    digest = idempotency.request_hash("POST /test", {"a": 1, "b": [1, 2]})
    assert digest == idempotency.request_hash("POST /test", {"b": [1, 2], "a": 1})
    assert digest != idempotency.request_hash("POST /other", {"a": 1, "b": [1, 2]})
    async with engine.connect() as conn:
        default_timeout = await conn.scalar(text("SHOW lock_timeout"))
        assert await _look(conn, caller, key, digest) is None
        assert await conn.scalar(text("SHOW lock_timeout")) == default_timeout  # restored once the lock is held
        await _keep(conn, caller, key, digest, {"id": "x-1", "amount_fen": 5, "名": "结算"})
        await conn.commit()
    async with engine.connect() as conn:
        stored = await _look(conn, caller, key, digest)
        assert stored == (201, {"id": "x-1", "amount_fen": 5, "名": "结算"})
        assert idempotency.response(stored).status_code == 201
        with pytest.raises(idempotency.IdempotencyKeyReused):
            await _look(conn, caller, key, b"\x00" * 32)
        with pytest.raises(idempotency.IdempotencyKeyReused):
            await _look(conn, caller, key, digest, route="POST /elsewhere")
        assert await _look(conn, f"{caller}-other", key, digest) is None  # keys are scoped to the caller
        await conn.rollback()


async def test_idempotency_a_duplicate_waits_for_the_first(engine: AsyncEngine) -> None:
    caller, key, digest = f"key-{uuid.uuid4().hex[:8]}", "k-2", b"\x02" * 32
    async with engine.connect() as first, engine.connect() as second:
        assert await _look(first, caller, key, digest) is None
        waiting = asyncio.create_task(_look(second, caller, key, digest))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # blocked on the first's lock
        await _keep(first, caller, key, digest, {"id": "first"})
        await first.commit()
        assert await asyncio.wait_for(waiting, 5) == (201, {"id": "first"})
        await second.rollback()


async def test_idempotency_a_duplicate_of_a_failed_first_runs_itself(engine: AsyncEngine) -> None:
    caller, key, digest = f"key-{uuid.uuid4().hex[:8]}", "k-3", b"\x03" * 32
    async with engine.connect() as first, engine.connect() as second:
        assert await _look(first, caller, key, digest) is None
        waiting = asyncio.create_task(_look(second, caller, key, digest))
        await asyncio.sleep(0.2)
        await first.rollback()  # the first failed: nothing stored
        assert await asyncio.wait_for(waiting, 5) is None
        await second.rollback()


async def test_idempotency_gives_up_after_the_wait(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, "WAIT_S", 1)
    caller, key, digest = f"key-{uuid.uuid4().hex[:8]}", "k-4", b"\x04" * 32
    async with engine.connect() as first, engine.connect() as second:
        assert await _look(first, caller, key, digest) is None
        with pytest.raises(idempotency.RequestInProgress) as raised:
            await _look(second, caller, key, digest)
        assert isinstance(raised.value.__cause__, DBAPIError)
        await second.rollback()
        await first.rollback()
