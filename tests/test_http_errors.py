"""Every error is an RFC 9457 problem with a stable code, and none leaks internals."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import DOMAIN_ERRORS, NotFound, domain_status
from app.log import redact
from app.main import BODY_SIZE_MAX, create_app
from app.schemas import FEN_MAX, PositiveFen, RequestModel
from app.settings import Settings
from ledger import errors as ledger_errors
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


async def test_missing_key_is_401_with_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/api-keys")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer vl_abcdefghijkl_" + "A" * 43,  # well formed, unknown
        "Bearer vl_ABCDEFGHIJKL_" + "A" * 43,  # prefix out of alphabet
        "Bearer vl_abcdefghijkl_" + "A" * 44,  # secret too long
        "Bearer ",
    ],
)
async def test_bad_keys_are_401(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.get("/v1/api-keys", headers={"Authorization": authorization})
    body = assert_problem(response, 401, "unauthorized")
    assert "AAAA" not in body["detail"]


async def test_right_secret_wrong_prefix_and_wrong_secret_right_prefix_are_401(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key = await create_key(engine)
    _vl, prefix, secret = key.split("_", 2)
    tampered = f"vl_{prefix}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    assert_problem(await client.get("/v1/api-keys", headers=bearer(tampered)), 401, "unauthorized")
    assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200


async def test_role_outside_the_route_is_403(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine, "auditor")
    assert_problem(await client.get("/v1/api-keys", headers=bearer(key)), 403, "forbidden")


async def test_unknown_route_is_404_not_found(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/v1/no-such-thing"), 404, "not_found")
    assert body["title"] == "Not Found"


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.put("/healthz")
    assert_problem(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


async def test_unknown_field_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine)
    response = await client.post(
        "/v1/api-keys", headers=bearer(key), json={"role": "auditor", "name": "x", "colour": "blue"}
    )
    body = assert_problem(response, 422, "validation_error")
    assert {"loc": ["body", "colour"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"} in body[
        "errors"
    ]
    assert all(set(error) == {"loc", "msg", "type"} for error in body["errors"])  # never the input back


@pytest.mark.parametrize(
    "payload",
    [
        {"role": 1, "name": "x"},
        {"role": "auditor", "name": ["x"]},
        {"role": "superuser", "name": "x"},
        {"role": "auditor"},
        [],
    ],
)
async def test_wrong_types_are_422(client: httpx.AsyncClient, engine: AsyncEngine, payload: object) -> None:
    key = await create_key(engine)
    body = assert_problem(await client.post("/v1/api-keys", headers=bearer(key), json=payload), 422, "validation_error")
    assert body["errors"] and all(error["loc"] and error["msg"] for error in body["errors"])


async def test_malformed_json_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine)
    response = await client.post(
        "/v1/api-keys", headers={**bearer(key), "Content-Type": "application/json"}, content=b'{"role": '
    )
    assert_problem(response, 422, "validation_error")


async def test_bad_query_parameter_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine)
    body = assert_problem(await client.get("/v1/api-keys?limit=ten", headers=bearer(key)), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "limit"]


async def test_a_nul_in_any_text_is_422_never_a_database_error(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """PostgreSQL stores no U+0000 in text: a NUL that reached a query was a 500 (found fuzzing, issue 6)."""
    admin = bearer(await create_key(engine))
    entity = await create_entity(engine)
    sent = [
        ("PATCH", f"/v1/entities/{entity}", {"name": "a\u0000b"}),
        (
            "POST",
            "/v1/external-awards",
            {
                "entity_id": entity,
                "basis_ref": "invoice:1\u0000",
                "policy": "p",
                "amount_fen": 1,
                "awarded_on": "2026-01-01",
            },
        ),
        (
            "POST",
            "/v1/applications",
            {
                "program": "data.trusted_space",
                "applicant_entity_id": entity,
                "year": 2027,
                "basis": {"project_ref": "x\u0000", "investment_fen": 10**8},
            },
        ),
        ("GET", "/v1/entities/ent_%00", None),
        ("GET", "/v1/affiliations?entity_id=%00", None),
        ("GET", "/v1/affiliations/aff_%00", None),
        ("GET", f"/v1/affiliations/check?a=ent_%00&b={entity}", None),
    ]
    for method, path, body in sent:
        response = await client.request(method, path, headers=admin, json=body)
        assert_problem(response, 422, "validation_error")


async def test_oversized_body_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine)
    response = await client.post(
        "/v1/api-keys", headers=bearer(key), json={"role": "auditor", "name": "x" * (2 * 1024 * 1024)}
    )
    assert_problem(response, 413, "payload_too_large")


async def test_unhandled_error_is_a_generic_500_and_a_log_line(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("password=hunter2 at /srv/secret.py")

    async with running_app(settings, app) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.get("/test-only/boom")
    body = assert_problem(response, 500, "internal_error")
    assert "hunter2" not in response.text and "secret.py" not in response.text and "Traceback" not in response.text
    assert body["detail"] == "the server could not complete the request; it has been logged"
    logged = [record for record in caplog.records if record.exc_info and "hunter2" in str(record.exc_info[1])]
    assert len(logged) == 1


async def test_problem_errors_raised_by_routes(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/test-only/missing")
    async def missing() -> None:
        raise NotFound("no such thing")

    @app.get("/test-only/refused")
    async def refused() -> None:
        raise ledger_errors.LimitExceeded("account x would go below zero")

    @app.get("/test-only/conflict")
    async def conflict() -> None:
        raise ledger_errors.IdempotencyConflict("key reused for another request")

    async with running_app(settings, app) as client:
        body = assert_problem(await client.get("/test-only/missing"), 404, "not_found")
        assert body["detail"] == "no such thing"
        body = assert_problem(await client.get("/test-only/refused"), 409, "limit_exceeded")
        assert body["detail"] == "account x would go below zero"
        assert_problem(await client.get("/test-only/conflict"), 422, "idempotency_conflict")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ledger_errors.InvalidEntry, 422, "validation_error"),
        (ledger_errors.AccountNotFound, 404, "not_found"),
        (ledger_errors.AccountExists, 409, "account_exists"),
        (ledger_errors.EntryNotFound, 404, "not_found"),
        (ledger_errors.NotReversible, 409, "not_reversible"),
        (ledger_errors.IdempotencyConflict, 422, "idempotency_conflict"),
        (ledger_errors.AppendOnlyViolation, 409, "append_only"),
        (ledger_errors.Refusal, 409, "refused"),
        (ledger_errors.LimitExceeded, 409, "limit_exceeded"),
        (ledger_errors.PendingExpired, 409, "pending_expired"),
        (ledger_errors.PendingResolved, 409, "pending_resolved"),
        (ledger_errors.AlreadyReversed, 409, "already_reversed"),
    ],
)
def test_ledger_errors_map_to_their_status_and_own_code(
    error: type[ledger_errors.LedgerError], status: int, code: str
) -> None:
    assert domain_status(error("x")) == (status, code)


def test_every_mapped_domain_error_is_an_exception_class() -> None:
    assert all(issubclass(cls, Exception) for cls in DOMAIN_ERRORS)


class _Amount(RequestModel):
    amount_fen: PositiveFen


@pytest.mark.parametrize("amount", [True, 1.0, 1.5, "1", -1, 0, FEN_MAX + 1, None])
async def test_money_is_a_strict_positive_integer(settings: Settings, amount: object) -> None:
    app = create_app(settings)

    @app.post("/test-only/amount")
    async def echo(body: _Amount) -> _Amount:
        return body

    async with running_app(settings, app) as client:
        assert_problem(await client.post("/test-only/amount", json={"amount_fen": amount}), 422, "validation_error")
        assert (await client.post("/test-only/amount", json={"amount_fen": 5})).json() == {"amount_fen": 5}


async def test_keys_never_reach_the_log(
    client: httpx.AsyncClient, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    key = await create_key(engine)
    with caplog.at_level(logging.DEBUG):
        assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200
        logging.getLogger("test").warning("a careless line quoting %s", key)
    secret = key.split("_", 2)[2]
    assert secret not in caplog.text
    assert redact(f"Authorization: Bearer {key}") == f"Authorization: Bearer {key[:15]}_[redacted]"


async def test_oversized_streamed_body_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await create_key(engine)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"role": "auditor", "name": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = await client.post(
        "/v1/api-keys", headers={**bearer(key), "Content-Type": "application/json"}, content=chunks()
    )
    assert_problem(response, 413, "payload_too_large")


def _padded_body(size: int) -> bytes:
    """A JSON key request of exactly `size` bytes (its name far too long: 422 once read)."""
    empty = json.dumps({"role": "auditor", "name": ""}).encode()
    body = json.dumps({"role": "auditor", "name": "x" * (size - len(empty))}).encode()
    assert len(body) == size
    return body


async def test_the_body_limit_is_one_mebibyte_exactly(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    assert BODY_SIZE_MAX == 1024 * 1024
    headers = {**bearer(await create_key(engine)), "Content-Type": "application/json"}
    at_limit = await client.post("/v1/api-keys", headers=headers, content=_padded_body(BODY_SIZE_MAX))
    body = assert_problem(at_limit, 422, "validation_error")  # read and parsed: the name is too long
    assert body["errors"][0]["loc"] == ["body", "name"]
    over = await client.post("/v1/api-keys", headers=headers, content=_padded_body(BODY_SIZE_MAX + 1))
    assert_problem(over, 413, "payload_too_large")
    assert str(BODY_SIZE_MAX) in over.json()["detail"]


async def test_an_oversized_body_is_413_before_authentication(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/redemptions",
        headers={"Content-Type": "application/json", "Idempotency-Key": "k"},
        content=_padded_body(BODY_SIZE_MAX + 1),
    )
    assert_problem(response, 413, "payload_too_large")


async def test_every_list_takes_a_limit_between_one_and_the_page_limit(settings: Settings, engine: AsyncEngine) -> None:
    settings = settings.model_copy(update={"page_limit_max": 7})
    app = create_app(settings)
    lists = [
        path
        for path, operations in app.openapi()["paths"].items()
        if any(parameter["name"] == "limit" for parameter in operations.get("get", {}).get("parameters", []))
    ]
    assert len(lists) >= 10, lists
    admin = bearer(await create_key(engine))
    async with running_app(settings, app) as client:
        for path in lists:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            for limit in ("0", "-1", "8", "1e3", "9" * 30):
                response = await client.get(concrete, params={"limit": limit}, headers=admin)
                body = assert_problem(response, 422, "validation_error")
                assert body["errors"][0]["loc"] == ["query", "limit"], (path, limit, body)
            if "{" not in path:
                page = await client.get(path, params={"limit": "7"}, headers=admin)
                assert page.status_code == 200, (path, page.text)
                assert len(page.json()["data"]) <= 7
            too_long = await client.get(concrete, params={"cursor": "a" * 1025}, headers=admin)
            assert assert_problem(too_long, 422, "validation_error")["errors"][0]["loc"] == ["query", "cursor"]


async def test_a_body_that_is_not_utf8_is_422_not_an_undocumented_400(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    headers = {**bearer(await create_key(engine)), "Content-Type": "application/json"}
    for content in (b'{"role": "\xff"}', b"\xc3\x28", b'{"name": "caf\xe9"}'):  # stray, cut short, Latin-1
        body = assert_problem(
            await client.post("/v1/api-keys", headers=headers, content=content), 422, "validation_error"
        )
        assert body["errors"] == [{"loc": ["body"], "msg": "the body is not valid UTF-8 JSON", "type": "json_invalid"}]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/api-keys", "GET, POST"),  # two routes share the path: once `Allow: POST` only
        ("DELETE", "/v1/api-keys", "GET, POST"),
        ("PUT", "/healthz", "GET"),
        ("OPTIONS", "/v1/affiliations/check", "GET"),  # the check, not an affiliation called "check"
        ("DELETE", "/v1/affiliations/aff_x", "GET, PATCH"),
    ],
)
async def test_a_405_allows_every_method_of_the_path(
    client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path)
    body = assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed
    assert body["detail"] == f"{method} is not allowed here; allowed: {allowed}"
