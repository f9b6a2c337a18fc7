"""The entity registry over HTTP (art. 25): register, read, list, change, history; who sees what."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.settings import Settings
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app, unique_entity
from vouchers import entities
from vouchers.entities import EligibilityOverride, EntityChanges, InvalidEntity
from vouchers.uscc import make_uscc

TIANHE = "91440106MA59AB12CX"
SHENZHEN_DIVISION = "440300"
ENTITY_FIELDS = {
    "id",
    "uscc",
    "name",
    "kind",
    "tags",
    "division_code",
    "guangzhou_registered",
    "eligible",
    "eligibility",
    "created_at",
    "updated_at",
    "sanctions",
}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, "admin", name="registry admin"))


def unique_tag() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def register(client: httpx.AsyncClient, admin: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"uscc": make_uscc(), "name": "广州某某智能科技有限公司", "kind": "enterprise"} | fields
    response = await client.post("/v1/entities", headers=admin, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def history(client: httpx.AsyncClient, headers: dict[str, str], entity_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        response = await client.get(f"/v1/entities/{entity_id}/history", headers=headers, params=params)
        assert response.status_code == 200, response.text
        events += response.json()["data"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return events
    raise AssertionError("history pages never end")


async def stored(engine: AsyncEngine, sql: str, **params: object) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


# --------------------------------------------------------------------------------------------------------
# Register and read


async def test_register_a_guangzhou_entity(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    uscc = make_uscc("440106")
    response = await client.post(
        "/v1/entities",
        headers=admin,
        json={
            "uscc": f"  {uscc.lower()} ",
            "name": "  天河智算有限公司 ",
            "kind": "provider",
            "tags": ["key_vertical_model", "innovation_team", "key_vertical_model"],
        },
    )
    assert response.status_code == 201, response.text
    entity = response.json()
    assert set(entity) == ENTITY_FIELDS
    assert entity["id"].startswith("ent_") and len(entity["id"]) == 28
    assert entity["uscc"] == uscc and entity["name"] == "天河智算有限公司" and entity["kind"] == "provider"
    assert entity["tags"] == ["innovation_team", "key_vertical_model"]
    assert entity["division_code"] == "440106" and entity["guangzhou_registered"] is True
    assert entity["eligible"] is True
    assert entity["eligibility"] == {"presumed": True, "overridden": False, "reason": None, "evidence_ref": None}
    assert entity["created_at"] == entity["updated_at"]

    read = await client.get(f"/v1/entities/{entity['id']}", headers=admin)
    assert read.status_code == 200 and read.json() == entity

    events = await history(client, admin, entity["id"])
    assert [event["kind"] for event in events] == ["created"]
    created = events[0]
    assert created["entity_id"] == entity["id"] and created["change"]["before"] is None
    assert created["change"]["after"]["uscc"] == uscc and created["change"]["after"]["eligible"] is True
    admin_key_id = await stored(
        engine, "SELECT id FROM api_key WHERE prefix = :p", p=admin["Authorization"].split("_")[1]
    )
    assert created["actor_key_id"] == admin_key_id


async def test_an_entity_outside_guangzhou_is_presumed_not_eligible(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    entity = await register(client, admin, uscc=make_uscc(SHENZHEN_DIVISION))
    assert entity["division_code"] == SHENZHEN_DIVISION and entity["guangzhou_registered"] is False
    assert entity["eligible"] is False and entity["eligibility"]["presumed"] is False
    assert entity["tags"] == []


async def test_the_policy_examples(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for uscc, guangzhou in [(TIANHE, True), ("91440300MA5DABCDEU", False)]:
        response = await client.post(
            "/v1/entities", headers=admin, json={"uscc": uscc, "name": "x", "kind": "enterprise"}
        )
        if response.status_code == 409:  # another test registered it first: fine, read it
            assert_problem(response, 409, "entity_exists")
            listed = (await client.get("/v1/entities", headers=admin, params={"uscc": uscc})).json()["data"]
            assert len(listed) == 1
            entity = listed[0]
        else:
            assert response.status_code == 201, response.text
            entity = response.json()
        assert entity["guangzhou_registered"] is guangzhou and entity["eligible"] is guangzhou


async def test_a_code_is_registered_once(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    first = await register(client, admin)
    again = await client.post(
        "/v1/entities",
        headers=admin,
        json={"uscc": first["uscc"].lower(), "name": "another name", "kind": "enterprise"},
    )
    body = assert_problem(again, 409, "entity_exists")
    assert first["id"] in body["detail"]
    assert await stored(engine, "SELECT count(*) FROM entity WHERE uscc = :u", u=first["uscc"]) == 1
    assert await stored(engine, "SELECT count(*) FROM entity WHERE name = 'another name'") == 0
    assert await stored(engine, "SELECT count(*) FROM entity_event WHERE entity_id = :e", e=first["id"]) == 1


async def test_concurrent_registrations_of_one_code(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    uscc = make_uscc()
    body = {"uscc": uscc, "name": "race", "kind": "enterprise"}
    responses = await asyncio.gather(*[client.post("/v1/entities", headers=admin, json=body) for _ in range(5)])
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409, 409]


@pytest.mark.parametrize(
    "uscc",
    [
        "91440106MA59AB12C0",  # a wrong check character
        "91440106MA59AB12",  # too short
        "91440106MA59AB12CXX",  # too long
        "91440106MA59AB1ICX",  # I is not in the alphabet
        "9144O106MA59AB12CX",  # nor O
        "91440106MA59AB12 CX",
        "",
    ],
)
async def test_an_invalid_code_is_refused_and_nothing_stored(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, uscc: str
) -> None:
    name = f"invalid {uuid.uuid4().hex}"
    response = await client.post("/v1/entities", headers=admin, json={"uscc": uscc, "name": name, "kind": "enterprise"})
    assert_problem(response, 422, "invalid_uscc")
    assert await stored(engine, "SELECT count(*) FROM entity WHERE name = :n", n=name) == 0


# --------------------------------------------------------------------------------------------------------
# Change and history


async def test_rename_retag_rekind_with_history(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entity = await register(client, admin, tags=["innovation_team"])
    response = await client.patch(
        f"/v1/entities/{entity['id']}",
        headers=admin,
        json={
            "name": "新名字有限公司",
            "kind": "institution",
            "tags": ["multimodal_foundation_model", "innovation_team", "innovation_team"],
            "reason": "变更登记 2027-03",
        },
    )
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed["name"] == "新名字有限公司" and changed["kind"] == "institution"
    assert changed["tags"] == ["innovation_team", "multimodal_foundation_model"]
    assert changed["updated_at"] > entity["updated_at"] and changed["created_at"] == entity["created_at"]
    assert (await client.get(f"/v1/entities/{entity['id']}", headers=admin)).json() == changed

    events = await history(client, admin, entity["id"])
    assert [e["kind"] for e in events] == ["created", "renamed", "kind", "tags"]
    renamed, kind, tags = events[1:]
    assert renamed["change"] == {"before": entity["name"], "after": "新名字有限公司"}
    assert kind["change"] == {"before": "enterprise", "after": "institution"}
    assert tags["change"] == {
        "before": ["innovation_team"],
        "after": ["innovation_team", "multimodal_foundation_model"],
    }
    assert {e["reason"] for e in events[1:]} == {"变更登记 2027-03"}
    assert len({e["id"] for e in events}) == 4

    # the same values again, or nothing at all: no change, no event
    for body in [{"name": "新名字有限公司", "tags": ["multimodal_foundation_model", "innovation_team"]}, {}]:
        same = await client.patch(f"/v1/entities/{entity['id']}", headers=admin, json=body)
        assert same.status_code == 200 and same.json() == changed
    assert len(await history(client, admin, entity["id"])) == 4

    # an empty set removes every tag
    cleared = await client.patch(f"/v1/entities/{entity['id']}", headers=admin, json={"tags": []})
    assert cleared.json()["tags"] == []


async def test_override_eligibility_and_clear_it(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    entity = await register(client, admin, uscc=make_uscc(SHENZHEN_DIVISION))
    path = f"/v1/entities/{entity['id']}"
    override = {"eligible": True, "reason": "在天河区设立研发中心并实质经营", "evidence_ref": "穗工信〔2027〕12号"}
    response = await client.patch(path, headers=admin, json={"eligibility_override": override})
    assert response.status_code == 200, response.text
    overridden = response.json()
    assert overridden["eligible"] is True and overridden["guangzhou_registered"] is False
    assert overridden["eligibility"] == {"presumed": False, "overridden": True} | {
        "reason": override["reason"],
        "evidence_ref": override["evidence_ref"],
    }

    # the same override again changes nothing; new evidence is a new event
    await client.patch(path, headers=admin, json={"eligibility_override": override})
    newer = override | {"evidence_ref": "穗工信〔2027〕13号"}
    assert (await client.patch(path, headers=admin, json={"eligibility_override": newer})).status_code == 200

    # clearing needs a reason, and returns to the presumption
    no_reason = await client.patch(path, headers=admin, json={"eligibility_override": None})
    body = assert_problem(no_reason, 422, "validation_error")
    assert (await client.get(path, headers=admin)).json()["eligible"] is True
    assert body["errors"]
    cleared = await client.patch(path, headers=admin, json={"eligibility_override": None, "reason": "研发中心已撤销"})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["eligible"] is False
    assert cleared.json()["eligibility"] == {
        "presumed": False,
        "overridden": False,
        "reason": None,
        "evidence_ref": None,
    }
    # clearing what is not overridden changes nothing
    await client.patch(path, headers=admin, json={"eligibility_override": None, "reason": "again"})

    events = [e for e in await history(client, admin, entity["id"]) if e["kind"] == "eligibility"]
    assert len(events) == 3
    first, second, third = events
    assert first["change"]["before"] == {"eligible": False, "overridden": False, "reason": None, "evidence_ref": None}
    assert first["change"]["after"]["eligible"] is True and first["change"]["after"]["overridden"] is True
    assert first["reason"] == override["reason"] and first["evidence_ref"] == override["evidence_ref"]
    assert second["evidence_ref"] == "穗工信〔2027〕13号"
    assert third["change"]["after"] == {"eligible": False, "overridden": False, "reason": None, "evidence_ref": None}
    assert third["reason"] == "研发中心已撤销" and third["evidence_ref"] is None


async def test_a_guangzhou_entity_can_be_overridden_to_not_eligible(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    entity = await register(client, admin)
    override = {"eligible": False, "reason": "注册地址为空壳，无实质经营", "evidence_ref": "核查报告 2027-041"}
    response = await client.patch(
        f"/v1/entities/{entity['id']}", headers=admin, json={"eligibility_override": override}
    )
    assert response.json()["eligible"] is False and response.json()["eligibility"]["presumed"] is True


async def test_an_admin_limited_to_voucher_types_reads_entities_and_changes_none(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """API.md, "Admin scope": tags and eligibility decide awards in every program (tagging an entity
    `innovation_team` + `multimodal_foundation_model` issues a compute voucher through 免申即享), so an admin
    limited to `data` reads the registry but registers and changes nothing in it."""
    limited = bearer(await create_key(engine, "admin", voucher_types=["data"]))
    assert_problem(
        await client.post(
            "/v1/entities", headers=limited, json={"uscc": make_uscc(), "name": "scoped", "kind": "enterprise"}
        ),
        403,
        "forbidden",
    )
    entity = await register(client, admin)
    path = f"/v1/entities/{entity['id']}"
    override = {"eligible": False, "reason": "scoped admin's decision", "evidence_ref": "none"}
    for change in (
        {"tags": ["innovation_team", "multimodal_foundation_model"]},
        {"eligibility_override": override},
        {"eligibility_override": None, "reason": "scoped admin's decision"},
        {"name": "renamed by a scoped admin"},
        {"kind": "provider"},
    ):
        body = assert_problem(await client.patch(path, headers=limited, json=change), 403, "forbidden")
        assert "limited to voucher types (data)" in body["detail"], body
    # a reviewer of data applications still reads the registry
    assert (await client.get(path, headers=limited)).json() == (await client.get(path, headers=admin)).json()
    assert (await client.get("/v1/entities", headers=limited)).status_code == 200
    assert [e["kind"] for e in await history(client, limited, entity["id"])] == ["created"]
    async with engine.connect() as conn:
        applications = await conn.scalar(
            text("SELECT count(*) FROM application WHERE applicant_entity_id = :e"), {"e": entity["id"]}
        )
    assert applications == 0  # 免申即享 granted nothing


async def test_update_reports_the_tag_sets(engine: AsyncEngine) -> None:
    """Later code (免申即享, art. 19) acts on a tag that appears: `update_entity` says which did."""
    entity_id = await create_entity(engine, tags=["key_vertical_model"])
    async with AsyncSession(engine, expire_on_commit=False) as session:
        update = await entities.update_entity(
            session, entity_id, EntityChanges(tags=["innovation_team", "other_tag"]), actor_key_id=None
        )
        await session.commit()
    assert update.tags_before == {"key_vertical_model"}
    assert update.tags_after == {"innovation_team", "other_tag"}
    assert update.tags_added == {"innovation_team", "other_tag"} and update.tags_removed == {"key_vertical_model"}
    assert [event.kind for event in update.events] == ["tags"]

    async with AsyncSession(engine) as session:
        with pytest.raises(InvalidEntity):
            await entities.update_entity(
                session, entity_id, EntityChanges(eligibility_override=None), actor_key_id=None
            )
        with pytest.raises(InvalidEntity):
            await entities.update_entity(
                session,
                entity_id,
                EntityChanges(eligibility_override=EligibilityOverride(True, " ", "ref")),
                actor_key_id=None,
            )


# --------------------------------------------------------------------------------------------------------
# Who sees what


@pytest.mark.parametrize(
    "role", ["admin", "auditor", "own_enterprise", "own_provider", "other_enterprise", "other_provider"]
)
async def test_visibility(client: httpx.AsyncClient, engine: AsyncEngine, role: str) -> None:
    entity = await create_entity(engine, kind="provider" if role.endswith("provider") else "enterprise")
    if role.startswith("own_"):
        headers = bearer(await create_key(engine, role.removeprefix("own_"), entity_id=entity))
    elif role.startswith("other_"):
        headers = bearer(await create_key(engine, role.removeprefix("other_")))
    else:
        headers = bearer(await create_key(engine, role))
    one = await client.get(f"/v1/entities/{entity}", headers=headers)
    events = await client.get(f"/v1/entities/{entity}/history", headers=headers)
    if role.startswith("other_"):
        # exactly the answers for an id that does not exist
        unknown = unique_entity()
        for response, path in [(one, f"/v1/entities/{unknown}"), (events, f"/v1/entities/{unknown}/history")]:
            assert_problem(response, 404, "not_found")
            missing = await client.get(path, headers=headers)
            assert response.json() == json.loads(missing.text.replace(unknown, entity))
    else:
        assert one.status_code == 200 and one.json()["id"] == entity
        assert events.status_code == 200 and events.json()["data"][0]["kind"] == "created"

    listing = await client.get("/v1/entities", headers=headers)
    if role in ("admin", "auditor"):
        assert listing.status_code == 200
    else:
        assert_problem(listing, 403, "forbidden")


@pytest.mark.parametrize("role", ["auditor", "enterprise", "provider"])
async def test_only_admins_change_entities(client: httpx.AsyncClient, engine: AsyncEngine, role: str) -> None:
    entity = await create_entity(engine, kind="provider" if role == "provider" else "enterprise")
    headers = bearer(await create_key(engine, role, entity_id=None if role == "auditor" else entity))
    name = f"forbidden {uuid.uuid4().hex}"
    post = await client.post(
        "/v1/entities", headers=headers, json={"uscc": make_uscc(), "name": name, "kind": "enterprise"}
    )
    assert_problem(post, 403, "forbidden")
    patch = await client.patch(f"/v1/entities/{entity}", headers=headers, json={"name": name})
    assert_problem(patch, 403, "forbidden")
    assert await stored(engine, "SELECT count(*) FROM entity WHERE name = :n", n=name) == 0


async def test_no_key_is_401(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    entity = await create_entity(engine)
    for method, path in [
        ("POST", "/v1/entities"),
        ("GET", "/v1/entities"),
        ("GET", f"/v1/entities/{entity}"),
        ("PATCH", f"/v1/entities/{entity}"),
        ("GET", f"/v1/entities/{entity}/history"),
    ]:
        assert_problem(
            await client.request(method, path, json={} if method in ("POST", "PATCH") else None), 401, "unauthorized"
        )


async def test_unknown_ids_are_404(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    unknown = unique_entity()
    assert_problem(await client.get(f"/v1/entities/{unknown}", headers=admin), 404, "not_found")
    assert_problem(await client.get(f"/v1/entities/{unknown}/history", headers=admin), 404, "not_found")
    assert_problem(await client.patch(f"/v1/entities/{unknown}", headers=admin, json={"name": "x"}), 404, "not_found")


# --------------------------------------------------------------------------------------------------------
# Lists


async def test_list_filters_and_pages(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    tag = unique_tag()
    made = [await register(client, admin, tags=[tag], kind="provider" if i % 2 else "enterprise") for i in range(5)]
    auditor = bearer(await create_key(engine, "auditor"))
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"tag": tag, "limit": "2"} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/v1/entities", headers=auditor, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"data", "next_cursor"} and len(body["data"]) <= 2
        seen += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [e["id"] for e in seen] == [e["id"] for e in reversed(made)]  # newest first, no overlap
    assert seen[0] == made[-1]

    providers = (await client.get("/v1/entities", headers=admin, params={"tag": tag, "kind": "provider"})).json()
    assert {e["id"] for e in providers["data"]} == {made[1]["id"], made[3]["id"]}
    one = (await client.get("/v1/entities", headers=admin, params={"uscc": made[2]["uscc"].lower()})).json()
    assert [e["id"] for e in one["data"]] == [made[2]["id"]] and one["next_cursor"] is None
    none = (await client.get("/v1/entities", headers=admin, params={"tag": unique_tag()})).json()
    assert none == {"data": [], "next_cursor": None}


async def test_history_pages(client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine) -> None:
    entity = await register(client, admin)
    for i in range(4):
        await client.patch(f"/v1/entities/{entity['id']}", headers=admin, json={"name": f"name {i}"})
    events = await history(client, admin, entity["id"])
    assert [e["kind"] for e in events] == ["created"] + ["renamed"] * 4
    assert [e["change"]["after"] for e in events[1:]] == [f"name {i}" for i in range(4)]
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    # an entity's own key reads its history
    own = bearer(await create_key(engine, "enterprise", entity_id=entity["id"]))
    assert await history(client, own, entity["id"]) == events


# --------------------------------------------------------------------------------------------------------
# Bad input: 422, never a 500, and nothing changes


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"name": "x", "kind": "enterprise"}, ["body", "uscc"]),
        ({"uscc": 91440106, "name": "x", "kind": "enterprise"}, ["body", "uscc"]),
        ({"uscc": None, "name": "x", "kind": "enterprise"}, ["body", "uscc"]),
        ({"uscc": "@", "kind": "enterprise"}, ["body", "name"]),
        ({"uscc": "@", "name": "   ", "kind": "enterprise"}, ["body", "name"]),
        ({"uscc": "@", "name": "x" * 201, "kind": "enterprise"}, ["body", "name"]),
        ({"uscc": "@", "name": 5, "kind": "enterprise"}, ["body", "name"]),
        ({"uscc": "@", "name": "x"}, ["body", "kind"]),
        ({"uscc": "@", "name": "x", "kind": "company"}, ["body", "kind"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": "innovation_team"}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": ["Innovation_Team"]}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": ["has space"]}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": ["1st"]}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": ["a" * 51]}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": [f"t{i}" for i in range(33)]}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": [1]}, ["body", "tags", 0]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "tags": None}, ["body", "tags"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "eligible": True}, ["body", "eligible"]),
        ({"uscc": "@", "name": "x", "kind": "enterprise", "id": "ent_x"}, ["body", "id"]),
    ],
)
async def test_create_validation(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, payload: dict[str, Any], loc: list[Any]
) -> None:
    payload = {k: (make_uscc() if v == "@" else v) for k, v in payload.items()}
    body = assert_problem(await client.post("/v1/entities", headers=admin, json=payload), 422, "validation_error")
    assert loc in [error["loc"] for error in body["errors"]], body
    if isinstance(payload.get("uscc"), str):
        assert await stored(engine, "SELECT count(*) FROM entity WHERE uscc = :u", u=payload["uscc"]) == 0


async def test_thirty_two_tags_are_allowed(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    tags = [f"t{i:02d}" for i in range(32)]
    entity = await register(client, admin, tags=[*tags, *tags])
    assert entity["tags"] == tags


async def test_create_needs_a_json_object(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for content in [b"", b"[]", b"not json", b'"x"']:
        response = await client.post(
            "/v1/entities", headers=admin | {"content-type": "application/json"}, content=content
        )
        assert_problem(response, 422, "validation_error")


_OVERRIDE = {"eligible": True, "reason": "r", "evidence_ref": "e"}


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"name": None}, ["body", "name"]),
        ({"name": ""}, ["body", "name"]),
        ({"name": 1}, ["body", "name"]),
        ({"kind": None}, ["body", "kind"]),
        ({"kind": "company"}, ["body", "kind"]),
        ({"tags": None}, ["body", "tags"]),
        ({"tags": ["BAD"]}, ["body", "tags"]),
        ({"tags": {"innovation_team": True}}, ["body", "tags"]),
        ({"reason": None}, ["body", "reason"]),
        ({"reason": ""}, ["body", "reason"]),
        ({"uscc": "91440106MA59AB12CX"}, ["body", "uscc"]),
        ({"eligible": True}, ["body", "eligible"]),
        ({"eligibility_override": True}, ["body", "eligibility_override"]),
        ({"eligibility_override": {"eligible": True, "reason": "r"}}, ["body", "eligibility_override", "evidence_ref"]),
        ({"eligibility_override": {"eligible": True, "evidence_ref": "e"}}, ["body", "eligibility_override", "reason"]),
        ({"eligibility_override": {"reason": "r", "evidence_ref": "e"}}, ["body", "eligibility_override", "eligible"]),
        ({"eligibility_override": _OVERRIDE | {"eligible": "yes"}}, ["body", "eligibility_override", "eligible"]),
        ({"eligibility_override": _OVERRIDE | {"eligible": 1}}, ["body", "eligibility_override", "eligible"]),
        ({"eligibility_override": _OVERRIDE | {"reason": "  "}}, ["body", "eligibility_override", "reason"]),
        ({"eligibility_override": _OVERRIDE | {"reason": "r" * 1001}}, ["body", "eligibility_override", "reason"]),
        ({"eligibility_override": _OVERRIDE | {"evidence_ref": ""}}, ["body", "eligibility_override", "evidence_ref"]),
        (
            {"eligibility_override": _OVERRIDE | {"evidence_ref": "e" * 501}},
            ["body", "eligibility_override", "evidence_ref"],
        ),
        ({"eligibility_override": _OVERRIDE | {"until": "2027-01-01"}}, ["body", "eligibility_override", "until"]),
        ({"eligibility_override": None}, ["body"]),
    ],
)
async def test_patch_validation(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, payload: dict[str, Any], loc: list[Any]
) -> None:
    entity = await create_entity(engine)
    before = (await client.get(f"/v1/entities/{entity}", headers=admin)).json()
    response = await client.patch(f"/v1/entities/{entity}", headers=admin, json={"name": "changed", **payload})
    body = assert_problem(response, 422, "validation_error")
    assert loc in [error["loc"] for error in body["errors"]], body
    assert (await client.get(f"/v1/entities/{entity}", headers=admin)).json() == before
    assert await stored(engine, "SELECT count(*) FROM entity_event WHERE entity_id = :e", e=entity) == 1


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"cursor": "not-a-cursor"}, 422, "validation_error"),
        ({"cursor": "eyJ4IjogMX0"}, 422, "validation_error"),
        ({"limit": "0"}, 422, "validation_error"),
        ({"limit": "501"}, 422, "validation_error"),
        ({"limit": "x"}, 422, "validation_error"),
        ({"tag": "Innovation_Team"}, 422, "validation_error"),
        ({"tag": ""}, 422, "validation_error"),
        ({"kind": "company"}, 422, "validation_error"),
        ({"uscc": "91440106MA59AB12C0"}, 422, "invalid_uscc"),
        ({"uscc": "x" * 65}, 422, "validation_error"),
    ],
)
async def test_bad_list_queries(
    client: httpx.AsyncClient, admin: dict[str, str], params: dict[str, str], status: int, code: str
) -> None:
    assert_problem(await client.get("/v1/entities", headers=admin, params=params), status, code)


async def test_bad_paths_and_history_queries(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    entity = await create_entity(engine)
    long_id = "ent_" + "x" * 100
    assert_problem(await client.get(f"/v1/entities/{long_id}", headers=admin), 422, "validation_error")
    assert_problem(await client.patch(f"/v1/entities/{long_id}", headers=admin, json={}), 422, "validation_error")
    for params in [{"cursor": "nope"}, {"limit": "0"}, {"cursor": "Im5vdCBhbiBpbnQi"}]:
        response = await client.get(f"/v1/entities/{entity}/history", headers=admin, params=params)
        assert_problem(response, 422, "validation_error")
    assert_problem(await client.put(f"/v1/entities/{entity}", headers=admin, json={}), 405, "method_not_allowed")
    assert_problem(await client.delete(f"/v1/entities/{entity}", headers=admin), 405, "method_not_allowed")
