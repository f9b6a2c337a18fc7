"""Faults: the database dropping connections or going away, and the service killed mid-load.

A lost database is `503 service_unavailable` with `Retry-After` (never a 500, never a hang), and the service
recovers by itself when the database is back. A crash loses nothing a client was told succeeded, posts
nothing twice, and every request whose answer was lost resolves to one definite answer when it is replayed
with its Idempotency-Key. The slow tests run `voucher-ledger serve --workers 2` as a separate process
(tests/service_support.py); the others test the pieces in process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from conftest import drop_database
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import background, errors
from app.db import connection_lost, invalidate_if_lost, make_engine
from app.main import create_app
from app.settings import Settings
from ledger.service import Ledger
from tests.service_support import (
    YUAN,
    Load,
    PrivatePostgres,
    Service,
    assert_journal_whole,
    assert_redeemed_exactly_once,
    assert_replays_resolve,
    assert_voucher_balances,
    check_books,
    compute_vouchers,
    expect,
    program_year,
    provider_key,
    query,
    replay,
    served_database,
)
from tests.test_support import assert_problem, free_port, running_app

# --------------------------------------------------------------------------------------------------------
# Which errors are a lost database


def _raw_lost() -> list[BaseException]:
    multiple = OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 1), [Errno 99] ...")
    return [
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        asyncpg.exceptions.ConnectionFailureError("server closed the connection unexpectedly"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.exceptions.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        FileNotFoundError(2, "No such file or directory"),  # the server's Unix socket is gone
        TimeoutError(),  # asyncpg's connect timeout
        multiple,
    ]


def _raw_answers() -> list[BaseException]:
    """The server answered (or the code is wrong): retrying the same thing later is no cure."""
    return [
        asyncpg.exceptions.SerializationError("could not serialize access"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),  # 57014
        asyncpg.exceptions.UniqueViolationError("duplicate key value"),
        asyncpg.exceptions.InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("not a database error"),
        AssertionError("a bug"),
    ]


@pytest.mark.parametrize("raw", _raw_lost(), ids=lambda e: type(e).__name__)
def test_lost_connections_are_recognised_raw_and_wrapped(raw: BaseException) -> None:
    assert connection_lost(raw)
    # as SQLAlchemy raises them: the driver's error as `orig`, and as the cause of a later error
    assert connection_lost(OperationalError("SELECT 1", None, raw if isinstance(raw, Exception) else None))
    try:
        try:
            raise raw
        except BaseException as exc:
            raise RuntimeError("while talking to the database") from exc
    except RuntimeError as chained:
        assert connection_lost(chained)


@pytest.mark.parametrize("raw", _raw_answers(), ids=lambda e: f"{type(e).__name__}-{e}"[:60])
def test_answers_and_bugs_are_not_lost_connections(raw: Exception) -> None:
    assert not connection_lost(raw)
    assert not connection_lost(IntegrityError("INSERT ...", None, raw))


def test_sqlalchemy_marks_what_it_invalidated() -> None:
    orig = asyncpg.exceptions.InterfaceError("an error SQLAlchemy saw on a connection it then found closed")
    assert not connection_lost(InterfaceError("SELECT 1", None, ValueError("x")))
    assert connection_lost(DBAPIError("SELECT 1", None, orig, connection_invalidated=True))


# --------------------------------------------------------------------------------------------------------
# The HTTP answer


class Raising:
    """The real app with one more route, `GET /test/raise`, raising `to_raise`."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.to_raise: BaseException = RuntimeError("set by the test")

    async def get(self) -> httpx.Response:
        return await self.client.get("/test/raise")


@pytest.fixture
async def raising(settings: Settings) -> AsyncIterator[Raising]:
    app = create_app(settings)
    holder: list[Raising] = []

    @app.get("/test/raise")
    async def raise_it() -> None:
        raise holder[0].to_raise

    async with running_app(settings, app) as client:
        holder.append(Raising(client))
        yield holder[0]


