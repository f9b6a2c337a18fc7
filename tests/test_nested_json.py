"""A body nested too deep is `422 validation_error` on every route, the redemption fast path included, and
at most one log line: never a 500 with a traceback of thousands of lines, never an undocumented 400
(issue 12, section 4)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from app.apikeys import Role
from app.json_depth import DEPTH_MAX, nesting_exceeds
from app.main import create_app
from app.schemas import _has_nul
from app.settings import Settings
from tests.test_fastpath import answered, assert_same, both_apps, cached, post, seeded, warm
from tests.test_support import assert_problem, bearer, create_entity, create_key, running_app

DEPTHS = (400, 960, 5000, 100_000)


def nested(depth: int, shape: str) -> bytes:
    """A JSON value of `depth` arrays or objects inside one another."""
    if shape == "arrays":
        return b"[" * depth + b"]" * depth
    return b'{"a": ' * depth + b"1" + b"}" * depth


def with_value(template: str, value: bytes) -> bytes:
    return template.encode().replace(b'"@VALUE@"', value)


def server_log_lines(caplog: pytest.LogCaptureFixture) -> int:
    """Lines the app logged (its stack traces included); the test client's own request lines left out."""
    records = [record for record in caplog.records if record.name != "httpx"]
    return sum(len(caplog.handler.format(record).splitlines()) for record in records)


def assert_too_deep(response: httpx.Response) -> None:
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"] == [{"loc": ["body"], "msg": body["detail"], "type": "json_too_deep"}]


