"""Natural persons are parties (POLICY.md; API.md "Grounds and sanctions", Parties; arts. 8, 9, 25): a person
is registered by name and identity-document number, kept only as an HMAC under a key derived from the KEK,
never shown; a second registration of the same person is refused; no key acts for a person; a person may
control companies, and two companies controlled by one person are one group, in the check and in an
application's refusal."""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.main import create_app
from app.settings import Settings
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.entities import id_document_key


def resident_number() -> str:
    """A fresh 18-character resident identity number ending in X (one the tests never reuse)."""
    return "44010619" + "".join(random.choice("0123456789") for _ in range(9)) + "X"


@pytest.fixture
async def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
async def client(app: FastAPI, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings, app) as client:
        yield client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    return bearer(await create_key(engine, Role.ADMIN))


async def register_person(client: httpx.AsyncClient, admin: dict[str, str], number: str, name: str = "张三") -> Any:
    response = await client.post(
        "/v1/entities", headers=admin, json={"kind": "person", "name": name, "id_document_no": number}
    )
    assert response.status_code == 201, response.text
    return response


async def relate(client: httpx.AsyncClient, admin: dict[str, str], frm: str, to: str, **body: Any) -> Any:
    response = await client.post(
        "/v1/affiliations",
        headers=admin,
        json={"from_entity_id": frm, "to_entity_id": to, "valid_from": "2020-01-01"} | body,
    )
    return response


async def row_text(engine: AsyncEngine, sql: str, **params: Any) -> str:
    async with engine.connect() as conn:
        return " ".join(str(row) for row in (await conn.execute(text(sql), params)).all())


async def test_a_person_is_registered_by_a_keyed_hash_and_never_shown(
    app: FastAPI,
    client: httpx.AsyncClient,
    admin: dict[str, str],
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    number = resident_number()
    digits = number[:-1]  # whatever case the X is shown in, the digits would give the number away
    created = await register_person(client, admin, " " + number.lower() + " ")
    person = created.json()
    assert person["kind"] == "person" and person["name"] == "张三"
    assert person["uscc"] is None and person["division_code"] is None
    assert person["guangzhou_registered"] is False
    # art. 25 supports registered enterprises: a person is presumed not eligible
    assert person["eligible"] is False and person["eligibility"]["presumed"] is False
    assert "id_document" not in created.text

    # stored: HMAC-SHA256 of the normalised number (trimmed, upper case) under the key HKDF derives from the KEK
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT uscc, division_code, id_document_hmac FROM entity WHERE id = :id"), {"id": person["id"]}
            )
        ).one()
    key = id_document_key(app.state.keyring.kek)
    assert key != app.state.keyring.kek.key
    assert bytes(stored.id_document_hmac) == hmac.new(key, number.encode(), hashlib.sha256).digest()
    assert bytes(stored.id_document_hmac) != hashlib.sha256(number.encode()).digest()
    assert stored.uscc is None and stored.division_code is None

    # the same person again, typed differently (full-width digits, lower case x): 409 naming the first
    full_width = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in number.lower())
    again = await client.post(
        "/v1/entities", headers=admin, json={"kind": "person", "name": "张三 (again)", "id_document_no": full_width}
    )
    problem = assert_problem(again, 409, "entity_exists")
    assert person["id"] in problem["detail"]
    other = await register_person(client, admin, resident_number(), name="李四")
    assert other.json()["id"] != person["id"]

    # every place the person can be read, and the journal export: no number
    responses = [
        created,
        again,
        await client.get(f"/v1/entities/{person['id']}", headers=admin),
        await client.get("/v1/entities", headers=admin, params={"kind": "person"}),
        await client.get(f"/v1/entities/{person['id']}/history", headers=admin),
        await client.patch(f"/v1/entities/{person['id']}", headers=admin, json={"name": "张三丰", "reason": "改名"}),
        await client.get("/v1/exports/journal", headers=admin),
    ]
    for response in responses[2:]:
        assert response.status_code == 200, response.text
    listed = responses[3].json()["data"]
    assert person["id"] in [e["id"] for e in listed] and all(e["kind"] == "person" for e in listed)
    history = responses[4].json()["data"]
    assert [e["kind"] for e in history] == ["created"]
    assert history[0]["change"]["after"]["uscc"] is None
    assert "id_document" not in str(history[0]["change"])
    for response in responses:
        assert digits not in response.text and full_width[:-1] not in response.text, response.request.url
    # nor in the rows (the entity, its history) nor in anything the service logged meanwhile
    assert digits not in await row_text(engine, "SELECT * FROM entity WHERE id = :id", id=person["id"])
    assert digits not in await row_text(engine, "SELECT * FROM entity_event WHERE entity_id = :id", id=person["id"])
    assert caplog.records, "the capture works (httpx logs every request)"
    assert digits not in caplog.text


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"kind": "person", "name": "x"}, ["body", "id_document_no"]),
        ({"kind": "person", "name": "x", "uscc": "91440106MA59XXXXXX", "id_document_no": "@"}, ["body", "uscc"]),
        ({"kind": "enterprise", "name": "x", "id_document_no": "@"}, ["body", "id_document_no"]),
        ({"kind": "person", "name": "x", "id_document_no": "4401 0619 9001 01123X"}, ["body", "id_document_no"]),
        ({"kind": "person", "name": "x", "id_document_no": "12"}, ["body", "id_document_no"]),
        ({"kind": "person", "name": "x", "id_document_no": 440106199001011230}, ["body", "id_document_no"]),
    ],
)
async def test_a_person_takes_a_document_number_and_nothing_else(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine, payload: dict[str, Any], loc: list[Any]
) -> None:
    number = resident_number()
    payload = {k: (number if v == "@" else v) for k, v in payload.items()}
    response = await client.post("/v1/entities", headers=admin, json=payload)
    body = assert_problem(response, 422, "validation_error")
    assert loc in [error["loc"] for error in body["errors"]], body
    given = str(payload.get("id_document_no", ""))
    if len(given) > 8:
        assert given[4:12] not in response.text  # a refusal does not repeat the number either
    assert await row_text(engine, "SELECT count(*) FROM entity WHERE name = 'x' AND kind = 'person'") == "(0,)"