@pytest.mark.parametrize("raw", _raw_lost()[:8], ids=lambda e: type(e).__name__)
async def test_a_lost_database_is_503_with_retry_after_and_one_quiet_log_line(
    raising: Raising, raw: Exception, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "_unavailable_log", errors._UnavailableLog(errors.UNAVAILABLE_LOG_INTERVAL_S))
    secret = "vl_abcdefghijkl_SECRETSECRET token=eyJhbGciOiJFZERTQSJ9.SECRET"
    raw.args = (f"{raw.args[0] if raw.args else ''} {secret}",)  # a message quoting what it should not
    for wrapped in (raw, OperationalError("SELECT secret", {"token": secret}, raw)):
        raising.to_raise = wrapped
        with caplog.at_level(logging.WARNING):
            response = await raising.get()
        assert_problem(response, 503, "service_unavailable")
        assert response.headers["retry-after"] == str(errors.DATABASE_RETRY_AFTER_S)
    lines = [r for r in caplog.records if r.name == "app.errors"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # the second within the interval is counted, not logged
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert "SECRET" not in lines[0].getMessage() and "GET /test/raise" in lines[0].getMessage()


async def test_any_other_database_error_is_still_a_logged_500(
    raising: Raising, caplog: pytest.LogCaptureFixture
) -> None:
    raising.to_raise = IntegrityError("INSERT", None, asyncpg.exceptions.UniqueViolationError("duplicate key value"))
    with caplog.at_level(logging.ERROR):
        response = await raising.get()
    assert_problem(response, 500, "internal_error")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


# --------------------------------------------------------------------------------------------------------
# The pool recovers by itself


async def _terminate(engine: AsyncEngine, pid: int) -> None:
    async with engine.connect() as admin:
        assert await admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


async def _driver(conn: AsyncConnection) -> Any:
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return raw


async def _closed_soon(raw: Any) -> None:
    """asyncpg sees the socket's end on its own, while the connection sits idle in the pool."""
    for _ in range(500):
        if raw.is_closed():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("asyncpg never saw the server close the connection")


async def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(db_url: str) -> None:
    engine = make_engine(db_url, Settings(database_url=db_url, db_pool_size=1, db_max_overflow=0))
    other = make_engine(db_url, Settings(database_url=db_url, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.connect() as conn:
            first = await conn.scalar(text("SELECT pg_backend_pid()"))
            pooled = await _driver(conn)
        await _terminate(other, first)
        await _closed_soon(pooled)
        async with engine.connect() as conn:  # replaced at checkout: no error, and no ping
            second = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        await engine.dispose()
        await other.dispose()


async def test_invalidate_if_lost_drops_a_connection_a_raw_driver_error_killed(db_url: str) -> None:
    engine = make_engine(db_url, Settings(database_url=db_url, db_pool_size=1, db_max_overflow=0))
    other = make_engine(db_url, Settings(database_url=db_url, db_pool_size=1, db_max_overflow=0))
    try:
        async with engine.connect() as conn:
            raw = await _driver(conn)
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError) as answered:
                await raw.fetchval("SELECT 1 / 0")
            assert not await invalidate_if_lost(conn, answered.value)  # the server answered: keep it
            assert not conn.invalidated
            pid = await raw.fetchval("SELECT pg_backend_pid()")
            await _terminate(other, pid)
            with pytest.raises(Exception) as lost:
                await raw.fetchval("SELECT 1")
            assert await invalidate_if_lost(conn, lost.value)
            assert conn.invalidated
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT pg_backend_pid()")) != pid
    finally:
        await engine.dispose()
        await other.dispose()


# --------------------------------------------------------------------------------------------------------
# The service killed mid-load


KILL_AFTER_201S = 40  # the kill comes once this many redemptions succeeded: in the middle, whatever the speed


@pytest.mark.slow
async def test_sigkill_mid_load_loses_nothing_and_replays_resolve_every_outcome(
    embedded_server_url: str, tmp_path: Path
) -> None:
    url, admin_key = await served_database(embedded_server_url)
    service = Service(url, tmp_path)
    try:
        await service.start()
        async with service.client(admin_key) as admin:
            # three roomy vouchers, and one that runs out mid-load, so refusals are among the outcomes
            faces = [1_000_000 * YUAN, 1_000_000 * YUAN, 1_000_000 * YUAN, 100 * YUAN]
            vouchers = await compute_vouchers(admin, program_year(), faces, "kill")
            provider = await provider_key(admin)
        load = Load(service, provider, vouchers, clients=16, amount_fen=20 * YUAN, label="kill")
        load.start()
        try:
            await load.wait_until(lambda: load.count(201) >= KILL_AFTER_201S, 60, f"{KILL_AFTER_201S} redemptions")
            await asyncio.to_thread(service.kill)  # the uvicorn parent and both workers, at once
            await load.wait_until(lambda: all(t.done() for t in load._tasks), 30, "every client saw the crash")
        finally:
            await load.stop()
        attempts = load.attempts
        seen_ok = [a for a in attempts if a.status == 201]
        unanswered = [a for a in attempts if a.status is None]
        assert len(seen_ok) >= KILL_AFTER_201S and unanswered, "the kill did not land in the middle of the load"
        assert all(a.status in (201, 409, None) for a in attempts), sorted({a.status or 0 for a in attempts})

        await service.start()  # on the same database; nothing else repairs anything
        await check_books(url)
        async with service.client(admin_key) as admin:
            trial = expect(await admin.get("/v1/ledger/trial-balance"), 200)
            assert trial["balanced"] and trial["total_debits_fen"] == trial["total_credits_fen"]
        async with service.client(provider.key) as client:  # every 201 a client saw is on record as it was
            for attempt in seen_ok:
                assert attempt.answer is not None
                stored = expect(await client.get(f"/v1/redemptions/{attempt.answer['id']}"), 200)
                assert {k: stored[k] for k in attempt.answer} == attempt.answer

        answered_before = {
            r.idempotency_key
            for r in await query(
                url, "SELECT idempotency_key FROM idempotency_record WHERE caller_key_id = :k", {"k": provider.key_id}
            )
        }
        replies = await replay(service, provider, attempts)
        redeemed = assert_replays_resolve(attempts, replies)
        assert {a.key for a in seen_ok} <= set(redeemed)
        print(  # shown when the test fails, or with -s
            f"{len(attempts)} attempts: {len(seen_ok)} seen 201, {load.count(409)} seen 409, {len(unanswered)} "
            f"unanswered, of which {sum(1 for a in unanswered if a.key in answered_before)} had committed "
            f"before the kill; after the replay {len(redeemed)} redeemed"
        )
        await assert_redeemed_exactly_once(url, provider, attempts, replies, redeemed)
        async with service.client(admin_key) as admin:
            await assert_voucher_balances(admin, vouchers, list(redeemed.values()))
        again = await replay(service, provider, attempts)  # and a second replay changes nothing
        assert {k: (r.status_code, r.json()) for k, r in again.items()} == {
            k: (r.status_code, r.json()) for k, r in replies.items()
        }
        await check_books(url)
        assert "unhandled error" not in service.log_text()
    finally:
        service.stop()
        await drop_database(embedded_server_url, url)


# --------------------------------------------------------------------------------------------------------
# The database lost under load


DOWN_ANSWER_MAX_S = 5.0  # a request while the database is down is answered within this (no hang)
RECOVERY_MAX_S = 15.0  # the service answers again within this after the database is back


async def _terminate_service_backends(pg: PrivatePostgres) -> int:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="postgres")
    try:
        terminated: int = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'voucher-ledger'"
        )
        return terminated
    finally:
        await conn.close()


