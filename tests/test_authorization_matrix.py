"""The authorization matrix (issue 4, "Proof"): every route x every role x own and foreign objects.

API.md, "Who calls": anything outside the role is `403 forbidden`; another entity's object is `404 not_found`,
never its data. One world is built per server, on a database of its own (its definitions add a public-notice
version of `data.trusted_space`, so objections exist to resolve):

- enterprises A, B and C, each holding a voucher, an application, an award in public notice with an
  objection, a redemption by "its" provider and a pending hold: A's compute voucher is redeemed by provider
  P; B's and C's `data.pilot_dataset` vouchers by provider Q (B's token narrowed to Q);
- enterprise D, built as B and C are, for the admin limited to `data`;
- keys: A's enterprise key, P's provider key, an admin, an admin limited to `compute`, an admin limited to
  `data`, an auditor.

Each column below is a key aimed at one world: enterprise A on A's objects (own) and on B's (foreign);
provider P on its own objects (A's voucher) and on Q's (B's); the compute-limited admin and the auditor on
B's (a data program); the data-limited admin on D's (its own program); the unlimited admin on C's, so that
the writes the admins are allowed to make (revoking, reversing, resolving) touch nothing any other column
looks at. Writes that are allowed are sent a body that is refused on its merits where the route takes one
(409/422), so the world stays as built.

API.md, "Admin scope": an admin limited to voucher types acts on its programs' objects only (the
compute-limited admin is 403 on B's data objects, the data-limited admin allowed on D's), and the registry
(API keys, entities, affiliations, external awards) and settlements are for an unlimited admin only: both
limited admins are 403 there, whatever the object.

`test_the_table_covers_every_route` fails when a route is added without a row here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.apikeys import Role
from app.db import make_engine
from app.main import create_app
from app.settings import Settings
from tests.service_support import CURRENT_YEAR
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app
from vouchers.programs import DEFINITIONS_FILE

YUAN = 100
YEAR = CURRENT_YEAR  # approved only inside its own year
COMPUTE = "compute.purchase"
PILOT = "data.pilot_dataset"
TRUSTED = "data.trusted_space"
NOTICE_VERSION = f"""

[[program]]
code = "data.trusted_space"
version = 2
from_year = {YEAR}
article = "9.1"
name = "数据券 industry trusted data space, with public notice"
voucher_type = "data"
mode = "payout"
award = "rate"
rate_bp = 3000
cap_fen = 300_000_000
cap_applies_to = "project"
notice_days = 5
"""
NO_ENTITY = "ent_" + "0" * 24  # well formed, registered nowhere


class Col(StrEnum):
    """A key and the world it is aimed at."""

    ANON = "anon"
    ENT_OWN = "enterprise_own"
    ENT_FOREIGN = "enterprise_foreign"
    PROV_OWN = "provider_own"
    PROV_FOREIGN = "provider_foreign"
    ADMIN = "admin"
    ADMIN_COMPUTE = "admin_compute_on_data"
    ADMIN_DATA = "admin_data_on_data"
    AUDITOR = "auditor"


class Exp(StrEnum):
    OK = "allowed"  # 2xx, or a 4xx refusal on the merits: never 401, 403 or 404, never 5xx
    UNAUTH = "401"
    DENY = "403 forbidden"
    HIDE = "404 not_found"
    WRONG_PROVIDER = "403 wrong_provider"  # a token narrowed to another provider (API.md, "Voucher tokens")


def expect(
    *,
    anon: Exp = Exp.UNAUTH,
    ent_own: Exp = Exp.DENY,
    ent_foreign: Exp | None = None,
    prov_own: Exp = Exp.DENY,
    prov_foreign: Exp | None = None,
    admin: Exp = Exp.OK,
    admin_compute: Exp | None = None,
    admin_data: Exp | None = None,
    auditor: Exp = Exp.DENY,
) -> dict[Col, Exp]:
    """One row's expectations; a foreign column defaults to its own column, the limited admins to the admin."""
    return {
        Col.ANON: anon,
        Col.ENT_OWN: ent_own,
        Col.ENT_FOREIGN: ent_foreign if ent_foreign is not None else ent_own,
        Col.PROV_OWN: prov_own,
        Col.PROV_FOREIGN: prov_foreign if prov_foreign is not None else prov_own,
        Col.ADMIN: admin,
        Col.ADMIN_COMPUTE: admin_compute if admin_compute is not None else admin,
        Col.ADMIN_DATA: admin_data if admin_data is not None else admin,
        Col.AUDITOR: auditor,
    }


