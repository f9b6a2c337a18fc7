"""Half-sent requests against the service: how many sockets a flood gets held, how soon the server closes
them, and how fast `/healthz` answers meanwhile (issue 12, section 3); and what the guard costs a request.

    .venv/bin/python bench/connections.py [--sockets 10000] [--rate 2000] [--workers 2] \\
        [--header-timeout 5] [--body-timeout 10] [--connections-max 4096]
    .venv/bin/python bench/connections.py --overhead [--requests 20000]

The flood, all on loopback, in a temp folder it removes:
1. starts the embedded PostgreSQL there, migrates it, and `voucher-ledger serve --workers N` on it with the
   `VL_HTTP_*` settings given;
2. measures `/healthz` on a new connection each time (the client a flood would shut out), 100 times;
3. opens `--sockets` connections at `--rate` a second: a third send nothing, a third half their headers, a
   third whole headers with `content-length: 400` and half the body; each is kept until the server closes it.
   Meanwhile, every 50 ms: `/healthz` on a new connection, and the client connections each worker holds
   (its sockets on the service's port, from /proc);
4. prints the sockets the server held at most (per worker, against the cap), how long after its last byte
   each kind was closed (p50, p99, max), how many got a 408, what the service counted closing, by reason, and
   /healthz latency before and during the flood (p50, p99, max, failures).
The client holds every socket it opens: `--sockets` must stay under this process's fd limit (it raises its
soft limit to the hard one).

`--overhead`: the guard's cost per request, where it shows most: uvicorn in this process, serving an ASGI
app that answers at once, with uvicorn's own httptools protocol and with the guarded one, in turns, each
timed (CPU seconds) over `--requests` keep-alive requests from a client in the same process, in 5 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import migrate
from app.embedded import start_embedded
from app.http_guard import ConnectionGuard, ConnectionLimits, GuardedHttpToolsProtocol, raise_fd_limit
from bench.redeem_load import Service

KINDS = ("silent", "half headers", "half body")
HALF_HEADERS = b"POST /v1/redemptions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nidempot"
HALF_BODY = (
    b"POST /v1/redemptions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    b"authorization: Bearer vl_aaaaaaaaaaaa_bbbbbbbb\r\nidempotency-key: flood\r\ncontent-length: 400\r\n\r\n"
    + b'{"token": "'
    + b"x" * 189
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
PROBE_EVERY_S = 0.05
BASELINE_PROBES = 100
ROUNDS = 5


@dataclass
class Socket:
    kind: str
    sent_at: float = 0.0
    closed_at: float | None = None
    answer: bytes = b""
    refused: bool = False


async def _half_send(port: int, held: Socket, wait_s: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        held.refused = True
        return
    try:
        writer.write({"silent": b"", "half headers": HALF_HEADERS, "half body": HALF_BODY}[held.kind])
        await writer.drain()
        held.sent_at = time.monotonic()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(65536):
                    held.answer += chunk
            held.closed_at = time.monotonic()
        if held.closed_at is None and reader.at_eof():
            held.closed_at = time.monotonic()
    except ConnectionError:
        held.closed_at = time.monotonic()
    finally:
        writer.close()


async def healthz_s(port: int) -> float | None:
    """Seconds for /healthz on a new connection; None when it failed (or took over 5 s)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEALTHZ)
            answer = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200 ") else None


def held_per_worker(service: Service) -> dict[int, int]:
    """Per worker process, the client connections it holds (accepted sockets on the service's port)."""
    assert service.process is not None
    port_hex = f":{service.port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(port_hex) and fields[3] != "0A":
                    inodes.add(fields[9])
    held: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != service.process.pid or int(entry.name) == service.process.pid:
                continue
            sockets = {
                os.readlink(fd)[8:-1] for fd in (entry / "fd").iterdir() if os.readlink(fd).startswith("socket:")
            }
            if sockets:
                held[int(entry.name)] = len(sockets & inodes)
    return held


