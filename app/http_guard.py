"""uvicorn's httptools protocol with deadlines on what the client owes, and a connection cap per worker.

uvicorn closes a connection idle between two requests (`timeout_keep_alive`), but nothing else: a socket that
never sends, half-sent headers and a half-sent body stay open for ever, each holding a file descriptor, until
the worker can accept nothing. `GuardedHttpToolsProtocol` (what `voucher-ledger serve` runs) adds:

- headers: a request's headers complete within `header_timeout_s` of the accept (or, on a kept-alive
  connection, of the request's first byte), and within `HEADER_BYTES_MAX`, else `408` (`431`) and close;
  a connection that sent nothing is closed without an answer;
- body: the body complete within `body_timeout_s` of the headers, else `408` and close. Only the client's
  part is timed: never a response under way (a journal export streams for minutes), nor a body the app has
  not yet read (reading is paused) or a `100 Continue` it has not yet sent;
- a cap: past `connections_max` connections in this worker, a new one closes the connection that has waited
  longest on its client (idle, or in its headers; then one in its body), so a flood of idle sockets cannot
  shut out a client that sends its request at once; when every connection is being answered, the new one is
  refused. The cap stays under the process's fd limit (its soft limit is raised to the hard one) with room for
  the database pool.

The cost per request is a few attribute checks: the only timer per connection is armed at accept and
cancelled with the first headers; a request whose headers or body arrive in pieces arms one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE
from app.metrics import HTTP_CONNECTIONS_CLOSED
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Headers beyond this are refused 431: httptools sets no limit of its own, and one slow client could otherwise
# grow a worker's memory for as long as the header timeout lets it (nginx allows 32 KiB, Node 16 KiB).
HEADER_BYTES_MAX = 64 * 1024
# File descriptors kept for what is not a client connection: the listening socket, logs, the metrics files,
# PostgreSQL connections beyond the pool's, and the connections accepted in one burst before the cap closes them.
FD_RESERVE = 512
CONNECTIONS_MIN = 16
# One warning line at most per interval while the cap is reached, with a count, never a line per connection.
CAP_LOG_INTERVAL_S = 5.0


def _problem(status: int, title: str, code: str, detail: str) -> bytes:
    body = (
        f'{{"type":"{PROBLEM_TYPE}","title":"{title}","status":{status},"detail":"{detail}","code":"{code}"}}'
    ).encode()
    head = (
        f"HTTP/1.1 {status} {title}\r\ncontent-type: {PROBLEM_MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


REQUEST_TIMEOUT = _problem(408, "Request Timeout", "request_timeout", "the request did not arrive in time")
HEADERS_TOO_LARGE = _problem(
    431,
    "Request Header Fields Too Large",
    "headers_too_large",
    f"the request headers are larger than {HEADER_BYTES_MAX} bytes",
)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (inherited by workers); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):  # a limit this process may not raise: keep the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return int(soft)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    connections_max: int
    fd_limit: int
    wanted_max: int  # the setting, before the fd limit lowered it

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The settings' limits, the cap lowered to fit this process's fd limit (raised first)."""
        fd_limit = raise_fd_limit()
        room = fd_limit - settings.db_pool_size - settings.db_max_overflow - FD_RESERVE
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            connections_max=max(CONNECTIONS_MIN, min(settings.http_connections_max, room)),
            fd_limit=fd_limit,
            wanted_max=settings.http_connections_max,
        )

    def describe(self) -> str:
        lowered = f" (VL_HTTP_CONNECTIONS_MAX={self.wanted_max} lowered to fit)" if self.lowered else ""
        return (
            f"at most {self.connections_max} connections per worker{lowered}, fd limit {self.fd_limit}; "
            f"headers within {self.header_timeout_s:g} s, bodies within {self.body_timeout_s:g} s"
        )

    @property
    def lowered(self) -> bool:
        return self.connections_max < self.wanted_max