@pytest.mark.slow
async def test_losing_the_database_answers_503_and_the_service_recovers_by_itself(tmp_path: Path) -> None:
    pg = PrivatePostgres()
    service: Service | None = None
    try:
        await asyncio.to_thread(pg.init)
        await asyncio.to_thread(pg.start)
        url, admin_key = await served_database(pg.url())
        service = Service(url, tmp_path)
        await service.start()
        processes = (service.pid, service.worker_pids())
        async with service.client(admin_key) as admin:
            vouchers = await compute_vouchers(admin, program_year(), [1_000_000 * YUAN] * 4, "loss")
            provider = await provider_key(admin)
        load = Load(service, provider, vouchers, clients=8, amount_fen=YUAN, label="loss", timeout_s=10)
        load.phase = "steady"
        load.start()
        try:
            await load.wait_until(lambda: load.count(201, "steady") >= 20, 60, "redemptions before the faults")

            # (a) every connection of the service killed by the server, under load
            assert await _terminate_service_backends(pg) >= 2
            load.phase = "terminated"
            await load.wait_until(lambda: load.count(201, "terminated") >= 20, RECOVERY_MAX_S, "recovery")

            # (b) the database stopped: 503 with Retry-After, fast, for writes, reads and readiness
            load.phase = "stopping"
            await asyncio.to_thread(pg.stop, "fast")
            load.phase = "down"
            async with service.client(admin_key, timeout_s=DOWN_ANSWER_MAX_S) as admin:
                ready = await admin.get("/readyz")
                assert_problem(ready, 503, "not_ready")
                assert int(ready.headers["retry-after"]) >= 1
                read = await admin.get(f"/v1/vouchers/{vouchers[0].id}")
                assert_problem(read, 503, "service_unavailable")
                assert int(read.headers["retry-after"]) >= 1
            await load.wait_until(lambda: load.count(503, "down") >= 16, 30, "503s while the database is down")

            # (c) the database back: the same processes recover by themselves
            load.phase = "restarting"
            restarting_at = time.monotonic()
            await asyncio.to_thread(pg.start)
            load.phase = "back"
            back_at = time.monotonic()
            async with service.client(timeout_s=DOWN_ANSWER_MAX_S) as probe:
                while (await probe.get("/readyz")).status_code != 200:
                    assert time.monotonic() - back_at < RECOVERY_MAX_S, "not ready after the database came back"
                    await asyncio.sleep(0.1)
            await load.wait_until(lambda: load.count(201, "back") >= 20, RECOVERY_MAX_S, "redemptions again")
            recovered_s = time.monotonic() - back_at
        finally:
            await load.stop()
        assert (service.pid, service.worker_pids()) == processes, "the service restarted"

        attempts = load.attempts
        by_phase = {
            phase: sorted({a.status or 0 for a in attempts if a.phase == phase})
            for phase in ("steady", "terminated", "stopping", "down", "restarting", "back")
        }
        assert all(a.status in (201, 503) for a in attempts), by_phase  # never a 500, never unanswered
        # Sent while the database was down and answered before it was started again: 503, every one. (One
        # still in flight when the restart began may be redeemed: on a loaded machine it can be.)
        down = [a for a in attempts if a.phase == "down"]
        answered_down = sorted({a.status or 0 for a in down if a.answered_at < restarting_at})
        assert answered_down == [503], [(a.status, round(a.seconds, 2)) for a in down]
        for attempt in (a for a in attempts if a.status == 503):
            assert attempt.content_type.startswith("application/problem+json"), attempt
            assert attempt.answer is not None and attempt.answer["code"] == "service_unavailable", attempt
            assert attempt.retry_after is not None and int(attempt.retry_after) >= 1, attempt
            assert attempt.seconds < DOWN_ANSWER_MAX_S, attempt

        # (d) nothing half-written, before anything is replayed; then every 503 resolves on replay
        await check_books(url)
        await assert_journal_whole(url, provider)
        replies = await replay(service, provider, attempts)
        redeemed = assert_replays_resolve(attempts, replies)
        await assert_redeemed_exactly_once(url, provider, attempts, replies, redeemed)
        async with service.client(admin_key) as admin:
            await assert_voucher_balances(admin, vouchers, list(redeemed.values()))
        await check_books(url)

        log = service.log_text()
        assert "database unavailable (" in log and "answered 503" in log
        assert "unhandled error" not in log  # no request failed with a 500
        secret = provider.key.rsplit("_", 1)[1]
        assert secret not in log and vouchers[0].token not in log
        print(  # shown when the test fails, or with -s
            f"{len(attempts)} attempts by phase: "
            + ", ".join(f"{p} {sum(1 for a in attempts if a.phase == p)} {s}" for p, s in by_phase.items())
            + f"; ready and redeeming {recovered_s:.1f} s after the database came back"
        )
    finally:
        if service is not None:
            service.stop()
        await asyncio.to_thread(pg.cleanup)