async def test_a_deep_redemption_is_422_and_no_log_on_the_fast_path_and_the_route(
    settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with both_apps(cached(settings)) as apps:
        provider, token, admin = await seeded(apps.fast, engine)
        keys = {
            Role.PROVIDER: provider,
            Role.ADMIN: admin,
            Role.ENTERPRISE: await create_key(engine, Role.ENTERPRISE),
            Role.AUDITOR: await create_key(engine, Role.AUDITOR),
        }
        await warm((apps.fast, apps.plain), provider)
        template = json.dumps(
            {
                "token": token,
                "invoice_no": "INV-DEEP",
                "lines": [{"category": "compute", "amount_fen": 10_000, "description": "@VALUE@"}],
            }
        )
        sent = 0
        with caplog.at_level(logging.DEBUG), answered(0):
            for depth in DEPTHS:
                for shape in ("arrays", "objects"):
                    body = with_value(template, nested(depth, shape))
                    for role, key in keys.items():
                        fast = await post(apps.fast, key, f"deep-{depth}-{shape}-{role}", body)
                        plain = await post(apps.plain, key, f"deep-{depth}-{shape}-{role}", body)
                        assert_too_deep(fast)
                        assert_same(fast, plain)
                        sent += 2
        assert server_log_lines(caplog) <= sent
        # and nothing was redeemed: the same key and an ordinary body redeem for the first time
        ordinary = with_value(template, b'"gpu hours"')
        assert (await post(apps.fast, provider, "after-deep", ordinary)).status_code == 201


@pytest.mark.parametrize("shape", ["arrays", "objects"])
async def test_a_deep_body_is_422_on_every_kind_of_route_for_every_role(
    settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    entity = await create_entity(engine)
    keys = {role: await create_key(engine, role) for role in Role}
    routes = [
        ("POST", "/v1/entities", '{"uscc": "91440101MA5CYW2Y0X", "name": "@VALUE@", "kind": "enterprise"}'),
        (
            "POST",
            "/v1/applications",
            json.dumps(
                {"program": "data.trusted_space", "applicant_entity_id": entity, "year": 2027, "basis": "@VALUE@"}
            ),
        ),
        ("PATCH", f"/v1/entities/{entity}", '{"name": "@VALUE@"}'),
        # reads its body itself (app/routers/affiliations.py), once the caller is known to be an admin
        ("POST", "/v1/affiliations", '{"kind": "@VALUE@"}'),
        ("POST", "/v1/holds", '{"token": "@VALUE@", "amount_fen": 1}'),
        ("POST", "/v1/api-keys", '{"role": "auditor", "name": "@VALUE@"}'),
    ]
    sent = 0
    async with running_app(settings) as client:
        with caplog.at_level(logging.DEBUG):
            for depth in DEPTHS:
                for method, path, template in routes:
                    for role, key in keys.items():
                        response = await client.request(
                            method,
                            path,
                            headers={**bearer(key), "Content-Type": "application/json", "Idempotency-Key": "k"},
                            content=with_value(template, nested(depth, shape)),
                        )
                        if path == "/v1/affiliations" and role is not Role.ADMIN:
                            assert_problem(response, 403, "forbidden")
                        else:
                            assert_too_deep(response)
                        sent += 1
    assert server_log_lines(caplog) <= sent


async def test_a_body_nested_as_deep_as_allowed_is_parsed_as_usual(settings: Settings, engine: AsyncEngine) -> None:
    """At the bound the route's own validation answers (a string was expected), not the depth check."""
    admin = bearer(await create_key(engine))
    async with running_app(settings) as client:
        body = b'{"role": "auditor", "name": ' + nested(DEPTH_MAX - 1, "arrays") + b"}"
        response = await client.post(
            "/v1/api-keys", headers={**admin, "Content-Type": "application/json"}, content=body
        )
        problem = assert_problem(response, 422, "validation_error")
        assert problem["errors"][0]["loc"] == ["body", "name"]


async def test_a_recursion_error_anywhere_is_a_500_and_one_log_line(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    def down(n: int) -> int:
        return down(n + 1) + 1

    @app.get("/test-only/recurse")
    async def recurse() -> None:
        down(0)

    async with running_app(settings, app) as client:
        with caplog.at_level(logging.DEBUG):
            response = await client.get("/test-only/recurse")
    assert_problem(response, 500, "internal_error")
    assert server_log_lines(caplog) == 1
    (record,) = [record for record in caplog.records if record.name != "httpx"]
    assert "RecursionError" in record.getMessage() and "down" in record.getMessage()


# --------------------------------------------------------------------------------------------------------
# The scan itself, against the depth of what json.loads makes of the same text

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n', max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text('[]{}"\\x', max_size=4), children, max_size=4)
    ),
    max_leaves=60,
)


def depth_of(value: Any) -> int:
    best = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, list | dict):
            best = max(best, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return best


@hypothesis_settings(max_examples=300, deadline=None)
@given(value=json_values, depth_max=st.integers(min_value=0, max_value=8), ascii_only=st.booleans())
def test_the_scan_finds_the_depth_json_loads_finds(value: Any, depth_max: int, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_exceeds(text, depth_max) == (depth_of(value) > depth_max)


@pytest.mark.parametrize(
    ("body", "exceeds"),
    [
        (b"[" * 33, True),  # unclosed: what a parser would enter all the same
        (b"[" * 32 + b"]" * 32, False),
        (b"[" * 33 + b"]" * 33, True),
        (b"[" + b"[]," * 10_000 + b"[]]", False),  # wide, not deep
        (b'["' + b"[" * 10_000 + b'"]', False),  # brackets in a string
        (b'["\\"' + b"[" * 10_000 + b'"]', False),  # after an escaped quote, still in the string
        (b'"' + b"[" * 10_000, False),  # an unterminated string runs to the end
        (b"[" * 10 + b'"\\' * 10_000, False),  # many unterminated strings: linear, not quadratic
    ],
)
def test_the_scan_on_edge_cases(body: bytes, exceeds: bool) -> None:
    assert nesting_exceeds(body, 32) is exceeds


def test_the_nul_check_walks_any_depth() -> None:
    deep: Any = "a\x00"
    clean: Any = "a"
    for _ in range(100_000):
        deep, clean = [deep], {"k": clean}
    assert _has_nul(deep) and not _has_nul(clean)