class ConnectionGuard:
    """One worker's limits and the connections waiting on their clients, oldest first (dicts keep order)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}  # idle, or sending headers
        self.in_body: dict[GuardedHttpToolsProtocol, None] = {}  # headers in, body incomplete
        self._cap_log_at = 0.0
        self._cap_closed = 0

    def forget(self, protocol: GuardedHttpToolsProtocol) -> None:
        self.waiting.pop(protocol, None)
        self.in_body.pop(protocol, None)

    def make_room(self) -> bool:
        """Close the connection that has waited longest on its client; False when every one is answered."""
        victim = next(iter(self.waiting), None)
        if victim is None:
            victim = next((p for p in self.in_body if not p.responding), None)
        if victim is None:
            self.closed("refused")
            return False
        self.forget(victim)
        victim.transport.abort()
        self.closed("evicted")
        return True

    def closed(self, reason: str) -> None:
        HTTP_CONNECTIONS_CLOSED.labels(reason).inc()
        if reason not in ("evicted", "refused"):
            return
        self._cap_closed += 1
        now = time.monotonic()
        if now >= self._cap_log_at:
            log.warning(
                "connection cap reached (%d per worker): %d connections closed or refused to make room since the "
                "last line",
                self.limits.connections_max,
                self._cap_closed,
            )
            self._cap_closed = 0
            self._cap_log_at = now + CAP_LOG_INTERVAL_S


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module's docstring. `guard`: this process's, made from the settings on the first connection
    (a subclass may set its own)."""

    guard: ClassVar[ConnectionGuard | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        guard = type(self).guard
        if guard is None:
            guard = GuardedHttpToolsProtocol.guard = ConnectionGuard(ConnectionLimits.from_settings(get_settings()))
        self._guard = guard
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False  # a request has begun and its headers are not all in
        self._in_body = False  # its headers are in and its body is not
        self._header_bytes = 0
        self._upgraded = False  # handed to uvicorn's websocket protocol, which times itself

    @property
    def responding(self) -> bool:
        """A response is under way on this connection (no deadline on the client may cut it)."""
        cycle = self.cycle
        return cycle is not None and cycle.response_started and not cycle.response_complete

    # --- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self._guard
        if len(self.connections) > guard.limits.connections_max and not guard.make_room():
            transport.abort()
            return
        guard.waiting[self] = None
        self._arm(guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > HEADER_BYTES_MAX and not self.transport.is_closing():
                self._close("headers_too_large", HEADERS_TOO_LARGE)
                return
        if self._deadline is not None or self.transport.is_closing() or self._upgraded:
            return
        if self._in_body:
            self._arm(self._guard.limits.body_timeout_s)
            self._guard.in_body[self] = None
        elif self.cycle is None or self.cycle.response_complete:
            # bytes of a next request on a kept-alive connection: uvicorn has just cancelled its idle timer
            self._arm(self._guard.limits.header_timeout_s)

    # --- the parser's callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._in_body = True
        self._disarm()
        self._guard.waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._deadline is not None:
            self._disarm()
            self._guard.in_body.pop(self, None)
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True
        self._in_headers = self._in_body = False
        self._disarm()
        self._guard.forget(self)
        super().handle_websocket_upgrade()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now, on uvicorn's keep-alive timer
            self._guard.waiting[self] = None

    # --- deadlines
    def _arm(self, delay_s: float) -> None:
        self._deadline = self.loop.call_later(delay_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._upgraded:
            return
        cycle = self.cycle
        limits = self._guard.limits
        if self._in_body:
            assert cycle is not None
            if self.responding or self.flow.read_paused or cycle.waiting_for_100_continue:
                self._arm(limits.body_timeout_s)  # the app is answering, or has not read what came: not the client
                return
            self._close("body_timeout", None if cycle.response_complete else REQUEST_TIMEOUT)
            return
        if cycle is not None and not cycle.response_complete:
            self._arm(limits.header_timeout_s)  # a pipelined request begun during a response: that goes first
            return
        self._close("header_timeout", REQUEST_TIMEOUT if self._in_headers else None)

    def _close(self, reason: str, answer: bytes | None) -> None:
        self._guard.closed(reason)
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()