PUBLIC = {col: Exp.OK for col in Col}
# the registry and settlements: an admin limited to no voucher type (API.md, "Admin scope")
UNRESTRICTED_ADMIN = expect(admin_compute=Exp.DENY, admin_data=Exp.DENY)
ADMIN_OF_TYPE = expect(admin_compute=Exp.DENY)  # admin writes on a data-program object
ADMIN_AUDITOR = expect(auditor=Exp.OK)  # reads: every admin (limited or not) and the auditor
ANY_KEY = expect(ent_own=Exp.OK, prov_own=Exp.OK, auditor=Exp.OK)
ENTITY_READ = expect(
    ent_own=Exp.OK, ent_foreign=Exp.HIDE, prov_own=Exp.OK, prov_foreign=Exp.HIDE, auditor=Exp.OK
)  # an entity's own keys read it; another entity is 404
HOLDER_READ = expect(ent_own=Exp.OK, ent_foreign=Exp.HIDE, auditor=Exp.OK)  # holder, admin, auditor
HOLDER_OR_ADMIN_OF_TYPE = expect(ent_own=Exp.OK, ent_foreign=Exp.HIDE, admin_compute=Exp.DENY)
PROVIDER_OWN = expect(admin=Exp.DENY, prov_own=Exp.OK, prov_foreign=Exp.HIDE)
PROVIDER_TOKEN = expect(admin=Exp.DENY, prov_own=Exp.OK, prov_foreign=Exp.WRONG_PROVIDER)

Body = Mapping[str, Any] | None


@dataclass(frozen=True)
class Row:
    """A request template: `{name}` in the path and query are filled from the column's target; `body`
    is a function of the target."""

    expectations: dict[Col, Exp]
    query: str = ""
    body: Callable[[Mapping[str, str]], Body] | None = None
    idempotent: bool = False  # send an Idempotency-Key
    params: Mapping[str, str] = field(default_factory=dict)  # path placeholder -> target field, when they differ


def lines_paid_by_nobody(_t: Mapping[str, str]) -> dict[str, Any]:
    return {"invoice_no": "MATRIX-NONE", "lines": [{"category": "other", "amount_fen": 100, "description": "x"}]}