# --------------------------------------------------------------------------------------------------------
# The background loop while the database is away


async def _run_loop_until(engine: AsyncEngine, done: asyncio.Event, timeout_s: float) -> None:
    settings = Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none", sealer_interval_s=0.01)
    loop = asyncio.create_task(background.run_background(engine, Ledger(), settings))
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_the_background_loop_logs_a_lost_database_once_and_no_stack_trace(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql+asyncpg://nobody:SECRET@127.0.0.1:{free_port()}/none"  # nothing listens there
    engine = make_engine(url, Settings(database_url=url))
    ticks = 0
    enough = asyncio.Event()

    async def seal_all(engine: AsyncEngine, ledger: Ledger) -> int:
        nonlocal ticks
        ticks += 1
        if ticks == 20:
            enough.set()
        return await real_seal_all(engine, ledger)

    real_seal_all = background.seal_all
    monkeypatch.setattr(background, "seal_all", seal_all)
    try:
        with caplog.at_level(logging.INFO, logger="app.background"):
            await _run_loop_until(engine, enough, 2.0)
    finally:
        await engine.dispose()
    lines = [r for r in caplog.records if r.name == "app.background"]
    assert [r.levelno for r in lines] == [logging.WARNING], [r.getMessage() for r in lines]  # 20 ticks, 1 line
    assert lines[0].exc_info is None and "Traceback" not in caplog.text
    assert lines[0].getMessage().startswith("database unavailable (") and "SECRET" not in caplog.text


async def test_the_background_loop_says_when_the_database_is_back_and_still_traces_other_errors(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = OperationalError("SELECT SECRET", {}, asyncpg.exceptions.CannotConnectNowError("starting up SECRET"))
    script: list[BaseException | None] = [lost, lost, None, None, ConnectionRefusedError(111, "SECRET"), lost]
    script += [None, RuntimeError("a bug"), RuntimeError("a bug")]
    done = asyncio.Event()

    async def seal_all(_engine: AsyncEngine, _ledger: Ledger) -> int:
        if not script:
            done.set()
            return 0
        outcome = script.pop(0)
        if outcome is not None:
            raise outcome
        return 0

    async def nothing(*_args: object) -> int:
        return 0

    monkeypatch.setattr(background, "seal_all", seal_all)
    for sweep in ("release_expired_holds", "expire_due_vouchers", "return_released_holds"):
        monkeypatch.setattr(background, sweep, nothing)
    with caplog.at_level(logging.INFO, logger="app.background"):
        await _run_loop_until(cast(AsyncEngine, None), done, 2.0)
    lines = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records if r.name == "app.background"]
    unavailable = (logging.WARNING, "database unavailable (CannotConnectNowError 57P03): background work waits for it")
    back = (logging.INFO, "database back: background work resumed", False)
    refused = (logging.WARNING, "database unavailable (ConnectionRefusedError): background work waits for it")
    bug = (logging.ERROR, "background ledger work failed; retrying", True)
    assert lines == [(*unavailable, False), back, (*refused, False), back, bug, bug], lines
    assert "SECRET" not in caplog.text
