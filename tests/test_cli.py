"""The `voucher-ledger` command, run as users run it: a subprocess of the installed entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
from conftest import create_database, drop_database
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import migrate
from app.settings import Settings
from tests.test_support import VOUCHER_LEDGER, bearer, create_entity, free_port, running_app, unique_entity

STARTUP_WAIT_S = 60  # an embedded server's first start runs initdb
STOP_WAIT_S = 30


def _env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("VL_") and name not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    env["VL_BACKGROUND_TASKS"] = "false"
    env.update(extra)
    return env


async def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [VOUCHER_LEDGER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


@asynccontextmanager
async def _serving(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`voucher-ledger serve ...` until the block ends; then SIGTERM, and it must stop cleanly, in time."""
    with _log_file(log) as output:
        process = await asyncio.create_subprocess_exec(
            VOUCHER_LEDGER, "serve", *args, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_WAIT_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                    raise
    assert process.returncode == 0, _text(log)


async def _wait_ready(process: asyncio.subprocess.Process, base_url: str, log: Path) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        for _ in range(STARTUP_WAIT_S * 5):
            assert process.returncode is None, _text(log)
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail(f"the server was not ready within {STARTUP_WAIT_S} s:\n{_text(log)}")


async def test_apikey_create_prints_a_working_key_last(db_url: str, settings: Settings, engine: AsyncEngine) -> None:
    result = await _run(
        "apikey",
        "create",
        "--role",
        "admin",
        "--types",
        "compute, data",
        "--name",
        "ops",
        env=_env(DATABASE_URL=db_url),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    key = lines[-1]
    assert key.startswith("vl_") and len(lines) > 1
    assert any(line.startswith("id: key_") for line in lines[:-1])
    assert key not in result.stderr
    async with running_app(settings) as client:
        response = await client.get("/v1/ledger/trial-balance", headers=bearer(key))
        assert response.status_code == 200, response.text
    async with engine.connect() as conn:
        query = text("SELECT voucher_types, name FROM api_key WHERE prefix = :p")
        stored = (await conn.execute(query, {"p": key.split("_")[1]})).one()
    assert stored.voucher_types == ["compute", "data"] and stored.name == "ops"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--role", "enterprise", "--name", "x"], "--entity"),
        (["--role", "admin", "--types", "compute,food", "--name", "x"], "--types"),
        (["--role", "auditor", "--entity", "ent_1", "--name", "x"], "--entity"),
        (["--role", "wizard", "--name", "x"], "--role"),
        (["--role", "admin"], "--name"),
    ],
)
async def test_apikey_create_refuses_bad_options(db_url: str, args: list[str], complaint: str) -> None:
    result = await _run("apikey", "create", *args, env=_env(DATABASE_URL=db_url))
    assert result.returncode == 2
    assert complaint in result.stderr and result.stdout == ""


async def test_apikey_create_binds_a_registered_entity_only(db_url: str, engine: AsyncEngine) -> None:
    entity = await create_entity(engine, kind="provider")
    created = await _run(
        "apikey", "create", "--role", "provider", "--entity", entity, "--name", "till", env=_env(DATABASE_URL=db_url)
    )
    assert created.returncode == 0, created.stderr
    assert f"entity: {entity}" in created.stdout

    unknown = unique_entity()
    refused = await _run(
        "apikey", "create", "--role", "provider", "--entity", unknown, "--name", "till", env=_env(DATABASE_URL=db_url)
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--entity" in refused.stderr and unknown in refused.stderr
    async with engine.connect() as conn:
        stored = await conn.scalar(text("SELECT count(*) FROM api_key WHERE entity_id = :e"), {"e": unknown})
    assert stored == 0


@pytest.mark.parametrize(("role", "kind"), [("provider", "enterprise"), ("enterprise", "provider")])
async def test_apikey_create_binds_a_role_to_an_entity_of_its_kind_only(
    db_url: str, engine: AsyncEngine, role: str, kind: str
) -> None:
    """API.md, "Admin scope": a provider key binds to a provider entity, an enterprise key to any other kind."""
    entity = await create_entity(engine, kind=kind)
    refused = await _run(
        "apikey", "create", "--role", role, "--entity", entity, "--name", "misfit", env=_env(DATABASE_URL=db_url)
    )
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout
    assert "--entity" in refused.stderr and kind in refused.stderr
    async with engine.connect() as conn:
        stored = await conn.scalar(text("SELECT count(*) FROM api_key WHERE entity_id = :e"), {"e": entity})
    assert stored == 0


async def test_only_the_documented_commands_exist() -> None:
    result = await _run("--help", env=_env())
    assert result.returncode == 0
    for command in ("serve", "migrate", "apikey"):
        assert command in result.stdout
    assert (await _run("frobnicate", env=_env())).returncode == 2


async def test_migrate_and_apikey_on_an_unmigrated_database(server_url: str) -> None:
    url = await create_database(server_url)
    try:
        refused = await _run("apikey", "create", "--role", "auditor", "--name", "x", env=_env(DATABASE_URL=url))
        assert refused.returncode == 1 and "migrate" in refused.stderr
        result = await _run("migrate", env=_env(DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        assert migrate.head_revision() in result.stdout
        created = await _run("apikey", "create", "--role", "auditor", "--name", "x", env=_env(DATABASE_URL=url))
        assert created.returncode == 0, created.stderr
    finally:
        await drop_database(server_url, url)


async def test_serve_with_database_url(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    async with _serving(["--port", str(port)], _env(DATABASE_URL=db_url), log) as process:
        await _wait_ready(process, f"http://127.0.0.1:{port}", log)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).json() == {"status": "ok"}
            assert "server" not in (await client.get("/healthz")).headers


@pytest.mark.slow
async def test_serve_with_workers_aggregates_metrics(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    async with _serving(["--port", str(port), "--workers", "2"], _env(DATABASE_URL=db_url), log) as process:
        await _wait_ready(process, f"http://127.0.0.1:{port}", log)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(20):
                # a new connection each time, so the requests spread over the workers
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as one:
                    assert (await one.get("/healthz")).status_code == 200
            metrics = (await client.get("/metrics")).text
    totals = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vl_http_requests_total{") and 'route="/healthz"' in line
    ]
    assert sum(totals) >= 20, metrics


@pytest.mark.slow
async def test_serve_embedded_shares_its_server_and_stops_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(VL_DATA_DIR=str(data_dir), VL_BACKGROUND_TASKS="true")  # the defaults, in a folder of its own
    port = free_port()
    log = tmp_path / "serve.log"
    async with _serving(["--port", str(port)], env, log) as process:
        await _wait_ready(process, f"http://127.0.0.1:{port}", log)
        # a second command in the same folder joins the running server, and leaves it running
        created = await _run("apikey", "create", "--role", "admin", "--name", "ops", env=env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert (await client.get("/v1/api-keys", headers=bearer(key))).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
        assert (data_dir / "pgdata" / "postmaster.pid").exists()
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "the embedded server is still running"
