"""Half-sent requests are closed by the server, and the service answers through a flood of them.

uvicorn alone keeps a silent socket, half-sent headers and a half-sent body open for ever; 20,000 of them
ran the workers out of file descriptors. app/http_guard.py times what the client owes (headers, body) and
caps the connections of a worker. The first tests run its protocol in process on a small ASGI app of their
own, to pin each rule (and that a slow response or a body sent at a normal pace is never cut); the last one
floods `voucher-ledger serve --workers 2` with a thousand half-sent requests and watches the service answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import drop_database
from starlette.types import Message, Receive, Scope, Send

from tests.service_support import (
    YUAN,
    Service,
    _socket_inodes,
    compute_vouchers,
    expect,
    program_year,
    provider_key,
    redemption_body,
    served_database,
)

HEADER_S = 0.6
BODY_S = 1.2
KEEP_ALIVE_S = 1
# what a loaded machine (2 cores, shared) may add to a deadline before the close is seen
SLACK_S = 1.5

# --------------------------------------------------------------------------------------------------------
# The protocol in process, on an app of the test's own


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, then answers its length; `/stream` answers 10 chunks 0.3 s apart (3 s in all)."""
    if scope["type"] == "websocket":  # refused, as Starlette refuses a path it has no websocket route for
        await receive()
        await send({"type": "websocket.close", "code": 1000})
        return
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(10):
            await asyncio.sleep(0.3)
            await send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    content = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(content))]})
    await send({"type": "http.response.body", "body": content})