TABLE: dict[tuple[str, str], Row] = {
    # public
    ("GET", "/openapi.json"): Row(PUBLIC),
    ("GET", "/docs"): Row(PUBLIC),
    ("GET", "/docs/oauth2-redirect"): Row(PUBLIC),
    ("GET", "/redoc"): Row(PUBLIC),
    ("GET", "/healthz"): Row(PUBLIC),
    ("GET", "/readyz"): Row(PUBLIC),
    ("GET", "/metrics"): Row(PUBLIC),
    ("GET", "/.well-known/jwks.json"): Row(PUBLIC),
    ("GET", "/v1/notices"): Row(PUBLIC),
    # api keys: an unlimited admin only (the targets are a data admin key and enterprise keys)
    ("POST", "/v1/api-keys"): Row(
        UNRESTRICTED_ADMIN, body=lambda t: {"role": "provider", "name": "matrix", "entity_id": t["entity"]}
    ),  # a provider key for an enterprise: 422
    ("GET", "/v1/api-keys"): Row(UNRESTRICTED_ADMIN),
    ("DELETE", "/v1/api-keys/{id}"): Row(UNRESTRICTED_ADMIN, params={"id": "api_key"}),
    # affiliations
    ("POST", "/v1/affiliations"): Row(
        UNRESTRICTED_ADMIN,  # an entity related to itself: 422
        body=lambda t: {
            "from_entity_id": t["entity"],
            "to_entity_id": t["entity"],
            "kind": "control",
            "valid_from": "2020-01-01",
        },
    ),
    ("GET", "/v1/affiliations/check"): Row(
        # a provider checks its own affiliations; a pair without it is outside its role (403, whether or not
        # the entities exist)
        expect(prov_own=Exp.OK, prov_foreign=Exp.DENY, auditor=Exp.OK),
        query="a={entity}&b={peer}",
    ),
    ("GET", "/v1/affiliations"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/affiliations/{id}"): Row(ADMIN_AUDITOR, params={"id": "affiliation"}),
    ("PATCH", "/v1/affiliations/{id}"): Row(
        UNRESTRICTED_ADMIN, params={"id": "affiliation"}, body=lambda t: {"valid_to": "2000-01-01"}
    ),  # ends before it began: 422
    # entities
    ("POST", "/v1/entities"): Row(
        UNRESTRICTED_ADMIN, body=lambda t: {"uscc": "not-a-code", "name": "matrix", "kind": "enterprise"}
    ),  # 422 invalid_uscc
    ("GET", "/v1/entities"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/entities/{id}"): Row(ENTITY_READ, params={"id": "entity"}),
    ("PATCH", "/v1/entities/{id}"): Row(UNRESTRICTED_ADMIN, params={"id": "entity"}, body=lambda t: {"tags": []}),
    ("GET", "/v1/entities/{id}/history"): Row(ENTITY_READ, params={"id": "entity"}),
    ("GET", "/v1/entities/{entity_id}/balances"): Row(
        ENTITY_READ, query=f"year={YEAR}", params={"entity_id": "entity"}
    ),
    # ledger
    ("GET", "/v1/ledger/accounts"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/ledger/entries"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/ledger/entries/{entry_id}"): Row(ADMIN_AUDITOR, params={"entry_id": "entry"}),
    ("GET", "/v1/ledger/trial-balance"): Row(ADMIN_AUDITOR),
    # programs and budgets (the target program is data.pilot_dataset)
    ("GET", "/v1/programs"): Row(ANY_KEY),
    ("PUT", "/v1/programs/{code}/budgets/{year}"): Row(
        ADMIN_OF_TYPE, body=lambda t: {"amount_fen": 0}
    ),  # below what is committed: 409
    ("GET", "/v1/programs/{code}/budgets/{year}"): Row(ADMIN_AUDITOR),
    # applications
    ("POST", "/v1/applications"): Row(
        # an enterprise applies for itself only: naming another entity is outside its role (403)
        expect(ent_own=Exp.OK, ent_foreign=Exp.DENY, admin_compute=Exp.DENY),
        body=lambda t: {
            "program": PILOT,
            "applicant_entity_id": t["entity"],
            "year": YEAR,
            "basis": {"project_ref": f"MATRIX-{t['entity']}", "pilot_base": "国家人工智能行业应用中试基地"},
        },
    ),
    ("GET", "/v1/applications"): Row(expect(ent_own=Exp.OK, auditor=Exp.OK), query="entity_id={entity}"),
    ("GET", "/v1/applications/{application_id}"): Row(HOLDER_READ, params={"application_id": "application"}),
    ("POST", "/v1/applications/{application_id}/approve"): Row(
        ADMIN_OF_TYPE, params={"application_id": "application"}, body=lambda t: {}
    ),  # already issued: 409
    ("POST", "/v1/applications/{application_id}/reject"): Row(
        ADMIN_OF_TYPE, params={"application_id": "application"}, body=lambda t: {"reason": "matrix"}
    ),  # already issued: 409
    ("POST", "/v1/applications/{application_id}/reverse"): Row(
        ADMIN_OF_TYPE,
        params={"application_id": "application"},
        body=lambda t: {"reason": "matrix", "grounds": "administrative"},
    ),
    ("POST", "/v1/applications/{application_id}/objections"): Row(
        ANY_KEY, params={"application_id": "notice_app"}, body=lambda t: {"reason": "matrix objection"}
    ),  # any authenticated caller objects to an award in public notice
    ("POST", "/v1/objections/{objection_id}/resolve"): Row(
        ADMIN_OF_TYPE, params={"objection_id": "objection"}, body=lambda t: {"outcome": "dismissed", "note": "m"}
    ),
    ("POST", "/v1/external-awards"): Row(
        UNRESTRICTED_ADMIN,
        body=lambda t: {
            "entity_id": t["entity"],
            "basis_ref": "nosuchkind:ref",  # 422
            "policy": "matrix",
            "amount_fen": 100,
            "awarded_on": "2026-01-01",
        },
    ),
    ("GET", "/v1/external-awards/{award_id}"): Row(ADMIN_AUDITOR, params={"award_id": "external_award"}),
    ("POST", "/v1/external-awards/{award_id}/reverse"): Row(
        UNRESTRICTED_ADMIN,
        params={"award_id": "external_award"},
        body=lambda t: {"reason": "matrix", "grounds": "neither"},  # 422
    ),
    # sanctions (art. 25): lifted by an unlimited admin only
    ("POST", "/v1/sanctions/{sanction_id}/lift"): Row(
        UNRESTRICTED_ADMIN, params={"sanction_id": "sanction"}, body=lambda t: {}
    ),  # no reason: 422
    ("POST", "/v1/purchases"): Row(
        expect(admin=Exp.DENY, prov_own=Exp.OK),
        body=lambda t: {
            "buyer_entity_id": NO_ENTITY,  # 422
            "invoice_no": "MATRIX-P",
            "category": "compute",
            "amount_fen": 100,
            "purchased_on": "2026-01-01",
        },
    ),
    # redemptions and holds
    ("POST", "/v1/redemptions"): Row(
        PROVIDER_TOKEN, idempotent=True, body=lambda t: {"token": t["token"], **lines_paid_by_nobody(t)}
    ),  # nothing eligible: 409
    ("POST", "/v1/holds"): Row(
        PROVIDER_TOKEN, idempotent=True, body=lambda t: {"token": t["token"], "amount_fen": 10**14}
    ),  # more than the voucher has: 409
    ("POST", "/v1/holds/{hold_id}/capture"): Row(
        PROVIDER_OWN, idempotent=True, params={"hold_id": "hold"}, body=lines_paid_by_nobody
    ),
    ("POST", "/v1/holds/{hold_id}/void"): Row(PROVIDER_OWN, idempotent=True, params={"hold_id": "hold"}),
    ("POST", "/v1/redemptions/{redemption_id}/refund"): Row(
        PROVIDER_OWN,
        idempotent=True,
        params={"redemption_id": "redemption"},
        body=lambda t: {"amount_fen": 10**14, "reason": "matrix"},  # more than was paid: 409
    ),
    ("POST", "/v1/redemptions/{redemption_id}/reverse"): Row(
        ADMIN_OF_TYPE,
        idempotent=True,
        params={"redemption_id": "redemption"},
        body=lambda t: {"reason": "matrix", "grounds": "administrative"},
    ),
    ("GET", "/v1/redemptions"): Row(
        expect(ent_own=Exp.OK, prov_own=Exp.OK, auditor=Exp.OK), query="voucher_id={voucher}"
    ),
    ("GET", "/v1/redemptions/{redemption_id}"): Row(
        expect(ent_own=Exp.OK, ent_foreign=Exp.HIDE, prov_own=Exp.OK, prov_foreign=Exp.HIDE, auditor=Exp.OK),
        params={"redemption_id": "redemption"},
    ),
    # vouchers and tokens
    ("GET", "/v1/vouchers"): Row(expect(ent_own=Exp.OK, auditor=Exp.OK), query="holder_entity_id={entity}"),
    ("GET", "/v1/vouchers/{voucher_id}"): Row(HOLDER_READ, params={"voucher_id": "voucher"}),
    ("POST", "/v1/vouchers/{voucher_id}/revoke"): Row(
        ADMIN_OF_TYPE,
        params={"voucher_id": "voucher"},
        body=lambda t: {"reason": "matrix", "grounds": "administrative"},
    ),
    ("POST", "/v1/vouchers/{voucher_id}/token"): Row(
        HOLDER_OR_ADMIN_OF_TYPE, params={"voucher_id": "voucher"}, body=lambda t: {}
    ),
    ("POST", "/v1/tokens/{jti}/revoke"): Row(HOLDER_OR_ADMIN_OF_TYPE),
    # settlements: cross-program, so an unlimited admin only
    ("POST", "/v1/settlements"): Row(
        UNRESTRICTED_ADMIN, idempotent=True, body=lambda t: {"entity_ids": [t["entity"]]}
    ),  # an enterprise with nothing payable: 409
    ("GET", "/v1/settlements"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/settlements/{settlement_id}"): Row(ADMIN_AUDITOR, params={"settlement_id": "settlement"}),
    ("GET", "/v1/exports/journal"): Row(ADMIN_AUDITOR),  # the journal export, every format
    # reports: a program-year for every admin and the auditor; a statement for the entity itself too
    ("GET", "/v1/reports/programs/{code}/{year}"): Row(ADMIN_AUDITOR),
    ("GET", "/v1/entities/{entity_id}/statement"): Row(
        ENTITY_READ, query=f"year={YEAR}", params={"entity_id": "entity"}
    ),
}

DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app answers (HEAD, added to each GET, left out)."""
    found: set[tuple[str, str]] = set()
    for context in iter_route_contexts(app.routes):
        path = context.path_format
        assert path is not None
        for method in getattr(context, "methods", None) or ():
            if method != "HEAD":
                found.add((method, path))
    return found


def test_the_table_covers_every_route() -> None:
    app = create_app(Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none", background_tasks=False))
    routes = app_routes(app)
    missing = sorted(routes - TABLE.keys())
    stale = sorted(TABLE.keys() - routes)
    assert not missing, f"routes with no row in the authorization matrix: {missing}"
    assert not stale, f"rows for routes the app does not have: {stale}"
    # every non-/v1 route is public, and every row says something about every column
    for (method, path), row in TABLE.items():
        assert set(row.expectations) == set(Col), (method, path)
        if not path.startswith("/v1/"):
            assert row.expectations is PUBLIC, (method, path)


# the world


@dataclass
class World:
    client: httpx.AsyncClient
    keys: dict[Col, dict[str, str]]
    targets: dict[Col, dict[str, str]]
    foreign_ids: dict[Col, set[str]]


async def _admin_dsn(server_url: str) -> tuple[str, dict[str, str]]:
    url = make_url(server_url)
    host = url.query.get("host")
    kwargs = {"host": host} if isinstance(host, str) else {}
    return url.set(drivername="postgresql", query={}).render_as_string(hide_password=False), kwargs


async def _create_database(server_url: str) -> str:
    name = f"vl_test_{uuid.uuid4().hex[:12]}"
    dsn, kwargs = await _admin_dsn(server_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(server_url: str, url: str) -> None:
    dsn, kwargs = await _admin_dsn(server_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    finally:
        await conn.close()


async def _ok(response: httpx.Response, status: int = 201) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def _key_id(client: httpx.AsyncClient, admin: dict[str, str], name: str) -> str:
    listed = await _ok(await client.get("/v1/api-keys", headers=admin, params={"limit": 200}), 200)
    return next(k["id"] for k in listed["data"] if k["name"] == name)


async def _build(client: httpx.AsyncClient, engine: AsyncEngine) -> World:
    admin = bearer(await create_key(engine, Role.ADMIN, name="matrix admin"))
    for program, amount in ((COMPUTE, 1_000_000), (PILOT, 1_000_000), (TRUSTED, 2_000_000)):
        await _ok(
            await client.put(
                f"/v1/programs/{program}/budgets/{YEAR}", headers=admin, json={"amount_fen": amount * YUAN}
            ),
            200,
        )
    a, b, c, d = [await create_entity(engine, name=f"matrix {n}") for n in "ABCD"]
    p, q, seller, x = [await create_entity(engine, kind="provider") for _ in range(4)]
    ent_a = bearer(await create_key(engine, Role.ENTERPRISE, entity_id=a, name="matrix A"))
    prov_p = bearer(await create_key(engine, Role.PROVIDER, entity_id=p, name="matrix P"))
    prov_q = bearer(await create_key(engine, Role.PROVIDER, entity_id=q, name="matrix Q"))
    admin_compute = bearer(await create_key(engine, Role.ADMIN, voucher_types=["compute"], name="matrix compute"))
    admin_data = bearer(await create_key(engine, Role.ADMIN, voucher_types=["data"], name="matrix data"))
    auditor = bearer(await create_key(engine, Role.AUDITOR, name="matrix auditor"))
    await create_key(engine, Role.ADMIN, voucher_types=["data"], name="matrix spare B")
    await create_key(engine, Role.ENTERPRISE, entity_id=c, name="matrix spare C")
    await create_key(engine, Role.ENTERPRISE, entity_id=d, name="matrix spare D")

    async def submit(program: str, holder: str, basis: dict[str, Any]) -> str:
        body = {"program": program, "applicant_entity_id": holder, "year": YEAR, "basis": basis}
        return str((await _ok(await client.post("/v1/applications", headers=admin, json=body)))["id"])

    async def approve(application: str, award_fen: int | None = None) -> str:
        body = {} if award_fen is None else {"award_fen": award_fen}
        url = f"/v1/applications/{application}/approve"
        return str((await _ok(await client.post(url, headers=admin, json=body)))["id"])

    async def token(voucher: str, **narrow: Any) -> dict[str, Any]:
        return await _ok(await client.post(f"/v1/vouchers/{voucher}/token", headers=admin, json=narrow))

    async def provider_call(key: dict[str, str], path: str, body: dict[str, Any]) -> str:
        headers = {**key, "Idempotency-Key": f"world-{uuid.uuid4().hex}"}
        return str((await _ok(await client.post(path, headers=headers, json=body)))["id"])

    world: dict[str, dict[str, str]] = {}
    # A: a compute voucher, redeemed by P
    app_a = await submit(
        COMPUTE,
        a,
        {
            "purchases": [
                {
                    "provider_entity_id": seller,
                    "invoice_no": f"M-{a[-8:]}",
                    "category": "compute",
                    "amount_fen": 1_200_000 * YUAN,
                    "purchased_on": f"{YEAR - 1}-05-01",
                }
            ]
        },
    )
    voucher_a = await approve(app_a)
    # B, C and D: data.pilot_dataset vouchers, redeemed by Q (B's token narrowed to Q)
    for name, holder, provider, provider_key, lines in (
        ("A", a, p, prov_p, [{"category": "compute", "amount_fen": 1_000 * YUAN}]),
        ("B", b, q, prov_q, [{"category": "dataset", "amount_fen": 1_000 * YUAN}]),
        ("C", c, q, prov_q, [{"category": "dataset", "amount_fen": 1_000 * YUAN}]),
        ("D", d, q, prov_q, [{"category": "dataset", "amount_fen": 1_000 * YUAN}]),
    ):
        if name == "A":
            application, voucher = app_a, voucher_a
        else:
            application = await submit(
                PILOT, holder, {"project_ref": f"PD-{holder}", "pilot_base": "国家人工智能行业应用中试基地"}
            )
            voucher = await approve(application, 100_000 * YUAN)
        usable = await token(voucher, **({"provider_entity_id": q} if name == "B" else {}))
        redemption = await provider_call(
            provider_key, "/v1/redemptions", {"token": usable["token"], "invoice_no": f"W-{name}", "lines": lines}
        )
        hold = await provider_call(provider_key, "/v1/holds", {"token": usable["token"], "amount_fen": 100})
        spare = await token(voucher)
        notice_app = await submit(TRUSTED, holder, {"project_ref": f"TS-{holder}", "investment_fen": 10**6 * YUAN})
        await approve(notice_app)
        objection = await _ok(
            await client.post(
                f"/v1/applications/{notice_app}/objections", headers=admin, json={"reason": "world objection"}
            )
        )
        affiliation = await _ok(
            await client.post(
                "/v1/affiliations",
                headers=admin,
                json={"from_entity_id": x, "to_entity_id": holder, "kind": "personnel", "valid_from": "2020-01-01"},
            )
        )
        world[name] = {
            "entity": holder,
            "peer": provider,
            "application": application,
            "voucher": voucher,
            "token": usable["token"],
            "redemption": redemption,
            "hold": hold,
            "jti": spare["jti"],
            "notice_app": notice_app,
            "objection": objection["id"],
            "affiliation": affiliation["id"],
            "code": PILOT,
            "year": str(YEAR),
        }
    settled = await _ok(
        await client.post("/v1/settlements", headers={**admin, "Idempotency-Key": "world"}, json={"entity_ids": [p]})
    )
    entries = await _ok(await client.get("/v1/ledger/entries", headers=admin, params={"limit": 1}), 200)
    external = await _ok(
        await client.post(
            "/v1/external-awards",
            headers=admin,
            json={
                "entity_id": a,
                "basis_ref": "project:MATRIX-EXTERNAL",
                "policy": "matrix",
                "amount_fen": 100,
                "awarded_on": f"{YEAR}-01-02",
            },
        )
    )
    shared = {
        "settlement": settled["id"],
        "entry": entries["data"][0]["id"],
        "external_award": external["id"],
        "sanction": "san_" + "0" * 24,  # well formed; a body without a reason is refused before it is looked up
    }
    world["A"]["api_key"] = world["B"]["api_key"] = await _key_id(client, admin, "matrix spare B")
    world["C"]["api_key"] = await _key_id(client, admin, "matrix spare C")
    world["D"]["api_key"] = await _key_id(client, admin, "matrix spare D")
    # provider P's own world is A's objects seen from P; Q's world is B's seen from Q
    own_p = {**world["A"], "entity": p, "peer": a}
    foreign_q = {**world["B"], "entity": q, "peer": b}
    targets = {
        Col.ANON: world["B"],
        Col.ENT_OWN: world["A"],
        Col.ENT_FOREIGN: world["B"],
        Col.PROV_OWN: own_p,
        Col.PROV_FOREIGN: foreign_q,
        Col.ADMIN: world["C"],
        Col.ADMIN_COMPUTE: world["B"],
        Col.ADMIN_DATA: world["D"],
        Col.AUDITOR: world["B"],
    }
    keys = {
        Col.ANON: {},
        Col.ENT_OWN: ent_a,
        Col.ENT_FOREIGN: ent_a,
        Col.PROV_OWN: prov_p,
        Col.PROV_FOREIGN: prov_p,
        Col.ADMIN: admin,
        Col.ADMIN_COMPUTE: admin_compute,
        Col.ADMIN_DATA: admin_data,
        Col.AUDITOR: auditor,
    }
    b_objects = {world["B"][k] for k in ("application", "voucher", "redemption", "hold", "jti", "objection")}
    foreign_ids = {col: set() for col in Col} | {Col.ENT_FOREIGN: b_objects, Col.PROV_FOREIGN: b_objects}
    return World(client, keys, {col: {**t, **shared} for col, t in targets.items()}, foreign_ids)


@pytest.fixture(scope="module")
async def world(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    url = await _create_database(server_url)
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        programs: Path = tmp_path_factory.mktemp("matrix") / "programs.toml"
        await asyncio.to_thread(programs.write_text, DEFINITIONS_FILE.read_text() + NOTICE_VERSION)
        settings = Settings(database_url=url, background_tasks=False, api_key_cache_ttl_s=0, programs_file=programs)
        engine = make_engine(url, settings)
        try:
            async with running_app(settings) as client:
                yield await _build(client, engine)
        finally:
            await engine.dispose()
    finally:
        await _drop_database(server_url, url)


# the matrix


def _request(row: Row, path: str, target: Mapping[str, str]) -> tuple[str, dict[str, Any] | None]:
    values = {**target, **{placeholder: target[name] for placeholder, name in row.params.items()}}
    url = path.format_map(values)
    if row.query:
        url += "?" + row.query.format_map(values)
    body = row.body(target) if row.body is not None else None
    return url, None if body is None else dict(body)


CASES = [pytest.param(method, path, col, id=f"{method} {path} | {col}") for (method, path) in TABLE for col in Col]


@pytest.mark.parametrize(("method", "path", "col"), CASES)
async def test_authorization(world: World, method: str, path: str, col: Col) -> None:
    row = TABLE[(method, path)]
    expected = row.expectations[col]
    target = world.targets[col]
    url, body = _request(row, path, target)
    headers = dict(world.keys[col])
    if row.idempotent:
        headers["Idempotency-Key"] = f"matrix {method} {path} {col}"
    response = await world.client.request(method, url, headers=headers, json=body)
    seen = f"{method} {url} as {col}: {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, seen
    if expected is Exp.OK:
        assert response.status_code not in (401, 403, 404), seen
        assert response.status_code < 300 or response.headers["content-type"].startswith("application/problem+json"), (
            seen
        )
    elif expected is Exp.UNAUTH:
        assert_problem(response, 401, "unauthorized")
    elif expected is Exp.DENY:
        assert_problem(response, 403, "forbidden")
    elif expected is Exp.HIDE:
        assert_problem(response, 404, "not_found")
    else:
        assert expected is Exp.WRONG_PROVIDER
        assert_problem(response, 403, "wrong_provider")
    # another entity's objects never show, whatever the answer (ids the caller itself sent aside)
    sent = url + ("" if body is None else str(body))
    leaked = {i for i in world.foreign_ids[col] if i not in sent and i in response.text}
    assert not leaked, f"{seen}: shows {leaked}"
