"""A replay under an `Idempotency-Key` is the first answer byte for byte, on every idempotent route, for a
success and for a refusal alike (issue 12, section 6: a hold's replay came back with its keys reordered,
because the first answer was written by Python and the replay by PostgreSQL's jsonb)."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.idempotency import render
from app.settings import Settings
from tests.test_fastpath import both_apps, cached, warm
from tests.test_redemptions import compute_lines, compute_voucher, token_for
from tests.test_support import bearer, create_entity, create_key

YUAN = 100


async def twice(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], body: Any = None, *, status: int
) -> httpx.Response:
    """POST the same request under one new key twice: the second answer is the first, byte for byte."""
    keyed = {**headers, "Idempotency-Key": f"replay-{uuid.uuid4().hex}"}
    first = await client.post(path, headers=keyed, json=body)
    again = await client.post(path, headers=keyed, json=body)
    assert first.status_code == status, first.text
    assert again.status_code == first.status_code
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.content == first.content, (first.content, again.content)
    return first


async def test_every_idempotent_route_replays_its_first_answer_byte_for_byte(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with both_apps(cached(settings)) as apps:
        client = apps.fast
        admin = bearer(await create_key(engine, Role.ADMIN))
        voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
        provider = await create_entity(engine, kind="provider")
        provider_key = await create_key(engine, Role.PROVIDER, entity_id=provider)
        other_key = bearer(await create_key(engine, Role.PROVIDER))
        key = bearer(provider_key)
        await warm((apps.fast, apps.plain), provider_key)
        token = await token_for(client, admin, voucher)
        narrowed = await token_for(client, admin, voucher, provider_entity_id=provider, max_amount_fen=50_000 * YUAN)

        # redemptions, on the fast path and on the route: created, a refusal found in Python (the token
        # narrowed to another provider) and one found by the database (the invoice redeemed already)
        redeemed = []
        for n, app_client in enumerate((apps.fast, apps.plain)):
            body = {"token": token, "invoice_no": f"RP-{n}", "lines": compute_lines(1_000)}
            redeemed.append((await twice(app_client, "/v1/redemptions", key, body, status=201)).json())
            await twice(app_client, "/v1/redemptions", other_key, {**body, "token": narrowed}, status=403)
            await twice(app_client, "/v1/redemptions", key, body, status=409)

        # holds: created and refused; captured; voided, and a void refused
        hold = await twice(client, "/v1/holds", key, {"token": token, "amount_fen": 2_000 * YUAN}, status=201)
        await twice(client, "/v1/holds", key, {"token": narrowed, "amount_fen": 60_000 * YUAN}, status=409)
        capture = {"invoice_no": "RP-C", "lines": compute_lines(1_500)}
        captured = await twice(client, f"/v1/holds/{hold.json()['id']}/capture", key, capture, status=201)
        second = await twice(client, "/v1/holds", key, {"token": token, "amount_fen": 100}, status=201)
        await twice(client, f"/v1/holds/{second.json()['id']}/void", key, status=200)
        await twice(client, f"/v1/holds/{second.json()['id']}/void", key, status=409)

        # a provider's refund, an admin's clawback
        refund = {"amount_fen": 100 * YUAN, "reason": "work not delivered"}
        await twice(client, f"/v1/redemptions/{redeemed[0]['id']}/refund", key, refund, status=200)
        reverse = {"reason": "invoice withdrawn", "grounds": "administrative"}
        await twice(client, f"/v1/redemptions/{captured.json()['id']}/reverse", admin, reverse, status=200)

        # settlement: paid, then nothing left to pay
        await twice(client, "/v1/settlements", admin, {"entity_ids": [provider]}, status=201)
        await twice(client, "/v1/settlements", admin, {"entity_ids": [provider]}, status=409)


def _documents(count: int) -> list[Any]:
    """Documents with what tells jsonb's text form apart: keys of every length and of multi-byte letters,
    control characters, quotes and backslashes in text, big and negative integers, empty containers."""
    rng = random.Random(12)
    letters = ["a", "b", "Z", "_", "é", "中", "😀", '"', "\\", "\n", "\x01", "\x1f", "\x7f", "\u2028", "/", " ", "<"]

    def word(size: int) -> str:
        return "".join(rng.choice(letters) for _ in range(size))

    def value(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice([True, False])
        if kind == 2:
            return rng.choice([0, -1, 7, 10**15, -(10**18), 2**63 - 1])
        if kind in (3, 4):
            return word(rng.randrange(6))
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {word(rng.randrange(5)): value(depth + 1) for _ in range(rng.randrange(6))}

    return [{word(rng.randrange(4)): value(0) for _ in range(rng.randrange(8))} for _ in range(count)]


_WRITTEN_BY_POSTGRESQL = text(
    "SELECT CAST(d AS jsonb)::text FROM unnest(CAST(:docs AS text[])) WITH ORDINALITY u(d, n) ORDER BY n"
)


async def test_an_answer_is_rendered_as_postgresql_writes_its_jsonb(engine: AsyncEngine) -> None:
    documents = _documents(400)
    async with engine.connect() as conn:
        written = (
            await conn.execute(
                _WRITTEN_BY_POSTGRESQL,
                {"docs": [json.dumps(document, ensure_ascii=False) for document in documents]},
            )
        ).scalars()
        for document, by_postgresql in zip(documents, written, strict=True):
            assert render(document) == by_postgresql.encode(), document
