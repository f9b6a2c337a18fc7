"""The fast path for `POST /v1/redemptions` (app/fastpath.py): the answers of the FastAPI route, byte for byte.

Each test runs the app as built (the fast path outermost) next to the same app without the fast path, on the
same database, and compares status, raw headers and body bytes; `RedemptionFastPath.answered` tells which
requests the fast path answered itself and which it handed to the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NamedTuple

import httpx
import pytest
from annotated_types import MaxLen, MinLen
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import fastpath
from app.apikeys import Role
from app.fastpath import RedemptionFastPath, is_json_type
from app.idempotency import KEY_LENGTH_MAX
from app.main import BODY_SIZE_MAX, create_app
from app.ratelimit import RateLimiter
from app.routers import redemptions
from app.settings import Settings
from tests.test_rate_limits import FakeClock, limited, nothing_reaches_the_database, rule
from tests.test_redemptions import compute_lines, compute_voucher, token_for
from tests.test_support import assert_problem, bearer, create_key, running_app

Clients = tuple[httpx.AsyncClient, httpx.AsyncClient]


class Apps(NamedTuple):
    fast: httpx.AsyncClient  # the app as built
    plain: httpx.AsyncClient  # the same app without the fast path
    fast_app: FastAPI
    plain_app: FastAPI


def cached(settings: Settings) -> Settings:
    """Keys cached as in production (the session's settings cache none, so nothing would take the fast path)."""
    return settings.model_copy(update={"api_key_cache_ttl_s": 60.0})


@asynccontextmanager
async def both_apps(settings: Settings, clock: FakeClock | None = None) -> AsyncIterator[Apps]:
    """Clients of the app as built and of the same app with `VL_REDEMPTION_FAST_PATH` off (the route answers
    everything)."""
    fast = create_app(settings)
    plain = create_app(settings.model_copy(update={"redemption_fast_path": False}))
    layers = [m.cls for m in fast.user_middleware]
    assert layers[0] is RedemptionFastPath and layers[1:] == [m.cls for m in plain.user_middleware]
    if clock is not None:
        for app in (fast, plain):
            app.state.rate_limiter = RateLimiter.from_settings(settings, clock=clock)
    async with running_app(settings, fast) as fast_client, running_app(settings, plain) as plain_client:
        yield Apps(fast_client, plain_client, fast, plain)
        await connections_back(fast, plain)


async def connections_back(*apps: FastAPI) -> None:
    """Wait until every connection is back in its pool. A redemption batch (RedeemBatcher) answers its callers
    before it gives its connection back, and the lifespan's end does not wait for it: an answer sent
    without FastAPI's machinery comes back soon enough for the engine to be disposed of first, leaving
    the connection unclosed."""
    for _ in range(500):
        if not any(app.state.engine.pool.checkedout() for app in apps):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a connection was not given back to its pool within 5 s")


@contextmanager
def answered(expected: int) -> Iterator[None]:
    """The fast path answers exactly `expected` of the requests sent in the block."""
    before = RedemptionFastPath.answered
    yield
    assert RedemptionFastPath.answered - before == expected


def assert_same(fast: httpx.Response, plain: httpx.Response) -> None:
    assert (fast.status_code, fast.headers.raw, fast.content) == (plain.status_code, plain.headers.raw, plain.content)


def redemption(token: str, invoice_no: str, amount_yuan: int = 100) -> dict[str, Any]:
    return {"token": token, "invoice_no": invoice_no, "lines": compute_lines(amount_yuan)}


async def post(
    client: httpx.AsyncClient, key: str, idempotency_key: str | None, body: Any, **headers: str
) -> httpx.Response:
    sent = {**bearer(key), **headers}
    if idempotency_key is not None:
        sent["Idempotency-Key"] = idempotency_key
    if isinstance(body, bytes):
        sent.setdefault("Content-Type", "application/json")
        return await client.post("/v1/redemptions", headers=sent, content=body)
    return await client.post("/v1/redemptions", headers=sent, json=body)


async def seeded(client: httpx.AsyncClient, engine: AsyncEngine) -> tuple[str, str, str]:
    """(provider key, voucher token, admin key): a compute voucher of 1,000,000 元 and a provider to redeem it."""
    admin = await create_key(engine, Role.ADMIN)
    voucher, _holder = await compute_voucher(client, bearer(admin), engine, 1_000_000)
    token = await token_for(client, bearer(admin), voucher)
    return await create_key(engine, Role.PROVIDER), token, admin


async def warm(clients: Clients, key: str) -> None:
    """A first request of `key` on each app, which caches it (the fast path hands it to the route)."""
    with answered(0):
        for client in clients:
            assert (await client.get("/v1/redemptions", headers=bearer(key))).status_code == 200


# --------------------------------------------------------------------------------------------------------


async def test_a_redemption_is_answered_by_the_fast_path_as_the_route_answers_it(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with both_apps(cached(settings)) as apps:
        fast, plain = apps.fast, apps.plain
        provider, token, _admin = await seeded(fast, engine)
        with answered(0):  # the key is not cached yet: the route answers, and caches it
            first = await post(fast, provider, "r0", redemption(token, "INV-0"))
        assert first.status_code == 201, first.text
        with answered(1):
            created = await post(fast, provider, "r1", redemption(token, "INV-1"))
        assert created.status_code == 201, created.text
        assert created.headers.raw == [
            (b"content-length", str(len(created.content)).encode()),
            (b"content-type", b"application/json"),
        ]
        answer = created.json()
        assert set(answer) == set(redemptions.RedemptionOut.model_fields)
        assert answer["id"].startswith("rdm_") and answer["invoice_no"] == "INV-1"
        assert answer["subsidy_fen"] == 100 * 100 and answer["hold_id"] is None
        with answered(1):
            again = await post(fast, provider, "r1", redemption(token, "INV-1"))
        assert again.json() == answer  # the first answer again, nothing new posted
        assert_same(again, await post(plain, provider, "r1", redemption(token, "INV-1")))

        # the route's own creation, replayed through the fast path: the same bytes either way
        by_route = await post(plain, provider, "r2", redemption(token, "INV-2"))
        assert by_route.status_code == 201, by_route.text
        assert [name for name, _ in by_route.headers.raw] == [name for name, _ in created.headers.raw]
        with answered(2):
            replayed = await post(fast, provider, "r2", redemption(token, "INV-2"))
            assert_same(replayed, await post(plain, provider, "r2", redemption(token, "INV-2")))
            assert replayed.json() == by_route.json()

            # a refusal (stored under its key), and a key reused for another body, answered as the route does
            refused = await post(fast, provider, "r3", redemption(token, "INV-1"))
        assert refused.status_code == 409, refused.text
        assert_same(refused, await post(plain, provider, "r4", redemption(token, "INV-1")))
        with answered(1):
            stored = await post(fast, provider, "r4", redemption(token, "INV-1"))
        assert stored.json() == refused.json()  # the stored refusal (as the database writes JSON)
        assert_same(stored, await post(plain, provider, "r4", redemption(token, "INV-1")))
        with answered(1):
            conflict = await post(fast, provider, "r1", redemption(token, "INV-other"))
        assert_problem(conflict, 422, "idempotency_conflict")
        assert_same(conflict, await post(plain, provider, "r1", redemption(token, "INV-other")))


async def test_what_the_fast_path_is_not_sure_about_gets_the_routes_own_answer(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with both_apps(cached(settings)) as apps:
        fast, plain = apps.fast, apps.plain
        provider, token, _admin = await seeded(fast, engine)
        enterprise = await create_key(engine, Role.ENTERPRISE)
        await warm((fast, plain), provider)
        await warm((fast, plain), enterprise)
        body = redemption(token, "INV-D")
        unknown = "vl_abcdefghijkl_" + "A" * 43
        nul = {**body, "lines": [{**body["lines"][0], "description": "a\u0000b"}]}
        too_large = b'{"token": "' + b"x" * BODY_SIZE_MAX + b'"}'

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found while reading
            for _ in range(3):
                yield b" " * (BODY_SIZE_MAX // 2)

        cases: list[tuple[str, dict[str, Any], int]] = [
            ("no key", {"key": "", "idempotency_key": "d1", "body": body}, 401),
            ("unknown key", {"key": unknown, "idempotency_key": "d1", "body": body}, 401),
            ("malformed key", {"key": "vl_nope", "idempotency_key": "d1", "body": body}, 401),
            ("another scheme", {"key": provider, "idempotency_key": "d1", "body": body, "scheme": "Basic"}, 401),
            ("enterprise key", {"key": enterprise, "idempotency_key": "d1", "body": body}, 403),
            ("no Idempotency-Key", {"key": provider, "idempotency_key": None, "body": body}, 422),
            ("empty Idempotency-Key", {"key": provider, "idempotency_key": "", "body": body}, 422),
            ("long Idempotency-Key", {"key": provider, "idempotency_key": "k" * 256, "body": body}, 422),
            ("not JSON", {"key": provider, "idempotency_key": "d1", "body": b'{"token": '}, 422),
            ("not UTF-8", {"key": provider, "idempotency_key": "d1", "body": b'{"token": "\xff"}'}, 422),
            ("unknown field", {"key": provider, "idempotency_key": "d1", "body": {**body, "x": 1}}, 422),
            ("a NUL", {"key": provider, "idempotency_key": "d1", "body": nul}, 422),
            ("text/plain", {"key": provider, "idempotency_key": "d1", "body": body, "type": "text/plain"}, 422),
            ("no content type", {"key": provider, "idempotency_key": "d1", "body": body, "type": ""}, 422),
            ("too large", {"key": provider, "idempotency_key": "d1", "body": too_large}, 413),
            ("too large, streamed", {"key": provider, "idempotency_key": "d1", "body": None}, 413),
        ]
        for name, case, status in cases:
            answers = []
            for client in (fast, plain):
                headers = {"Authorization": f"{case.get('scheme', 'Bearer')} {case['key']}"} if case["key"] else {}
                if case["idempotency_key"] is not None:
                    headers["Idempotency-Key"] = case["idempotency_key"]
                sent = case["body"]
                if isinstance(sent, dict):
                    sent = httpx.Request("POST", "/", json=sent).content
                headers["Content-Type"] = case.get("type", "application/json")
                if not headers["Content-Type"]:
                    del headers["Content-Type"]
                content = chunks() if sent is None else sent
                with answered(0):
                    answers.append(await client.post("/v1/redemptions", headers=headers, content=content))
            assert answers[0].status_code == status, (name, answers[0].text)
            assert_same(*answers)

        # not the route's path or method: not the fast path's either
        with answered(0):
            for client in (fast, plain):
                headers = {**bearer(provider), "Idempotency-Key": "d2"}
                assert (await client.post("/v1/redemptions/", headers=headers, json=body)).status_code != 201
                assert (await client.get("/v1/redemptions", headers=bearer(provider))).status_code == 200


async def test_json_content_types_and_a_body_in_pieces_take_the_fast_path(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with both_apps(cached(settings)) as apps:
        fast, plain = apps.fast, apps.plain
        provider, token, _admin = await seeded(fast, engine)
        await warm((fast, plain), provider)
        for n, content_type in enumerate(["application/json; charset=utf-8", "Application/JSON", "application/x+json"]):
            with answered(1):
                created = await post(
                    fast, provider, f"t{n}", redemption(token, f"INV-T{n}"), **{"Content-Type": content_type}
                )
            assert created.status_code == 201, created.text
            assert_same(created, await post(plain, provider, f"t{n}", redemption(token, f"INV-T{n}")))

        whole = httpx.Request("POST", "/", json=redemption(token, "INV-P")).content

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(whole), 7):
                yield whole[start : start + 7]

        with answered(1):
            created = await fast.post(
                "/v1/redemptions",
                headers={**bearer(provider), "Idempotency-Key": "p", "Content-Type": "application/json"},
                content=pieces(),
            )
        assert created.status_code == 201, created.text
        assert_same(created, await post(plain, provider, "p", whole))


async def test_the_fast_path_takes_from_the_keys_rate_and_answers_429_as_the_route_does(
    settings: Settings, engine: AsyncEngine
) -> None:
    clock = FakeClock()
    settings = limited(cached(settings), provider={"redemption": rule(rate_per_s=1, burst=2)})
    async with both_apps(settings, clock) as apps:
        provider, token, _admin = await seeded(apps.fast, engine)
        refused = []
        for client, app, answers in ((apps.fast, apps.fast_app, 1), (apps.plain, apps.plain_app, 0)):
            with answered(0):  # not cached yet: the route answers, and takes a token
                assert (await post(client, provider, "q0", redemption(token, "INV-Q0"))).status_code == 201
            clock.advance(1)  # the bucket full again: two tokens
            with answered(0):  # handed to the route, which takes a token, once
                assert_problem(await post(client, provider, None, redemption(token, "INV-Q")), 422, "validation_error")
            with answered(answers):
                assert (await post(client, provider, "q1", redemption(token, "INV-Q1"))).status_code == 201
            with answered(answers), nothing_reaches_the_database(app):
                refused.append(await post(client, provider, "q2", redemption(token, "INV-Q2")))
        body = assert_problem(refused[0], 429, "rate_limited")
        assert refused[0].headers["retry-after"] == "1" and body["bucket"] == "redemption"
        assert_same(*refused)
        clock.advance(1)
        with answered(1):  # the 429 was not stored as the key's answer
            assert (await post(apps.fast, provider, "q2", redemption(token, "INV-Q2"))).status_code == 201


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("a bug"), 500, "internal_error"),
        (ConnectionResetError("reset by peer"), 503, "service_unavailable"),
        (PoolTimeoutError("pool exhausted"), 503, "service_unavailable"),
    ],
)
async def test_an_error_in_the_work_is_answered_as_the_apps_handlers_answer_it(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, code: str
) -> None:
    async with both_apps(cached(settings)) as apps:
        fast, plain = apps.fast, apps.plain
        provider, token, _admin = await seeded(fast, engine)
        await warm((fast, plain), provider)

        async def failing(*_args: Any) -> tuple[int, str, bytes]:
            raise error

        monkeypatch.setattr(fastpath, "redemption_answer", failing)
        monkeypatch.setattr(redemptions, "redemption_answer", failing)
        with answered(1):
            failed = await post(fast, provider, "e1", redemption(token, "INV-E"))
        assert_problem(failed, status, code)
        assert ("retry-after" in failed.headers) == (status == 503)
        assert_same(failed, await post(plain, provider, "e1", redemption(token, "INV-E")))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_requests_it_answers_are_counted_as_the_routes_are(settings: Settings, engine: AsyncEngine) -> None:
    labels = {"method": "POST", "route": "/v1/redemptions"}
    async with both_apps(cached(settings)) as apps:
        fast, plain = apps.fast, apps.plain
        provider, token, _admin = await seeded(fast, engine)
        await warm((fast, plain), provider)
        for n, client in enumerate((fast, plain)):
            counted = _sample("vl_http_requests_total", status="201", **labels)
            timed = _sample("vl_http_request_duration_seconds_count", **labels)
            with answered(1 - n):
                assert (await post(client, provider, f"m{n}", redemption(token, f"INV-M{n}"))).status_code == 201
            assert _sample("vl_http_requests_total", status="201", **labels) == counted + 1
            assert _sample("vl_http_request_duration_seconds_count", **labels) == timed + 1


def test_it_checks_the_idempotency_key_and_the_content_type_as_the_route_does() -> None:
    header = redemptions.IdempotencyKey.__metadata__[0]
    assert header.alias == "Idempotency-Key"
    lengths = {type(m): m for m in header.metadata}
    assert (lengths[MinLen].min_length, lengths[MaxLen].max_length) == (1, KEY_LENGTH_MAX)
    for value, json_type in [
        (b"application/json", True),
        (b"application/problem+json; charset=utf-8", True),
        (b"APPLICATION/JSON ; charset=latin-1", True),
        (b"application/jsonx", False),
        (b"text/json", False),
        (b"multipart/form-data; boundary=x", False),
        (b"application", False),
    ]:
        assert is_json_type(value) is json_type, value
