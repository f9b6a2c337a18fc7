"""The service against its own OpenAPI document (issue 6, "Bad input at scale"), with schemathesis.

Every operation the document describes gets schemathesis's coverage cases (boundary and invalid values of
every parameter and body field: empty and NUL-bearing strings, numbers past every bound, wrong types,
missing fields and headers, unexpected methods) and a bounded number of generated ones, all derived from a
fixed seed, so CI sees the same requests every run. Each case is sent with one key of a small world, the
roles in turn (admin, an admin limited to compute vouchers, auditor, the enterprise that holds the voucher,
the provider that redeemed it), and every other case has its path parameters replaced by that world's real
objects, so that fuzzed bodies and queries reach the handlers behind the lookups. The response must:

- never be a 5xx (`not_a_server_error`);
- have a status, content type, headers and body the document declares for the operation;
- refuse what the document says is invalid (a 4xx), and a request without its `Authorization` (401);
- when it succeeds, fail without credentials and with a wrong key (`ignored_auth`: 401 or 403);
- to an `OPTIONS`, name in `Allow` exactly the methods the document gives the path
  (`allow_header_conformance`).

`VL_SCHEMATHESIS_EXAMPLES` sets the generated cases per operation for a deeper run (default 10).

Every check applies to every response: no known bug is excused. Left out on purpose:
`positive_data_acceptance` (the service refuses, on its merits and with a documented 422, much that JSON
Schema cannot express: a USCC's check digit, a date range the wrong way round, a year outside the policy
term) and the stateful phase (the world is built by hand, below).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis import Case
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.main import create_app
from app.settings import Settings
from tests.service_support import CURRENT_YEAR
from tests.test_support import bearer, create_entity, create_key, running_app

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
COMPUTE = "compute.purchase"
# Generated cases per operation, on top of the coverage cases (between about 10 and 100 per operation,
# fixed by the document): about 3,000 requests on each server.
GENERATED_PER_OPERATION = int(os.environ.get("VL_SCHEMATHESIS_EXAMPLES", "10"))

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 6,
        "base-url": "http://testserver",
        "generation": {
            "max-examples": GENERATED_PER_OPERATION,
            "deterministic": True,
            "database": "none",
        },
        "phases": {"stateful": {"enabled": False}},
    }
)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
    schemathesis.checks.missing_required_header,
    schemathesis.checks.unsupported_method,
    schemathesis.checks.ignored_auth,
    schemathesis.checks.allow_header_conformance,
]

# The app under test is built at import, so that pytest can make one test of each operation in its
# document; each server's `app` fixture points it at that server's database before the lifespan starts
# (schemathesis starts it on the first request, in a thread of its own, and stops it at the end).
APP = create_app(Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none", background_tasks=False))
schema = schemathesis.openapi.from_dict(APP.openapi(), config=CONFIG)
schema.app = APP


@dataclass
class World:
    keys: list[str]  # one key per role, in the order cases take them
    objects: dict[str, str]  # a path parameter -> the id of a real object
    sent: dict[str, int] = field(default_factory=dict)  # cases sent so far, by operation


async def _ok(response: httpx.Response, status: int = 201) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def _build(settings: Settings, engine: AsyncEngine) -> World:
    holder = await create_entity(engine, name="fuzz holder")
    provider = await create_entity(engine, kind="provider", name="fuzz provider")
    seller = await create_entity(engine, kind="provider", name="fuzz seller")
    admin_key = await create_key(engine, Role.ADMIN, name="fuzz admin")
    provider_key = await create_key(engine, Role.PROVIDER, entity_id=provider, name="fuzz provider")
    keys = [
        admin_key,
        await create_key(engine, Role.ADMIN, voucher_types=["compute"], name="fuzz compute admin"),
        await create_key(engine, Role.AUDITOR, name="fuzz auditor"),
        await create_key(engine, Role.ENTERPRISE, entity_id=holder, name="fuzz enterprise"),
        provider_key,
    ]
    await create_key(engine, Role.AUDITOR, name="fuzz spare")  # the key `DELETE /v1/api-keys/{id}` may revoke
    admin = bearer(admin_key)

    async def provider_post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {**bearer(provider_key), "Idempotency-Key": uuid.uuid4().hex}
        return await _ok(await client.post(path, headers=headers, json=body))

    async with running_app(settings) as client:
        budget = f"/v1/programs/{COMPUTE}/budgets/{YEAR}"
        current = (await _ok(await client.get(budget, headers=admin), 200))["budget_fen"]
        await _ok(await client.put(budget, headers=admin, json={"amount_fen": current + 2_000_000 * YUAN}), 200)
        purchase = {
            "provider_entity_id": seller,
            "invoice_no": f"F-{holder[-8:]}",
            "category": "compute",
            "amount_fen": 2_400_000 * YUAN,
            "purchased_on": f"{YEAR - 1}-05-01",
        }
        application = await _ok(
            await client.post(
                "/v1/applications",
                headers=admin,
                json={
                    "program": COMPUTE,
                    "applicant_entity_id": holder,
                    "year": YEAR,
                    "basis": {"purchases": [purchase]},
                },
            )
        )
        voucher = await _ok(await client.post(f"/v1/applications/{application['id']}/approve", headers=admin))
        token = await _ok(await client.post(f"/v1/vouchers/{voucher['id']}/token", headers=admin))
        lines = [{"category": "compute", "amount_fen": 1_000 * YUAN, "description": "GPU hours"}]
        redemption = await provider_post(
            "/v1/redemptions", {"token": token["token"], "invoice_no": "F-1", "lines": lines}
        )
        hold = await provider_post("/v1/holds", {"token": token["token"], "amount_fen": 100 * YUAN})
        affiliation = await _ok(
            await client.post(
                "/v1/affiliations",
                headers=admin,
                json={
                    "from_entity_id": seller,
                    "to_entity_id": holder,
                    "kind": "personnel",
                    "valid_from": "2020-01-01",
                },
            )
        )
        settlement = await _ok(
            await client.post(
                "/v1/settlements",
                headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
                json={"entity_ids": [provider]},
            )
        )
        entries = await _ok(await client.get("/v1/ledger/entries", headers=admin, params={"limit": 1}), 200)
        listed = await _ok(await client.get("/v1/api-keys", headers=admin, params={"limit": 500}), 200)
    spare = next(key["id"] for key in listed["data"] if key["name"] == "fuzz spare")
    objects = {
        "/v1/entities/{id}": holder,
        "/v1/affiliations/{id}": affiliation["id"],
        "/v1/api-keys/{id}": spare,
        "entity_id": holder,
        "application_id": application["id"],
        "voucher_id": voucher["id"],
        "jti": token["jti"],
        "redemption_id": redemption["id"],
        "hold_id": hold["id"],
        "settlement_id": settlement["id"],
        "entry_id": entries["data"][0]["id"],
        "code": COMPUTE,
        "year": str(YEAR),
    }
    return World(keys, objects)


@pytest.fixture(scope="module")
async def world(settings: Settings, engine: AsyncEngine) -> World:
    return await _build(settings, engine)


@pytest.fixture(scope="module")
def app(settings: Settings, world: World) -> Iterator[FastAPI]:
    APP.state.settings = settings
    yield APP
    asgi.shutdown_lifespans()


def _pin_path(case: Case, objects: dict[str, str]) -> None:
    """Aim the case at the world's objects: its fuzzed query and body then reach the handler. A path made
    invalid on purpose stays as it is (and so does the case's record of what it made invalid)."""
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH):
        return
    for name in case.path_parameters:
        real = objects.get(case.path) if name == "id" else objects.get(name)
        if real is not None:
            case.path_parameters[name] = real


@schema.parametrize()
def test_operation(case: Case, app: FastAPI, world: World) -> None:
    turn = world.sent.get(case.operation.label, 0)
    world.sent[case.operation.label] = turn + 1
    key = world.keys[turn % len(world.keys)]
    if (turn // len(world.keys)) % 2:
        _pin_path(case, world.objects)
    # a case whose headers are invalid on purpose (most often: no `Authorization`) is sent as generated
    headers = {} if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER) else bearer(key)
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS, headers=headers, transport_kwargs={"headers": headers})
