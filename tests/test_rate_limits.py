"""Per-key rate limits (app/ratelimit.py): the buckets on a fake clock, their settings, and `429 rate_limited`
through the real app, answered before any database or ledger work."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import cli, migrate
from app.apikeys import Caller, Role
from app.main import create_app
from app.ratelimit import NS_PER_S, RateLimited, RateLimiter, TokenBucket
from app.settings import RATE_BUCKETS, RATE_LIMITS_DEFAULT, RATE_ROLES, RateRule, Settings, get_settings
from tests.test_redemptions import compute_lines, compute_voucher, token_for
from tests.test_support import assert_problem, bearer, create_key, running_app

START_NS = 1_000 * NS_PER_S


class FakeClock:
    """Monotonic nanoseconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now_ns = START_NS

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += round(seconds * NS_PER_S)


def rule(rate_per_s: float, burst: int) -> RateRule:
    return RateRule(rate_per_s=rate_per_s, burst=burst)


def caller(role: Role = Role.PROVIDER, key_id: str = "key_a") -> Caller:
    return Caller(key_id=key_id, role=role, entity_id=None, voucher_types=None)


def taken(bucket: TokenBucket, key: str, now_ns: int, times: int) -> int:
    """How many of `times` requests at `now_ns` get a token."""
    return sum(bucket.take(key, now_ns) == 0 for _ in range(times))


# --------------------------------------------------------------------------------------------------------
# the buckets, on a fake clock


def test_the_defaults_let_one_provider_key_burst_5000_redemptions_and_sustain_10000_a_second() -> None:
    default = RATE_LIMITS_DEFAULT["provider"]["redemption"]
    assert default.rate_per_s >= 5_000 and default.burst >= 5_000
    bucket = TokenBucket(default)
    # 5,000 redemptions within 50 ms: every one through
    assert all(bucket.take("provider", START_NS + i * 10_000) == 0 for i in range(5_000))
    # a fresh key: its whole burst at one instant, exactly, and not one more
    assert taken(bucket, "other", START_NS, 10_000) == 10_000
    assert bucket.take("other", START_NS) == default_interval_ns(default)
    # sustained: 10,000 a second for three seconds after the burst, never refused
    assert all(bucket.take("other", START_NS + (i + 1) * 100_000) == 0 for i in range(30_000))
    # two workers each enforce half, so the service as a whole still lets the key have 10,000 at once
    halves = [TokenBucket(default, workers=2) for _ in range(2)]
    assert [taken(half, "provider", START_NS, 6_000) for half in halves] == [5_000, 5_000]


def default_interval_ns(rule: RateRule) -> int:
    return round(NS_PER_S / rule.rate_per_s)


