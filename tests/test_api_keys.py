"""API keys over HTTP: created and shown once, listed without secrets, revoked for good; roles enforced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import KEY_PATTERN
from app.settings import Settings
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app, unique_entity


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, "admin", name="test admin"))


async def test_create_list_revoke(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    entity = await create_entity(engine, kind="provider")
    response = await client.post(
        "/v1/api-keys", headers=admin, json={"role": "provider", "name": "till 1", "entity_id": entity}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    key = created["key"]
    assert KEY_PATTERN.fullmatch(key)
    assert key.startswith(f"vl_{created['prefix']}_")
    assert created["id"].startswith("key_")
    assert created["role"] == "provider" and created["entity_id"] == entity and created["name"] == "till 1"
    assert created["voucher_types"] is None and created["revoked_at"] is None
    assert created["created_at"].endswith("Z") or "+" in created["created_at"]

    # only the hash is stored
    async with engine.connect() as conn:
        stored = (await conn.execute(text("SELECT * FROM api_key WHERE id = :id"), {"id": created["id"]})).one()
    assert key.encode() not in bytes(stored.secret_hash) and len(stored.secret_hash) == 32

    # the new key works, for what its role may do
    provider = bearer(key)
    assert_problem(await client.get("/v1/api-keys", headers=provider), 403, "forbidden")

    # listed without secrets, found by walking the pages
    found = None
    cursor: str | None = None
    for _ in range(1000):
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await client.get("/v1/api-keys", headers=admin, params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert set(body) == {"data", "next_cursor"} and len(body["data"]) <= 2
        for item in body["data"]:
            assert "key" not in item and "secret_hash" not in item
            assert key not in page.text
            if item["id"] == created["id"]:
                found = item
        cursor = body["next_cursor"]
        if found or cursor is None:
            break
    assert found is not None
    assert found["prefix"] == created["prefix"] and found["entity_id"] == entity

    # revoked: 200 with the record, and the key stops working at once
    revoked = await client.delete(f"/v1/api-keys/{created['id']}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None and "key" not in revoked.json()
    assert_problem(await client.get("/v1/api-keys", headers=provider), 401, "unauthorized")

    # revoking again changes nothing
    again = await client.delete(f"/v1/api-keys/{created['id']}", headers=admin)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


async def test_revoke_unknown_key_is_404(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    assert_problem(await client.delete("/v1/api-keys/key_doesnotexist", headers=admin), 404, "not_found")


async def test_list_is_newest_first_and_pages_do_not_overlap(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    for _ in range(3):
        await create_key(engine, "auditor")
    seen: list[str] = []
    created: list[str] = []
    cursor = None
    for _ in range(1000):
        params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        body = (await client.get("/v1/api-keys", headers=admin, params=params)).json()
        seen += [item["id"] for item in body["data"]]
        created += [item["created_at"] for item in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) >= 4
    assert created == sorted(created, reverse=True)
    everything = (await client.get("/v1/api-keys", headers=admin, params={"limit": "500"})).json()
    assert [item["id"] for item in everything["data"]] == seen[: len(everything["data"])]


@pytest.mark.parametrize(
    "params", [{"cursor": "not-a-cursor"}, {"cursor": "eyJ4IjogMX0"}, {"limit": "0"}, {"limit": "501"}]
)
async def test_bad_paging_is_422(client: httpx.AsyncClient, admin: dict[str, str], params: dict[str, str]) -> None:
    assert_problem(await client.get("/v1/api-keys", headers=admin, params=params), 422, "validation_error")


@pytest.mark.parametrize(("role", "status"), [("admin", 200), ("auditor", 403), ("enterprise", 403), ("provider", 403)])
async def test_role_matrix(client: httpx.AsyncClient, engine: AsyncEngine, role: str, status: int) -> None:
    headers = bearer(await create_key(engine, role))
    for method, path in [("GET", "/v1/api-keys"), ("POST", "/v1/api-keys"), ("DELETE", "/v1/api-keys/key_x")]:
        json = {"role": "auditor", "name": "x"} if method == "POST" else None
        response = await client.request(method, path, headers=headers, json=json)
        if status == 403:
            assert_problem(response, 403, "forbidden")
        else:
            assert response.status_code in (200, 201, 404), response.text
    for method, path in [("GET", "/v1/api-keys"), ("POST", "/v1/api-keys"), ("DELETE", "/v1/api-keys/key_x")]:
        assert_problem(await client.request(method, path), 401, "unauthorized")


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"role": "enterprise", "name": "x"}, ["body", "entity_id"]),
        ({"role": "provider", "name": "x"}, ["body", "entity_id"]),
        ({"role": "admin", "name": "x", "entity_id": "ent_1"}, ["body", "entity_id"]),
        ({"role": "auditor", "name": "x", "entity_id": "ent_1"}, ["body", "entity_id"]),
        ({"role": "enterprise", "name": "x", "entity_id": "has space"}, ["body", "entity_id"]),
        ({"role": "admin", "name": "x", "voucher_types": ["food"]}, ["body", "voucher_types", 0]),
        ({"role": "admin", "name": "x", "voucher_types": []}, ["body", "voucher_types"]),
        ({"role": "admin", "name": "x", "voucher_types": "compute"}, ["body", "voucher_types"]),
        ({"role": "auditor", "name": "x", "voucher_types": ["data"]}, ["body", "voucher_types"]),
        ({"role": "provider", "name": "x", "entity_id": "e1", "voucher_types": ["data"]}, ["body", "voucher_types"]),
        ({"role": "auditor", "name": "   "}, ["body", "name"]),
        ({"role": "auditor", "name": "x" * 201}, ["body", "name"]),
    ],
)
async def test_create_validation(
    client: httpx.AsyncClient, admin: dict[str, str], payload: dict[str, object], loc: list[object]
) -> None:
    body = assert_problem(await client.post("/v1/api-keys", headers=admin, json=payload), 422, "validation_error")
    assert loc in [error["loc"] for error in body["errors"]], body


async def test_admin_voucher_types_are_deduplicated_and_sorted(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/api-keys",
        headers=admin,
        json={"role": "admin", "name": "data desk", "voucher_types": ["data", "compute", "data"]},
    )
    assert response.status_code == 201, response.text
    assert response.json()["voucher_types"] == ["compute", "data"]


async def _stored_keys(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        count: int = await conn.scalar(text("SELECT count(*) FROM api_key WHERE name = :n"), {"n": name})
    return count


@pytest.mark.parametrize(
    "payload",
    [
        {"role": "enterprise", "kind": "enterprise"},  # the holder of a voucher of any type
        {"role": "provider", "kind": "provider"},  # any provider
        {"role": "admin", "voucher_types": ["data"]},  # even one no wider than its own
        {"role": "auditor"},
    ],
    ids=["enterprise", "provider", "admin-of-its-own-types", "auditor"],
)
async def test_an_admin_limited_to_voucher_types_creates_no_key(
    client: httpx.AsyncClient, engine: AsyncEngine, payload: dict[str, object]
) -> None:
    """API.md, "Admin scope": a key bound to an entity redeems or spends in every program, so an admin limited to
    `data` that could mint one would reach compute vouchers; only an unrestricted admin hands out keys."""
    limited = bearer(await create_key(engine, "admin", voucher_types=["data"]))
    body = {k: v for k, v in payload.items() if k != "kind"} | {"name": "scoped admin's key"}
    if "kind" in payload:
        body["entity_id"] = await create_entity(engine, kind=str(payload["kind"]))
    response = await client.post("/v1/api-keys", headers=limited, json=body)
    assert "limited to no voucher type" in assert_problem(response, 403, "forbidden")["detail"]
    assert await _stored_keys(engine, "scoped admin's key") == 0


async def test_an_admin_limited_to_voucher_types_lists_and_revokes_no_key(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    limited = bearer(await create_key(engine, "admin", voucher_types=["data"]))
    provider_key = await create_key(engine, "provider")
    listed = (await client.get("/v1/api-keys", headers=admin, params={"limit": "500"})).json()["data"]
    target = next(item["id"] for item in listed if provider_key.startswith(f"vl_{item['prefix']}_"))

    assert_problem(await client.get("/v1/api-keys", headers=limited), 403, "forbidden")
    assert_problem(await client.delete(f"/v1/api-keys/{target}", headers=limited), 403, "forbidden")
    assert_problem(await client.delete("/v1/api-keys/key_doesnotexist", headers=limited), 403, "forbidden")
    # the provider's key still works
    assert_problem(await client.get("/v1/api-keys", headers=bearer(provider_key)), 403, "forbidden")
    async with engine.connect() as conn:
        revoked = await conn.scalar(text("SELECT revoked_at FROM api_key WHERE id = :id"), {"id": target})
    assert revoked is None


@pytest.mark.parametrize(
    ("role", "kind", "status"),
    [
        ("provider", "provider", 201),
        ("provider", "enterprise", 422),
        ("provider", "institution", 422),
        ("provider", "association", 422),
        ("provider", "department", 422),
        ("enterprise", "enterprise", 201),
        ("enterprise", "institution", 201),
        ("enterprise", "association", 201),
        ("enterprise", "department", 201),
        ("enterprise", "provider", 422),
    ],
)
async def test_a_key_role_fits_its_entity_kind(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, role: str, kind: str, status: int
) -> None:
    """API.md, "Admin scope": `provider` keys bind to `provider` entities, `enterprise` keys to any other kind."""
    entity = await create_entity(engine, kind=kind)
    response = await client.post("/v1/api-keys", headers=admin, json={"role": role, "name": "fit", "entity_id": entity})
    if status == 201:
        assert response.status_code == 201, response.text
        return
    body = assert_problem(response, 422, "validation_error")
    assert ["body", "entity_id"] in [error["loc"] for error in body["errors"]], body
    assert kind in body["detail"]
    async with engine.connect() as conn:
        stored = await conn.scalar(text("SELECT count(*) FROM api_key WHERE entity_id = :e"), {"e": entity})
    assert stored == 0


async def test_an_entity_keeps_its_kind_while_a_key_of_another_role_lives(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """Changing the kind would bind a live key to an entity its role does not fit: revoke the key first."""
    entity = await create_entity(engine, kind="provider")
    created = await client.post(
        "/v1/api-keys", headers=admin, json={"role": "provider", "name": "till", "entity_id": entity}
    )
    assert created.status_code == 201, created.text
    change = {"kind": "enterprise", "reason": "registered as a provider by mistake"}
    body = assert_problem(
        await client.patch(f"/v1/entities/{entity}", headers=admin, json=change), 422, "validation_error"
    )
    assert created.json()["id"] in body["detail"]
    assert ["body", "kind"] in [error["loc"] for error in body["errors"]], body
    assert (await client.get(f"/v1/entities/{entity}", headers=admin)).json()["kind"] == "provider"
    # a change that keeps the kind, and the change once the key is revoked
    assert (await client.patch(f"/v1/entities/{entity}", headers=admin, json={"kind": "provider"})).status_code == 200
    assert (await client.delete(f"/v1/api-keys/{created.json()['id']}", headers=admin)).status_code == 200
    changed = await client.patch(f"/v1/entities/{entity}", headers=admin, json=change)
    assert changed.status_code == 200 and changed.json()["kind"] == "enterprise", changed.text


async def test_revocation_clears_the_local_cache(db_url: str, engine: AsyncEngine) -> None:
    settings = Settings(database_url=db_url, background_tasks=False, api_key_cache_ttl_s=60)
    admin = bearer(await create_key(engine, "admin"))
    async with running_app(settings) as client:
        created = (await client.post("/v1/api-keys", headers=admin, json={"role": "admin", "name": "c"})).json()
        victim = bearer(created["key"])
        assert (await client.get("/v1/api-keys", headers=victim)).status_code == 200  # now cached
        assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=admin)).status_code == 200
        assert_problem(await client.get("/v1/api-keys", headers=victim), 401, "unauthorized")


async def test_a_cached_key_still_needs_its_secret(db_url: str, engine: AsyncEngine) -> None:
    settings = Settings(database_url=db_url, background_tasks=False, api_key_cache_ttl_s=60)
    key = await create_key(engine, "admin")
    async with running_app(settings) as client:
        assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200
        forged = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
        assert_problem(await client.get("/v1/api-keys", headers=bearer(forged)), 401, "unauthorized")


async def test_last_used_at_is_recorded_at_most_once_a_minute(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine, "admin")
    prefix = key.split("_")[1]

    async def last_used() -> object:
        async with engine.connect() as conn:
            query = text("SELECT last_used_at FROM api_key WHERE prefix = :p")
            return (await conn.execute(query, {"p": prefix})).scalar_one()

    assert await last_used() is None
    assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200
    first = None
    for _ in range(200):  # the use is recorded off the request path: give it up to 10 s
        if (first := await last_used()) is not None:
            break
        await asyncio.sleep(0.05)
    assert first is not None
    for _ in range(3):
        assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200
    await asyncio.sleep(0.3)
    assert await last_used() == first


async def test_the_database_backs_the_rules(engine: AsyncEngine) -> None:
    key = await create_key(engine, "provider")
    prefix = key.split("_")[1]
    statements = [
        "UPDATE api_key SET role = 'admin', entity_id = NULL WHERE prefix = :p",
        "UPDATE api_key SET secret_hash = sha256('x') WHERE prefix = :p",
        "DELETE FROM api_key WHERE prefix = :p",
        "INSERT INTO api_key (id, prefix, secret_hash, role, name) "
        "VALUES ('key_aaaaaaaaaaaaaaaaaaaaaaaa', 'aaaaaaaaaaaa', sha256('k'), 'provider', 'no entity')",
        "INSERT INTO api_key (id, prefix, secret_hash, role, name, voucher_types) "
        "VALUES ('key_bbbbbbbbbbbbbbbbbbbbbbbb', 'bbbbbbbbbbbb', sha256('k'), 'admin', 'x', ARRAY['food'])",
    ]
    for statement in statements:
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError):
                await conn.execute(text(statement), {"p": prefix})
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE api_key SET revoked_at = now() WHERE prefix = :p"), {"p": prefix})
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError, match="revocation is final"):
            await conn.execute(text("UPDATE api_key SET revoked_at = NULL WHERE prefix = :p"), {"p": prefix})


@pytest.mark.parametrize("role", ["enterprise", "provider"])
async def test_a_key_acts_for_a_registered_entity_only(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, role: str
) -> None:
    unknown = unique_entity()
    payload = {"role": role, "name": "nobody's till", "entity_id": unknown}
    body = assert_problem(await client.post("/v1/api-keys", headers=admin, json=payload), 422, "validation_error")
    assert ["body", "entity_id"] in [error["loc"] for error in body["errors"]], body
    assert unknown in body["detail"]
    async with engine.connect() as conn:
        stored = await conn.scalar(text("SELECT count(*) FROM api_key WHERE entity_id = :e"), {"e": unknown})
    assert stored == 0
