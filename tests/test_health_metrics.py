"""Liveness, readiness, Prometheus metrics, pagination cursors."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from conftest import create_database, drop_database
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import errors, migrate
from app.db import make_engine
from app.errors import ValidationFailed
from app.main import create_app
from app.pagination import Cursor, split_page
from app.settings import Settings
from tests.test_support import assert_problem, bearer, create_key, running_app


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as client:
        yield client


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_at_head(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_is_503_when_the_schema_is_behind(server_url: str) -> None:
    url = await create_database(server_url)
    try:
        await asyncio.to_thread(migrate.upgrade, url, "0001")
        async with running_app(Settings(database_url=url, background_tasks=False)) as client:
            response = await client.get("/readyz")
        body = assert_problem(response, 503, "not_ready")
        assert response.headers["retry-after"] == "1"
        assert "0001" in body["detail"]
    finally:
        await drop_database(server_url, url)


async def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", background_tasks=False)
    async with running_app(settings) as client:
        response = await client.get("/readyz")
    assert_problem(response, 503, "not_ready")
    assert (await asyncio.wait_for(_healthz(settings), 5)).status_code == 200  # liveness needs no database


async def test_readyz_logs_an_unreachable_database_once_per_interval_not_per_probe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer probes /readyz every second or so: while the database is away that is one warning line
    per interval, counting the probes since the last (README, Faults), as for any other request's 503."""
    monkeypatch.setattr(errors, "_unavailable_log", errors._UnavailableLog(errors.UNAVAILABLE_LOG_INTERVAL_S))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", background_tasks=False)
    async with running_app(settings) as client:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for _ in range(20):
                assert_problem(await client.get("/readyz"), 503, "not_ready")
            first = [record for record in caplog.records if record.name != "httpx"]
            caplog.clear()
            errors._unavailable_log._next_at = 0.0  # the interval has passed
            assert_problem(await client.get("/readyz"), 503, "not_ready")
            second = [record for record in caplog.records if record.name != "httpx"]
    assert len(first) == 1 and first[0].levelno == logging.WARNING, [r.getMessage() for r in first]
    assert "GET /readyz" in first[0].getMessage() and "ConnectionRefusedError" in first[0].getMessage()
    assert len(second) == 1 and "19 more" in second[0].getMessage(), [r.getMessage() for r in second]


async def _healthz(settings: Settings) -> httpx.Response:
    async with running_app(settings) as client:
        return await client.get("/healthz")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_readyz_gives_up_on_a_database_that_does_not_answer(silent_server: int) -> None:
    settings = Settings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{silent_server}/x", background_tasks=False
    )
    async with running_app(settings) as client:
        started = asyncio.get_running_loop().time()
        response = await client.get("/readyz")
        elapsed = asyncio.get_running_loop().time() - started
    assert_problem(response, 503, "not_ready")
    assert 1.5 < elapsed < 5


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            found = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = bearer(await create_key(engine))
    before = (await client.get("/metrics")).text
    await client.get("/healthz")
    await client.delete("/v1/api-keys/key_missing", headers=admin)
    await client.get("/no/such/route/abc123")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("vl_http_requests_total", method="GET", route="/healthz", status="200") == 1
    assert delta("vl_http_requests_total", method="DELETE", route="/v1/api-keys/{id}", status="404") == 1
    assert delta("vl_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("vl_http_request_duration_seconds_count", method="GET", route="/healthz") == 1
    assert "abc123" not in after and "key_missing" not in after


def test_cursor_round_trip_and_rejects() -> None:
    cursor: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
    key = (datetime(2026, 11, 28, 13, 15, 0, 123456, tzinfo=UTC), "key_abc")
    encoded = cursor.encode(key)
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    assert cursor.decode(encoded) == key
    for bad in ["", "!!!!", "e30", encoded[:-3], "eyJ4IjogMX0", "a" * 5]:
        with pytest.raises(ValidationFailed):
            cursor.decode(bad)


def test_split_page() -> None:
    assert split_page([1, 2, 3], 3, str) == ([1, 2, 3], None)
    assert split_page([1, 2, 3, 4], 3, str) == ([1, 2, 3], "3")
    assert split_page([], 3, str) == ([], None)


async def test_openapi_describes_the_routes_and_the_problems(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert {"/healthz", "/readyz", "/metrics", "/v1/api-keys", "/v1/api-keys/{id}"} <= set(schema["paths"])
    delete = schema["paths"]["/v1/api-keys/{id}"]["delete"]
    assert {"200", "401", "403", "404"} <= set(delete["responses"])
    assert "application/problem+json" in delete["responses"]["404"]["content"]
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert (await client.get("/docs")).status_code == 200


async def test_lifespan_runs_and_stops_the_background_tasks(server_url: str) -> None:
    # a database of its own: the sealer must not seal what other tests are watching
    url = await create_database(server_url)
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        settings = Settings(database_url=url, background_tasks=True, sealer_interval_s=0.05)
        async with running_app(settings) as client:
            await asyncio.sleep(0.2)
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await drop_database(server_url, url)


async def test_readyz_is_ready_at_once_after_the_server_drops_the_pooled_connection(settings: Settings) -> None:
    one = settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0})  # the probe's is the only one
    app = create_app(one)
    async with running_app(one, app) as client:
        assert (await client.get("/readyz")).status_code == 200
        engine: AsyncEngine = app.state.engine
        async with engine.connect() as conn:
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            driver = (await conn.get_raw_connection()).driver_connection
        assert one.database_url is not None
        other = make_engine(one.database_url, one)
        try:
            async with other.connect() as conn:
                assert await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await other.dispose()
        for _ in range(500):  # asyncpg reads the socket's end while the connection sits in the pool
            if driver is not None and driver.is_closed():
                break
            await asyncio.sleep(0.01)
        response = await client.get("/readyz")  # the first probe after the drop: no failure to wait out
        assert response.status_code == 200, response.text