async def closed_by_reason(port: int) -> dict[str, int]:
    """`vl_http_connections_closed_total` by reason, from the service's /metrics (every worker's)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
    text = (await reader.read()).decode(errors="replace")
    writer.close()
    found = re.findall(r'^vl_http_connections_closed_total\{reason="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {reason: int(float(value)) for reason, value in found}


def percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered) * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms, max {ordered[-1] * 1000:,.0f} ms"
    )


async def flood(args: argparse.Namespace) -> int:
    fd_limit = raise_fd_limit()
    if args.sockets + 1000 > fd_limit:
        print(f"--sockets {args.sockets} does not fit this process's fd limit ({fd_limit}) with room to spare")
        return 2
    data_dir = Path(tempfile.mkdtemp(prefix="vl-bench-connections-"))
    server: Any = None
    service: Service | None = None
    try:
        db_url, server = start_embedded(data_dir)
        await asyncio.to_thread(migrate.upgrade, db_url)
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "VL_DATA_DIR": str(data_dir),
            "VL_HTTP_HEADER_TIMEOUT_S": str(args.header_timeout),
            "VL_HTTP_BODY_TIMEOUT_S": str(args.body_timeout),
            "VL_HTTP_CONNECTIONS_MAX": str(args.connections_max),
        }
        service = Service(env, args.workers, data_dir / "service.log")
        try:
            await service.start()
        except RuntimeError as exc:
            print(f"{exc}:\n{service.log_path.read_text(errors='replace')[-3000:]}")
            return 1
        port = service.port
        print(
            f"serve --workers {args.workers}: headers within {args.header_timeout:g} s, bodies within "
            f"{args.body_timeout:g} s, at most {args.connections_max} connections per worker; fd limit {fd_limit}"
        )

        baseline = [await healthz_s(port) for _ in range(BASELINE_PROBES)]
        print(f"/healthz on a new connection, no flood: {percentiles([s for s in baseline if s is not None])}")

        sockets = [Socket(KINDS[i % 3]) for i in range(args.sockets)]
        wait_s = max(args.header_timeout, args.body_timeout) + 30
        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()

        async def open_all() -> None:
            per_tick = max(1, args.rate // 100)
            for first in range(0, len(sockets), per_tick):
                for held in sockets[first : first + per_tick]:
                    tasks.append(asyncio.create_task(_half_send(port, held, wait_s)))
                await asyncio.sleep(max(0.0, started + (first + per_tick) / args.rate - time.monotonic()))

        opener = asyncio.create_task(open_all())
        probes: list[float | None] = []
        held_max: dict[int, int] = {}
        while not opener.done() or not all(t.done() for t in tasks):
            for pid, count in held_per_worker(service).items():
                held_max[pid] = max(held_max.get(pid, 0), count)
            probes.append(await healthz_s(port))
            await asyncio.sleep(PROBE_EVERY_S)
            if time.monotonic() - started > wait_s + args.sockets / args.rate + 10:
                break
        await opener
        await asyncio.gather(*tasks)
        took_s = time.monotonic() - started

        print(f"{args.sockets:,} half-sent requests opened at {args.rate:,}/s; all done in {took_s:.1f} s")
        print(f"  connections held per worker, at most: {held_max} (cap {args.connections_max})")
        refused = sum(h.refused for h in sockets)
        never = [h for h in sockets if not h.refused and h.closed_at is None]
        print(f"  refused at connect: {refused:,}; still open when the bench gave up: {len(never):,}")
        for kind in KINDS:
            closed = [h for h in sockets if h.kind == kind and h.closed_at is not None]
            waits = [h.closed_at - h.sent_at for h in closed if h.closed_at is not None]
            answered_408 = sum(h.answer.startswith(b"HTTP/1.1 408 ") for h in closed)
            print(
                f"  {kind}: {len(closed):,} closed by the server, {answered_408:,} of them with a 408; "
                f"after {percentiles(waits)} (from the client's last byte)"
            )
        answered = [s for s in probes if s is not None]
        print(
            f"/healthz on a new connection during the flood: {len(answered)} answered, "
            f"{len(probes) - len(answered)} failed; {percentiles(answered)}"
        )
        print(f"  the service's count of what it closed: {await closed_by_reason(port)}")
        closed_lines = [line for line in service.log_path.read_text().splitlines() if "connection cap" in line]
        print(f"service log: {len(closed_lines)} 'connection cap reached' lines")
        return 0 if not never and len(answered) == len(probes) else 1
    finally:
        if service is not None:
            service.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# --overhead


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _timed(protocol: type[HttpToolsProtocol], requests: int) -> float:
    """CPU seconds of this process (client and server) for `requests` sequential keep-alive requests to an
    in-process uvicorn with `protocol`: CPU, not wall time, so that other work on the machine counts less."""
    config = uvicorn.Config(_hello, http=protocol, lifespan="off", loop="none", log_level="warning")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not serving.done(), serving
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection(*sock.getsockname())
    request = b"POST /v1/redemptions HTTP/1.1\r\nhost: bench\r\ncontent-length: 2\r\n\r\n{}"
    started = time.process_time()
    for _ in range(requests):
        writer.write(request)
        await reader.readuntil(b"\r\n\r\nok")
    took_s = time.process_time() - started
    writer.close()
    server.should_exit = True
    await serving
    sock.close()
    return took_s


async def overhead(args: argparse.Namespace) -> int:
    limits = ConnectionLimits(header_timeout_s=5, body_timeout_s=10, connections_max=4096, fd_limit=0, wanted_max=4096)
    guarded = type("Guarded", (GuardedHttpToolsProtocol,), {"guard": ConnectionGuard(limits)})
    await _timed(HttpToolsProtocol, 2000)  # warm-up
    plain: list[float] = []
    with_guard: list[float] = []
    for _ in range(ROUNDS):
        plain.append(await _timed(HttpToolsProtocol, args.requests))
        with_guard.append(await _timed(guarded, args.requests))
    plain_us = min(plain) / args.requests * 1e6
    guarded_us = min(with_guard) / args.requests * 1e6
    print(f"{args.requests:,} keep-alive requests, client and server in one process, CPU time, best of {ROUNDS}:")
    print(f"  uvicorn's httptools protocol: {plain_us:.1f} µs a request (rounds: {[round(t, 2) for t in plain]} s)")
    print(
        f"  GuardedHttpToolsProtocol:     {guarded_us:.1f} µs a request (rounds: {[round(t, 2) for t in with_guard]} s)"
    )
    print(f"  difference: {guarded_us - plain_us:+.1f} µs a request")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2_000, help="new sockets a second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    parser.add_argument("--body-timeout", type=float, default=10.0)
    parser.add_argument("--connections-max", type=int, default=4096)
    parser.add_argument("--overhead", action="store_true", help="time the guard per request instead")
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    if not (1 <= args.sockets <= 100_000 and 1 <= args.rate <= 20_000 and 1 <= args.workers <= 4):
        parser.error("--sockets in [1, 1e5], --rate in [1, 2e4], --workers in [1, 4]")
    if not 100 <= args.requests <= 1_000_000:
        parser.error("--requests in [100, 1e6]")
    return uvloop.run(overhead(args) if args.overhead else flood(args))


if __name__ == "__main__":
    sys.exit(main())
