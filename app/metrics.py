"""Prometheus metrics.

Labels stay bounded: `route` is the matched route's path template (`/v1/api-keys/{id}`), or `unmatched`
when no route matched (a scanner's random paths must not grow the series), and `method` is one of the
standard methods or `other`.

With `uvicorn --workers N` each worker is a process: when `PROMETHEUS_MULTIPROC_DIR` is set (before this
module is imported, which `voucher-ledger serve` takes care of), values live in files in that folder and
`/metrics` aggregates every worker's. A worker holds that folder in use while it lives
(`app.metrics_folders`), so a later `serve` does not take it for one a killed service left behind.
"""

from __future__ import annotations

import os
import re
import time

from fastapi.routing import iter_route_contexts
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics_folders

metrics_folders.hold_from_environment()

HTTP_REQUESTS = Counter(
    "vl_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "vl_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response body, by method and route template",
    ["method", "route"],
)
LEDGER_ENTRIES_POSTED = Counter(
    "vl_ledger_entries_posted_total", "Ledger entries committed and sealed into the hash chain, by entry kind", ["kind"]
)

RATE_LIMITED = Counter(
    "vl_rate_limited_total", "Requests refused 429 rate_limited, by bucket and the role of the key", ["bucket", "role"]
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "vl_http_connections_closed_total",
    "Connections the server closed on a client that kept it waiting (app/http_guard.py), by reason: "
    "header_timeout, body_timeout, headers_too_large, evicted or refused (the connection cap)",
    ["reason"],
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class RouteTemplates:
    """The full path template of the route that answered, e.g. `/v1/api-keys/{id}`.

    Routers included with a prefix keep their own routes (FastAPI >= 0.137): `scope["route"]` is the route
    as its router declared it, without the include's prefix. The full templates come from FastAPI's public
    `iter_route_contexts`, indexed by route object once, and again when a route appears that was added later.
    """

    def __init__(self) -> None:
        self._templates: dict[int, tuple[BaseRoute, list[tuple[re.Pattern[str], str]]]] = {}

    def label(self, scope: Scope) -> str:
        route = scope.get("route")
        if not isinstance(route, BaseRoute):
            return UNMATCHED
        entry = self._templates.get(id(route))
        if entry is None or entry[0] is not route:
            self._index(scope)
            entry = self._templates.get(id(route))
        if entry is None or entry[0] is not route or not entry[1]:
            path = getattr(route, "path_format", None) or getattr(route, "path", None)
            return path if isinstance(path, str) else UNMATCHED
        templates = entry[1]
        if len(templates) == 1:
            return templates[0][1]
        # one route object included under several prefixes: the one whose pattern matches this path
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        for pattern, template in templates:
            if pattern.match(path):
                return template
        return templates[0][1]

    def _index(self, scope: Scope) -> None:
        app = scope.get("app")
        routes = getattr(app, "routes", None)
        if routes is None:
            return
        templates: dict[int, tuple[BaseRoute, list[tuple[re.Pattern[str], str]]]] = {}
        for context in iter_route_contexts(routes):
            route = context.original_route
            template = context.path_format
            if template is None:
                continue
            pattern = getattr(context, "path_regex", None)
            if not isinstance(pattern, re.Pattern):
                pattern = re.compile(re.escape(template))
            templates.setdefault(id(route), (route, []))[1].append((pattern, template))
        self._templates = templates


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: no per-request task or body buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes = RouteTemplates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            observe_request(scope["method"], self.routes.label(scope), status, started_at)


def observe_request(method: str, route: str, status: int, started_at: float) -> None:
    """Count one answered request and time it from `started_at` (`time.perf_counter()` at its arrival)."""
    method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_REQUEST_DURATION.labels(method, route).observe(time.perf_counter() - started_at)


def exposition() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and their content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