async def test_no_key_binds_to_a_person_and_a_person_stays_a_person(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    person = (await register_person(client, admin, resident_number())).json()["id"]
    for role in ("enterprise", "provider"):
        response = await client.post(
            "/v1/api-keys", headers=admin, json={"role": role, "name": "a person's key", "entity_id": person}
        )
        body = assert_problem(response, 422, "validation_error")
        assert ["body", "entity_id"] in [e["loc"] for e in body["errors"]]
    company = await create_entity(engine)
    patched = await client.patch(f"/v1/entities/{person}", headers=admin, json={"kind": "enterprise", "reason": "x"})
    assert_problem(patched, 422, "validation_error")
    patched = await client.patch(f"/v1/entities/{company}", headers=admin, json={"kind": "person", "reason": "x"})
    assert_problem(patched, 422, "validation_error")
    eligible = {"eligible": True, "reason": "wants support", "evidence_ref": "file 1"}
    patched = await client.patch(f"/v1/entities/{person}", headers=admin, json={"eligibility_override": eligible})
    assert_problem(patched, 422, "validation_error")
    after = (await client.get(f"/v1/entities/{person}", headers=admin)).json()
    assert after["kind"] == "person" and after["eligible"] is False
    async with engine.connect() as conn:
        kinds = await conn.execute(text("SELECT kind FROM entity WHERE id = ANY(:ids)"), {"ids": [person, company]})
        assert sorted(row.kind for row in kinds) == ["enterprise", "person"]


async def test_relations_start_from_a_person(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    person = (await register_person(client, admin, resident_number())).json()["id"]
    company = await create_entity(engine)
    for kind, pct in (("equity", "60"), ("control", None), ("personnel", None)):
        body = {"kind": kind} | ({"equity_pct": pct} if pct else {})
        refused = await relate(client, admin, company, person, **body)
        problem = assert_problem(refused, 422, "validation_error")
        assert ["body", "to_entity_id"] in [e["loc"] for e in problem["errors"]], problem
        assert (await relate(client, admin, person, company, **body)).status_code == 201


async def check(client: httpx.AsyncClient, admin: dict[str, str], a: str, b: str) -> Any:
    response = await client.get("/v1/affiliations/check", headers=admin, params={"a": a, "b": b, "as_of": "2026-06-01"})
    assert response.status_code == 200, response.text
    return response.json()


async def test_one_person_controlling_two_companies_makes_one_group(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    person = (await register_person(client, admin, resident_number())).json()["id"]
    applicant = await create_entity(engine)
    provider = await create_entity(engine, kind="provider")
    stranger = await create_entity(engine, kind="provider")
    assert (await relate(client, admin, person, applicant, kind="equity", equity_pct="80")).status_code == 201
    assert (await relate(client, admin, person, provider, kind="control")).status_code == 201

    answer = await check(client, admin, applicant, provider)
    assert answer["affiliated"] is True
    assert [(s["from_entity_id"], s["to_entity_id"], s["effect"]) for s in answer["path"]] == [
        (person, applicant, "control"),
        (person, provider, "control"),
    ]
    assert (await check(client, admin, applicant, stranger))["affiliated"] is False

    # art. 8: the applicant's purchase from its sister provider does not count; the stranger's does
    response = await client.post(
        "/v1/applications",
        headers=admin,
        json={
            "program": "compute.purchase",
            "applicant_entity_id": applicant,
            "year": 2027,
            "basis": {
                "purchases": [
                    {
                        "provider_entity_id": seller,
                        "invoice_no": f"P-{n}",
                        "category": "compute",
                        "amount_fen": amount_fen,
                        "purchased_on": "2026-03-01",
                    }
                    for n, (seller, amount_fen) in enumerate(((provider, 900_000_00), (stranger, 400_000_00)))
                ]
            },
        },
    )
    assert response.status_code == 201, response.text
    computed = response.json()["computed"]
    assert computed["eligible_fen"] == 400_000_00
    [excluded] = [e for e in computed["excluded"] if e["reason"] == "affiliated_provider"]
    assert excluded["amount_fen"] == 900_000_00
    assert {step["from_entity_id"] for step in excluded["path"]} == {person}
    assert {step["to_entity_id"] for step in excluded["path"]} == {applicant, provider}


async def test_a_person_holding_thirty_percent_of_two_companies_does_not_relate_them(
    client: httpx.AsyncClient, admin: dict[str, str], engine: AsyncEngine
) -> None:
    """POLICY.md: influence links a member of one group with a member of another. A person holding 30% of
    X and 30% of Y influences each (and is affiliated with each), but X's group is X and Y's is Y, and no
    relation links them: X and Y are not affiliated. The same person at 51% of one of them makes that one
    part of the person's group, which the 30% of the other then links."""
    person = (await register_person(client, admin, resident_number())).json()["id"]
    x, y = await create_entity(engine), await create_entity(engine, kind="provider")
    for company in (x, y):
        assert (await relate(client, admin, person, company, kind="equity", equity_pct="30")).status_code == 201
    assert (await check(client, admin, x, y))["affiliated"] is False
    influenced = await check(client, admin, person, x)
    assert influenced["affiliated"] is True and [s["effect"] for s in influenced["path"]] == ["influence"]

    z = await create_entity(engine)
    assert (await relate(client, admin, person, z, kind="equity", equity_pct="51")).status_code == 201
    linked = await check(client, admin, z, y)
    assert linked["affiliated"] is True
    assert [(s["to_entity_id"], s["effect"]) for s in linked["path"]] == [(z, "control"), (y, "influence")]