def test_a_key_over_its_rate_waits_for_the_refill() -> None:
    bucket = TokenBucket(rule(rate_per_s=2, burst=3))
    assert taken(bucket, "a", START_NS, 3) == 3
    assert bucket.take("a", START_NS) == NS_PER_S // 2  # one token comes back every half second
    assert bucket.take("a", START_NS + NS_PER_S // 4) == NS_PER_S // 4
    assert bucket.take("b", START_NS) == 0  # another key has its own bucket
    assert bucket.take("a", START_NS + NS_PER_S // 2) == 0
    assert bucket.take("a", START_NS + NS_PER_S // 2) > 0
    # idle for long enough, the bucket is full again, never fuller
    later = START_NS + 60 * NS_PER_S
    assert taken(bucket, "a", later, 10) == 3


def test_each_worker_enforces_its_share_and_always_at_least_one_request() -> None:
    assert taken(TokenBucket(rule(rate_per_s=10, burst=10), workers=4), "k", START_NS, 20) == 2  # 2.5 a worker
    share = TokenBucket(rule(rate_per_s=1, burst=1), workers=4)
    assert taken(share, "k", START_NS, 5) == 1
    assert share.take("k", START_NS) == 4 * NS_PER_S  # the worker's quarter of one a second
    slow = TokenBucket(rule(rate_per_s=0.1, burst=5), workers=8)
    assert taken(slow, "k", START_NS, 3) == 1


def test_idle_keys_are_forgotten_and_the_table_is_bounded() -> None:
    bucket = TokenBucket(rule(rate_per_s=10, burst=10))
    for i in range(100):
        assert bucket.take(f"idle-{i}", START_NS) == 0
    assert len(bucket) == 100
    # a key still refilling is kept: its bucket would be fuller than it is if it came back
    assert taken(bucket, "drained", START_NS, 10) == 10
    assert len(bucket) == 101
    # 0.5 s later the idle keys' buckets are full again (10 a second, burst 10: 1 s from empty, 0.1 s
    # from one token taken); each request forgets up to two of the oldest
    now = START_NS + NS_PER_S // 2
    for _ in range(50):
        bucket.take("active", now)
    assert len(bucket) == 2  # "drained" (full again only at +1 s) and "active"
    assert bucket.take("idle-0", now) == 0  # a forgotten key comes back with a full bucket, as it would have
    assert taken(bucket, "drained", now, 10) == 5  # a kept one remembers it was drained
    later = now + 5 * NS_PER_S
    for _ in range(3):
        bucket.take("active", later)
    assert len(bucket) == 1

    capped = TokenBucket(rule(rate_per_s=1, burst=5), keys_max=10)
    for i in range(25):
        capped.take(f"k{i}", START_NS)
    assert len(capped) == 10


def test_the_limiter_raises_429_with_a_whole_second_retry_after_and_counts_it() -> None:
    clock = FakeClock()
    rules = {role: {"redemption": rule(1_000, 2), "export": rule(1 / 30, 1)} for role in RATE_ROLES}
    limiter = RateLimiter(rules, clock=clock)
    counted = REGISTRY.get_sample_value("vl_rate_limited_total", {"bucket": "export", "role": "auditor"}) or 0
    limiter.check(caller(Role.AUDITOR), "export")
    with pytest.raises(RateLimited) as refused:
        limiter.check(caller(Role.AUDITOR), "export")
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    assert refused.value.headers == {"Retry-After": "30"}
    clock.advance(29.5)
    with pytest.raises(RateLimited) as refused:
        limiter.check(caller(Role.AUDITOR), "export")
    assert refused.value.headers == {"Retry-After": "1"}  # half a second, rounded up to a whole one
    assert REGISTRY.get_sample_value("vl_rate_limited_total", {"bucket": "export", "role": "auditor"}) == counted + 2
    limiter.check(caller(Role.AUDITOR, key_id="key_b"), "export")  # another key
    limiter.check(caller(Role.AUDITOR), "redemption")  # another bucket
    clock.advance(0.5)
    limiter.check(caller(Role.AUDITOR), "export")
    # a tiny wait still says one second: Retry-After: 0 would invite an immediate retry
    limiter.check(caller(Role.PROVIDER), "redemption")
    limiter.check(caller(Role.PROVIDER), "redemption")
    with pytest.raises(RateLimited) as refused:
        limiter.check(caller(Role.PROVIDER), "redemption")
    assert refused.value.headers == {"Retry-After": "1"}


# --------------------------------------------------------------------------------------------------------
# settings


def test_the_roles_are_the_api_key_roles() -> None:
    assert set(RATE_ROLES) == {role.value for role in Role}
    assert set(RATE_LIMITS_DEFAULT) == set(RATE_ROLES)
    assert all(set(buckets) == set(RATE_BUCKETS) for buckets in RATE_LIMITS_DEFAULT.values())


def test_rate_limits_come_from_the_environment_over_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().rate_limits == RATE_LIMITS_DEFAULT
    monkeypatch.setenv("VL_RATE_LIMITS", '{"provider": {"redemption": {"rate_per_s": 20000, "burst": 500}}}')
    monkeypatch.setenv("VL_WORKERS", "4")
    settings = Settings()
    assert settings.rate_limits["provider"]["redemption"] == rule(20_000, 500)
    assert settings.rate_limits["provider"]["export"] == RATE_LIMITS_DEFAULT["provider"]["export"]
    assert settings.rate_limits["admin"] == RATE_LIMITS_DEFAULT["admin"]
    assert settings.workers == 4
    limiter = RateLimiter.from_settings(settings, clock=FakeClock())
    assert limiter.buckets[("provider", "redemption")].interval_ns == 200_000  # 20,000/s over 4 workers


@pytest.mark.parametrize(
    "value",
    [
        '{"provider": {"redemption": {"rate_per_s": -1, "burst": 10}}}',
        '{"provider": {"redemption": {"rate_per_s": 0, "burst": 10}}}',
        '{"provider": {"redemption": {"rate_per_s": 10, "burst": 0}}}',
        '{"provider": {"redemption": {"rate_per_s": 10, "burst": 1.5}}}',
        '{"provider": {"redemption": {"rate_per_s": "fast", "burst": 10}}}',
        '{"provider": {"redemption": {"rate_per_s": 10}}}',
        '{"provider": {"redemption": {"rate_per_s": 10, "burst": 10, "per": "minute"}}}',
        '{"provider": {"refund": {"rate_per_s": 10, "burst": 10}}}',
        '{"root": {"export": {"rate_per_s": 10, "burst": 10}}}',
        '{"provider": {"redemption": {"rate_per_s": 1e300, "burst": 10}}}',
        '{"provider": []}',
        "[]",
        "10000",
        "not json",
    ],
)
def test_nonsense_rate_limits_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VL_RATE_LIMITS", value)
    with pytest.raises((ValidationError, SettingsError), match="rate_limits"):  # the latter: not JSON at all
        Settings()


@pytest.mark.parametrize("workers", ["0", "-2", "257", "two"])
def test_nonsense_worker_counts_are_refused(monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    monkeypatch.setenv("VL_WORKERS", workers)
    with pytest.raises(ValidationError, match="workers"):
        Settings()


def test_the_command_line_names_a_bad_rate_limit_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for value, complaint in (
        ('{"provider": {"redemption": {"rate_per_s": -5, "burst": 1}}}', "setting rate_limits.provider.redemption"),
        ("{not json", 'error parsing value for field "rate_limits"'),
    ):
        monkeypatch.setenv("VL_RATE_LIMITS", value)
        get_settings.cache_clear()
        try:
            assert cli.main(["migrate"]) == 2
        finally:
            get_settings.cache_clear()
        assert complaint in capsys.readouterr().err


def test_serve_tells_its_workers_how_many_share_each_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def run(*_args: Any, **kwargs: Any) -> None:
        seen.update(uvicorn_workers=kwargs["workers"], setting=get_settings().workers)

    monkeypatch.setattr(migrate, "upgrade", lambda _url: None)
    monkeypatch.setattr(uvicorn, "run", run)
    # both set here so that they are restored afterwards: serve sets them for its workers
    monkeypatch.setenv("VL_WORKERS", "1")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    settings = Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:9/none")
    try:
        assert cli._serve(cli.build_parser().parse_args(["serve", "--workers", "3"]), settings) == 0
    finally:
        get_settings.cache_clear()
    assert seen == {"uvicorn_workers": 3, "setting": 3}


# --------------------------------------------------------------------------------------------------------
# through the real app


@contextmanager
def database_work(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements run and connections checked out on `engine` while the block runs."""
    seen: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        seen.append(sql)

    def checkout(*_args: Any) -> None:
        seen.append("checkout")

    event.listen(engine.sync_engine, "before_cursor_execute", statement)
    event.listen(engine.sync_engine, "checkout", checkout)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", statement)
        event.remove(engine.sync_engine, "checkout", checkout)


def limited(settings: Settings, **rules: dict[str, RateRule]) -> Settings:
    """`settings` with these roles' rules over the defaults, and keys cached as in production (a warm key
    is authenticated from memory, so a refused request touches no database)."""
    limits = {role: {**settings.rate_limits[role], **rules.get(role, {})} for role in RATE_ROLES}
    return settings.model_copy(update={"rate_limits": limits, "api_key_cache_ttl_s": 60.0})


@contextmanager
def nothing_reaches_the_database(app: FastAPI) -> Iterator[None]:
    with database_work(app.state.engine) as seen:
        yield
    assert seen == [], seen


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_an_export_over_the_key_rate_is_429_before_anything_is_read(
    settings: Settings, engine: AsyncEngine, clock: FakeClock
) -> None:
    settings = limited(
        settings,
        auditor={"export": rule(rate_per_s=1 / 60, burst=2)},
        admin={"export": rule(rate_per_s=1 / 60, burst=1)},
    )
    app = create_app(settings)
    app.state.rate_limiter = RateLimiter.from_settings(settings, clock=clock)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    other_auditor = bearer(await create_key(engine, Role.AUDITOR))
    admin = bearer(await create_key(engine, Role.ADMIN))
    path = "/v1/exports/journal"
    async with running_app(settings, app) as client:
        for _ in range(2):
            assert (await client.get(path, params={"format": "csv"}, headers=auditor)).status_code == 200
        with nothing_reaches_the_database(app):
            refused = await client.get(path, params={"format": "jsonl"}, headers=auditor)
        body = assert_problem(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "60"
        assert "content-disposition" not in refused.headers  # nothing was streamed
        assert body["bucket"] == "export" and body["retry_after_s"] == 60
        # a bad range from a key over its rate is still 429: the limit comes before anything else
        assert_problem(await client.get(path, params={"format": "xml"}, headers=auditor), 429, "rate_limited")
        # another key of the same role is not affected; the admin role has its own, smaller, allowance
        assert (await client.get(path, headers=other_auditor)).status_code == 200
        assert (await client.get(path, headers=admin)).status_code == 200
        assert_problem(await client.get(path, headers=admin), 429, "rate_limited")
        # a token back after a minute: one export, not two
        clock.advance(59.9)
        assert_problem(await client.get(path, headers=auditor), 429, "rate_limited")
        clock.advance(0.1)
        assert (await client.get(path, params={"format": "csv"}, headers=auditor)).status_code == 200
        assert_problem(await client.get(path, headers=auditor), 429, "rate_limited")
        # without a key it is 401, never a 429 (the limit is per key)
        assert_problem(await client.get(path), 401, "unauthorized")


async def test_the_default_export_allowance_is_a_burst_of_five(settings: Settings, engine: AsyncEngine) -> None:
    settings = limited(settings)
    auditor = bearer(await create_key(engine, Role.AUDITOR))
    async with running_app(settings) as client:
        for _ in range(RATE_LIMITS_DEFAULT["auditor"]["export"].burst):
            response = await client.get("/v1/exports/journal", params={"format": "csv"}, headers=auditor)
            assert response.status_code == 200, response.text
        refused = await client.get("/v1/exports/journal", params={"format": "csv"}, headers=auditor)
        assert_problem(refused, 429, "rate_limited")
        assert math.isclose(int(refused.headers["retry-after"]), 10, abs_tol=1)


async def _journal_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM ledger_entry")) or 0)


# Wired by whoever owns app/routers/redemptions.py: `dependencies=[RedemptionRate]` on POST /v1/redemptions,
# POST /v1/holds and POST /v1/holds/{hold_id}/capture. Remove this marker with that change.
async def test_redemptions_holds_and_captures_over_the_key_rate_are_429_and_post_nothing(
    settings: Settings, engine: AsyncEngine, clock: FakeClock
) -> None:
    settings = limited(settings, provider={"redemption": rule(rate_per_s=1, burst=3)})
    app = create_app(settings)
    app.state.rate_limiter = RateLimiter.from_settings(settings, clock=clock)
    async with running_app(settings, app) as client:
        admin = bearer(await create_key(engine, Role.ADMIN))
        voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
        provider = bearer(await create_key(engine, Role.PROVIDER))
        other = bearer(await create_key(engine, Role.PROVIDER))
        token = await token_for(client, admin, voucher)

        def redemption(invoice_no: str) -> dict[str, Any]:
            return {"token": token, "invoice_no": invoice_no, "lines": compute_lines(100)}

        async def redeem(key: dict[str, str], idempotency_key: str, invoice_no: str) -> httpx.Response:
            headers = {**key, "Idempotency-Key": idempotency_key}
            return await client.post("/v1/redemptions", headers=headers, json=redemption(invoice_no))

        assert (await redeem(provider, "r1", "INV-1")).status_code == 201
        held = await client.post(
            "/v1/holds", headers={**provider, "Idempotency-Key": "h1"}, json={"token": token, "amount_fen": 5_000}
        )
        assert held.status_code == 201, held.text
        assert (await redeem(provider, "r2", "INV-2")).status_code == 201  # the burst of three is spent
        entries = await _journal_count(engine)
        balance = (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json()

        capture = f"/v1/holds/{held.json()['id']}/capture"
        with nothing_reaches_the_database(app):
            refused = [
                await redeem(provider, "r3", "INV-3"),
                await client.post(
                    "/v1/holds", headers={**provider, "Idempotency-Key": "h2"}, json={"token": token, "amount_fen": 1}
                ),
                await client.post(
                    capture,
                    headers={**provider, "Idempotency-Key": "c1"},
                    json={"invoice_no": "INV-H", "lines": compute_lines(10)},
                ),
            ]
        for response in refused:
            assert_problem(response, 429, "rate_limited")
            assert response.headers["retry-after"] == "1"
        assert await _journal_count(engine) == entries
        assert (await client.get(f"/v1/vouchers/{voucher}", headers=admin)).json() == balance
        assert (await redeem(other, "r3", "INV-O")).status_code == 201  # another provider key is not affected

        # the 429 was not stored as the idempotent answer: the same key succeeds once a token is back
        clock.advance(1)
        assert (await redeem(provider, "r3", "INV-3")).status_code == 201
        assert_problem(await redeem(provider, "r4", "INV-4"), 429, "rate_limited")
        clock.advance(1)
        captured = await client.post(
            capture,
            headers={**provider, "Idempotency-Key": "c1"},
            json={"invoice_no": "INV-H", "lines": compute_lines(10)},
        )
        assert captured.status_code == 201, captured.text


async def test_refused_requests_are_counted_in_the_metrics(
    settings: Settings, engine: AsyncEngine, clock: FakeClock
) -> None:
    settings = limited(settings, admin={"export": rule(rate_per_s=0.01, burst=1)})
    app = create_app(settings)
    app.state.rate_limiter = RateLimiter.from_settings(settings, clock=clock)
    admin = bearer(await create_key(engine, Role.ADMIN))
    async with running_app(settings, app) as client:
        before = REGISTRY.get_sample_value("vl_rate_limited_total", {"bucket": "export", "role": "admin"}) or 0.0
        assert (await client.get("/v1/exports/journal", params={"format": "csv"}, headers=admin)).status_code == 200
        assert_problem(await client.get("/v1/exports/journal", headers=admin), 429, "rate_limited")
        exposition = (await client.get("/metrics")).text
        assert f'vl_rate_limited_total{{bucket="export",role="admin"}} {before + 1}' in exposition
        assert 'vl_http_requests_total{method="GET",route="/v1/exports/journal",status="429"}' in exposition


# --------------------------------------------------------------------------------------------------------
# what protects the service when one provider key stays within its (contractual) rate


async def _until(check: Callable[[], bool], what: str, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert time.monotonic() < deadline, f"not within {wait_s:g} s: {what}"
        await asyncio.sleep(0.01)


async def test_a_worker_queues_a_bounded_number_of_redemptions_and_answers_503_beyond(
    settings: Settings, engine: AsyncEngine
) -> None:
    """One key within its 10,000/s can still send more than the database does (about 1,700/s on these
    machines): past `VL_REDEEM_QUEUE_MAX` waiting redemptions a worker answers 503 at once, instead of
    queueing without end while every caller's latency grows; nothing of the refused request is kept."""
    settings = limited(settings).model_copy(
        update={"redeem_batches_in_flight": 1, "redeem_batch_max": 1, "redeem_queue_max": 2}
    )
    app = create_app(settings)
    async with running_app(settings, app) as client:
        admin = bearer(await create_key(engine, Role.ADMIN))
        voucher, _holder = await compute_voucher(client, admin, engine, 1_000_000)
        provider = bearer(await create_key(engine, Role.PROVIDER))
        token = await token_for(client, admin, voucher)

        async def redeem(n: int) -> httpx.Response:
            body = {"token": token, "invoice_no": f"Q-{n}", "lines": compute_lines(100)}
            return await client.post("/v1/redemptions", headers={**provider, "Idempotency-Key": f"q{n}"}, json=body)

        assert (await redeem(0)).status_code == 201  # the key and the token are warm
        batcher = app.state.redeem_batcher
        async with engine.connect() as blocker:
            # the voucher's account locked: the batch out waits on it, so the calls after it queue
            await blocker.execute(
                text("SELECT 1 FROM ledger_account WHERE code = :code FOR UPDATE"), {"code": f"voucher:{voucher}"}
            )
            first = asyncio.create_task(redeem(1))
            await _until(lambda: batcher._in_flight == 1 and not batcher._pending, "the first redemption is out")
            queued = [asyncio.create_task(redeem(n)) for n in (2, 3)]
            await _until(lambda: len(batcher._pending) == 2, "two redemptions wait")
            refused = await asyncio.wait_for(redeem(4), 10)
            assert_problem(refused, 503, "service_unavailable")
            assert refused.headers["retry-after"] == "1"
            await blocker.rollback()
        assert [r.status_code for r in await asyncio.gather(first, *queued)] == [201, 201, 201]
        assert (await redeem(4)).status_code == 201  # the same key again: the 503 was not its answer


def test_the_redemption_queue_bound_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().redeem_queue_max == 256
    monkeypatch.setenv("VL_REDEEM_QUEUE_MAX", "1000")
    assert Settings().redeem_queue_max == 1000
    for nonsense in ("0", "-1", "many"):
        monkeypatch.setenv("VL_REDEEM_QUEUE_MAX", nonsense)
        with pytest.raises(ValidationError, match="redeem_queue_max"):
            Settings()