@asynccontextmanager
async def _served(*, connections_max: int = 1000) -> AsyncIterator[tuple[int, Any]]:
    """uvicorn on this loop with the guarded protocol and short limits; the port and the guard."""
    # imported here, not at the top: on a checkout without the guard the service test below still runs
    from app.http_guard import ConnectionGuard, ConnectionLimits, GuardedHttpToolsProtocol

    limits = ConnectionLimits(
        header_timeout_s=HEADER_S,
        body_timeout_s=BODY_S,
        connections_max=connections_max,
        fd_limit=0,
        wanted_max=connections_max,
    )
    guard = ConnectionGuard(limits)
    protocol = type("TestProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})
    config = uvicorn.Config(
        _app, http=protocol, lifespan="off", loop="none", log_level="warning", timeout_keep_alive=KEEP_ALIVE_S
    )
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        yield port, guard
    finally:
        server.should_exit = True
        await task
        sock.close()


async def _until_closed(reader: asyncio.StreamReader, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionResetError):  # an abort (the cap), or data left unread at the close
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                data += chunk
    return data, time.monotonic() - started


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


async def test_a_silent_connection_is_closed_without_an_answer() -> None:
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data == b""
    assert HEADER_S - 0.1 <= waited_s <= HEADER_S + SLACK_S, waited_s


async def test_half_sent_headers_are_answered_408_and_closed() -> None:
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(b"POST /v1/redemptions HTTP/1.1\r\nhost: test\r\ncontent-type: appl")
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b'"code":"request_timeout"' in data
    assert waited_s <= HEADER_S + SLACK_S, waited_s


async def test_headers_trickled_in_do_not_extend_their_deadline() -> None:
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        closed = asyncio.create_task(_until_closed(reader))
        for i in range(40):  # one header every 0.1 s: 4 s in all, were it allowed
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(b"x-slow-%d: 1\r\n" % i)
                await writer.drain()
            await asyncio.sleep(0.1)
        data, _ = await closed
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert time.monotonic() - started <= HEADER_S + SLACK_S


async def test_a_half_sent_body_is_answered_408_and_closed() -> None:
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\n" + b"x" * 50)
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert BODY_S - 0.1 <= waited_s <= BODY_S + SLACK_S, waited_s


async def test_a_long_body_at_a_normal_pace_is_answered() -> None:
    """A body that takes longer than the header timeout, sent steadily within the body timeout."""
    size = 512 * 1024
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % size)
        started = time.monotonic()
        for _ in range(8):  # 64 KiB every 0.11 s: about 0.9 s, longer than the header timeout
            await asyncio.sleep(0.11)
            writer.write(b"x" * (size // 8))
            await writer.drain()
        assert time.monotonic() - started > HEADER_S
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(len(str(size))), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert body == str(size).encode()


async def test_a_slow_streaming_response_is_never_cut() -> None:
    """3 s of response, longer than every timeout: a request timeout never cuts a response."""
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n")
        # a pipelined request begun during the response is timed only once the response is done
        writer.write(b"GET / HTTP/1.1\r\nhost: te")
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert all(b"chunk %d\n" % i in data for i in range(10)), data
    assert b"0\r\n\r\n" in data  # the chunked response's end
    assert waited_s >= 3.0


async def test_an_idle_kept_alive_connection_is_closed() -> None:
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(1)
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data == b""
    assert waited_s <= KEEP_ALIVE_S + SLACK_S


@pytest.mark.parametrize("after", [b"GET / HTTP/1.1\r\nhost: te", b"\r\n"], ids=["half a request", "a stray CRLF"])
async def test_bytes_after_a_response_start_the_header_deadline(after: bytes) -> None:
    """uvicorn cancels its keep-alive timer on any byte: a next request never completed stayed open for ever."""
    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1)
        writer.write(after)
        _, waited_s = await _until_closed(reader)
        writer.close()
    assert waited_s <= HEADER_S + SLACK_S, waited_s


async def test_headers_beyond_the_limit_are_refused_431() -> None:
    from app.http_guard import HEADER_BYTES_MAX

    async with _served() as (port, _guard):
        reader, writer = await _connect(port)
        filler = b"".join(b"x-filler-%d: %s\r\n" % (i, b"y" * 1000) for i in range(HEADER_BYTES_MAX // 1000 + 2))
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n" + filler)
        data, waited_s = await _until_closed(reader)
        writer.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert waited_s < HEADER_S


async def test_past_the_cap_a_new_connection_closes_the_longest_waiting() -> None:
    async with _served(connections_max=20) as (port, guard):
        silent = [await _connect(port) for _ in range(30)]
        await asyncio.sleep(0.2)  # every connection made on the server's side
        assert len(guard.waiting) == 20
        # the first ten were closed at once, long before their header timeout
        early = await asyncio.gather(*(_until_closed(reader, limit_s=0.3) for reader, _ in silent[:10]))
        assert all(waited_s < 0.3 for _, waited_s in early), early
        # a client that sends its request at once is answered
        reader, writer = await _connect(port)
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _, other in silent:
            other.close()


async def test_at_the_cap_with_every_connection_answered_a_new_one_is_refused() -> None:
    async with _served(connections_max=16) as (port, _guard):
        busy = [await _connect(port) for _ in range(16)]
        for _, writer in busy:
            writer.write(b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n")
        await asyncio.sleep(0.4)  # every response under way
        reader, writer = await _connect(port)
        writer.write(REQUEST)
        data, waited_s = await _until_closed(reader, limit_s=2)
        assert data == b"" and waited_s < 1, (data, waited_s)
        streamed = await asyncio.gather(*(_until_closed(r) for r, _ in busy))
        assert all(b"chunk 9\n" in data for data, _ in streamed)
        for _, other in [*busy, (reader, writer)]:
            other.close()


# --------------------------------------------------------------------------------------------------------
# A thousand half-sent requests against `voucher-ledger serve --workers 2`

SERVICE_HEADER_S = 2.0
SERVICE_BODY_S = 3.0
SERVICE_CONNECTIONS_MAX = 400  # per worker: a thousand half-sent requests pass it
FLOOD = 1000
FLOOD_SLACK_S = 3.0


@dataclass
class Flood:
    """One half-sent request: its kind, when its last byte was sent, and what the server did."""

    kind: str
    sent_at: float = 0.0
    answer: bytes = b""
    closed_at: float | None = None


HALF_HEADERS = b"POST /v1/redemptions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempot"
HALF_BODY = (
    b"POST /v1/redemptions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    b"authorization: Bearer vl_aaaaaaaaaaaa_bbbbbbbb\r\nidempotency-key: flood\r\ncontent-length: 400\r\n\r\n"
    + b'{"token": "'
    + b"x" * 189
)


async def _half_send(port: int, flood: Flood) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if flood.kind == "half headers":
        writer.write(HALF_HEADERS)
    elif flood.kind == "half body":
        writer.write(HALF_BODY)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    flood.sent_at = time.monotonic()
    return reader, writer


async def _watch(flood: Flood, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait for the server to close the connection (flood.closed_at stays None if it never does)."""
    try:
        flood.answer, _ = await _until_closed(reader, limit_s=SERVICE_BODY_S + FLOOD_SLACK_S + 2)
        flood.closed_at = time.monotonic()
    except TimeoutError:
        pass
    finally:
        writer.close()


def _served_connections(service: Service) -> dict[int, int]:
    """Per worker, the client connections it holds (accepted sockets on the service's port)."""
    port_hex = f":{service.port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(port_hex) and fields[3] != "0A":  # local port, not the listening socket
                    inodes.add(fields[9])
    return {pid: len(_socket_inodes(pid) & inodes) for pid in service.worker_pids()}


@pytest.fixture(scope="module")
async def flooded(
    embedded_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Service, str]]:
    url, admin_key = await served_database(embedded_server_url)
    env = {
        "VL_HTTP_HEADER_TIMEOUT_S": str(SERVICE_HEADER_S),
        "VL_HTTP_BODY_TIMEOUT_S": str(SERVICE_BODY_S),
        "VL_HTTP_CONNECTIONS_MAX": str(SERVICE_CONNECTIONS_MAX),
    }
    service = Service(url, Path(tmp_path_factory.mktemp("connections")), workers=2, env=env)
    try:
        await service.start()
        yield service, admin_key
    finally:
        service.stop()
        await drop_database(embedded_server_url, url)


@pytest.mark.slow
async def test_a_thousand_half_sent_requests_are_closed_while_the_service_answers(
    flooded: tuple[Service, str],
) -> None:
    service, admin_key = flooded
    async with service.client(admin_key) as admin:
        (voucher,) = await compute_vouchers(admin, program_year(), [10_000 * YUAN], "flood")
        provider = await provider_key(admin)

    kinds = ["silent", "half headers", "half body"]
    floods = [Flood(kinds[i % 3]) for i in range(FLOOD)]
    gate = asyncio.Semaphore(100)

    async def one(flood: Flood) -> None:
        async with gate:  # 100 connects at once at most; each socket is then held outside the gate
            try:
                reader, writer = await _half_send(service.port, flood)
            except ConnectionError:  # refused at the cap: closed by the server too
                flood.sent_at = flood.closed_at = time.monotonic()
                return
        await _watch(flood, reader, writer)

    started = time.monotonic()
    flooding = asyncio.gather(*(one(flood) for flood in floods))
    held_max: dict[int, int] = {}
    healthz_s: list[float] = []
    redeemed: list[int] = []
    async with service.client() as anyone, service.client(provider.key) as provider_client:
        i = 0
        while not all(f.closed_at is not None for f in floods) and time.monotonic() - started < 20:
            for pid, held in _served_connections(service).items():
                held_max[pid] = max(held_max.get(pid, 0), held)
            # a new connection each time: a flood must not shut out a client that comes later
            async with service.client() as fresh:
                asked_at = time.monotonic()
                assert (await fresh.get("/healthz")).status_code == 200
                healthz_s.append(time.monotonic() - asked_at)
            assert (await anyone.get("/healthz")).status_code == 200
            body = redemption_body(voucher.token, f"FLOOD-{i}", 10 * YUAN)
            response = await provider_client.post("/v1/redemptions", json=body, headers={"Idempotency-Key": f"f-{i}"})
            redeemed.append(expect(response, 201)["subsidy_fen"])
            i += 1
            await asyncio.sleep(0.1)
        await flooding

    print(
        f"{FLOOD} half-sent requests; held per worker at most {held_max} (cap {SERVICE_CONNECTIONS_MAX}); "
        f"healthz on a new connection: {len(healthz_s)} answered, slowest {max(healthz_s) * 1000:.0f} ms; "
        f"{len(redeemed)} redemptions answered 201 meanwhile"
    )
    assert len(redeemed) >= 5, redeemed
    assert not [f for f in floods if f.closed_at is None], "the server kept half-sent requests open"
    for flood in floods:
        assert flood.closed_at is not None
        deadline_s = SERVICE_HEADER_S if flood.kind != "half body" else SERVICE_BODY_S
        assert flood.closed_at - flood.sent_at <= deadline_s + FLOOD_SLACK_S, (
            flood.kind,
            flood.closed_at - flood.sent_at,
        )
        assert flood.answer in (b"",) or flood.answer.startswith(b"HTTP/1.1 408 "), flood.answer[:100]
    assert held_max and all(held <= SERVICE_CONNECTIONS_MAX + 16 for held in held_max.values()), held_max
    answered_408 = sum(f.answer.startswith(b"HTTP/1.1 408 ") for f in floods)
    assert answered_408 > 0
    await asyncio.sleep(0.5)
    assert all(held == 0 for held in _served_connections(service).values()), _served_connections(service)
    log = service.log_text()
    assert "unhandled error" not in log
    assert "Traceback" not in log
    assert log.count("\n") < 100, service.log_tail(100)


async def test_a_websocket_upgrade_leaves_the_connection_to_uvicorn(caplog: pytest.LogCaptureFixture) -> None:
    """The app has no websocket route: the handshake is refused, and no deadline of ours outlives the handover."""
    async with _served() as (port, guard):
        reader, writer = await _connect(port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        data, _ = await _until_closed(reader)
        writer.close()
        await asyncio.sleep(HEADER_S + 0.3)
        assert not guard.waiting and not guard.in_body
    assert data.startswith(b"HTTP/1.1 403 "), data
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
