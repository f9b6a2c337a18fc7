"""免申即享 (art. 19): tagging an entity `innovation_team` grants its compute voucher from the sales providers
reported, with no action from the entity; later reports top it up; nothing is ever counted twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.db import make_engine
from app.policy_tasks import grant_automatic, policy_pass
from app.settings import Settings
from tests.test_support import bearer, create_entity, create_key, running_app
from vouchers.rules import program_year

YUAN = 100


@pytest.fixture
async def own(fresh_db_url: str) -> AsyncIterator[tuple[Settings, AsyncEngine]]:
    # a database of its own: the grant is for the current program year, whatever year the suite runs in
    settings = Settings(database_url=fresh_db_url, background_tasks=False, api_key_cache_ttl_s=0)
    engine = make_engine(fresh_db_url, settings)
    yield settings, engine
    await engine.dispose()


def state_of(client: httpx.AsyncClient) -> object:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return transport.app.state  # type: ignore[attr-defined]


async def vouchers_of(engine: AsyncEngine, entity: str) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT face_value_fen FROM voucher WHERE holder_entity_id = :e ORDER BY created_at"), {"e": entity}
        )
        return [int(v) for v in rows.scalars()]


async def test_tagging_grants_and_later_reports_top_up(own: tuple[Settings, AsyncEngine]) -> None:
    settings, engine = own
    year = program_year(datetime.now(UTC))
    admin = bearer(await create_key(engine, Role.ADMIN))
    team, untagged = await create_entity(engine), await create_entity(engine)
    provider = await create_entity(engine, kind="provider")
    provider_key = bearer(await create_key(engine, Role.PROVIDER, entity_id=provider))
    async with running_app(settings) as client:
        assert (
            await client.put(
                f"/v1/programs/compute.purchase/budgets/{year}", headers=admin, json={"amount_fen": 10_000_000 * YUAN}
            )
        ).status_code == 200

        async def report(buyer: str, invoice: str, amount_yuan: int, category: str = "compute") -> None:
            response = await client.post(
                "/v1/purchases",
                headers=provider_key,
                json={
                    "buyer_entity_id": buyer,
                    "invoice_no": invoice,
                    "category": category,
                    "amount_fen": amount_yuan * YUAN,
                    "purchased_on": f"{year - 1}-06-01",
                },
            )
            assert response.status_code == 201, response.text

        for buyer in (team, untagged):
            await report(buyer, f"I-{buyer[-6:]}-1", 1_500_000)
            await report(buyer, f"I-{buyer[-6:]}-2", 100_000, category="storage")
        response = await client.patch(f"/v1/entities/{team}", headers=admin, json={"tags": ["innovation_team"]})
        assert response.status_code == 200, response.text
        assert await vouchers_of(engine, team) == [750_000 * YUAN]  # 50% of the compute sales, at once
        listed = (await client.get("/v1/applications", headers=admin, params={"entity_id": team})).json()["data"]
        assert [(a["automatic"], a["status"]) for a in listed] == [(True, "issued")]
        assert {e["reason"] for e in listed[0]["computed"]["excluded"]} == {"category"}

        state = state_of(client)
        assert await grant_automatic(state, team) is False  # nothing new: nothing is counted twice
        await report(team, f"I-{team[-6:]}-3", 1_000_000)
        await policy_pass(state)  # the background pass tops it up
        assert await vouchers_of(engine, team) == [750_000 * YUAN, 500_000 * YUAN]
        assert await vouchers_of(engine, untagged) == []  # no tag, no grant
