"""Every error the API answers is an RFC 9457 problem: `application/problem+json` with `type`, `title`,
`status`, `detail` and a stable machine-readable `code`.

Domain errors know nothing of HTTP; `DOMAIN_ERRORS` below is the one table that gives each of them a status
(and, where the domain class has none, a code). Errors raised by the HTTP shell itself (authentication,
permissions, lookups) are `ProblemError`s and carry their own status and code. A database that cannot be
reached or drops the connection (`app.db.connection_lost`: SQLAlchemy's wrappers and raw asyncpg errors
alike) is `503 service_unavailable` with `Retry-After`, and one warning line (no stack trace, nothing of the
request) at most every `UNAVAILABLE_LOG_INTERVAL_S` per process. Anything else is a bug: a `500
internal_error` with a generic detail, and a log line with the stack trace (for a RecursionError, one line
naming its innermost frames).
"""

from __future__ import annotations

import inspect
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import connection_lost
from app.idempotency import IdempotencyKeyReused, RequestInProgress
from app.json_depth import BodyTooDeep, JsonDepthLimitMiddleware
from ledger import errors as ledger_errors
from vouchers import applications, external_awards, notices, redemption, sanctions
from vouchers.affiliations import AffiliationAlreadyEnded, AffiliationNotFound, InvalidAffiliation, UnknownEntity
from vouchers.budgets import AppropriationExceeded, BudgetBelowCommitted
from vouchers.catalog import OutsidePolicyTerm, UnknownProgram
from vouchers.entities import EntityExists, EntityNotFound, InvalidEntity
from vouchers.settlements import NothingToSettle, SettlementNotFound
from vouchers.tokens import InvalidToken, InvalidTokenRequest, TokenNotFound, WrongProvider
from vouchers.uscc import InvalidUscc
from vouchers.vouchers import AwardNotReversible, VoucherExpired, VoucherNotFound, VoucherRevoked

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# RFC 9457 §4.2.1: "about:blank" says the problem means what its status means; `code` refines it.
PROBLEM_TYPE = "about:blank"

# Codes for HTTP errors raised by the framework (routing, body limits): stable names, not reason phrases.
_HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


def code_for_status(status: int) -> str:
    return _HTTP_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


class Problem(BaseModel):
    """The body of every error response (documented in the OpenAPI description)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE)


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these statuses answer a problem document, `application/problem+json`.
    Declared by reference, not as `model=Problem`: FastAPI builds a pydantic field for every response model
    of every route of every app, half the cost of an app's first request (and of each test's app); the
    schema itself is added once (`_openapi_with_problem`)."""
    return {
        status: {"description": HTTPStatus(status).phrase, "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}}
        for status in statuses
    }


def _openapi_with_problem(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: FastAPI's document, with the Problem schema the routes refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema()
        return app.openapi_schema or {}

    return openapi


# --------------------------------------------------------------------------------------------------------
# Errors of the HTTP shell


class ProblemError(Exception):
    """An error the HTTP shell raises on purpose; answered as a problem with this status and code."""

    status: ClassVar[int] = 400
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class Unauthorized(ProblemError):
    status = 401
    code = "unauthorized"

    def __init__(self, detail: str = "a valid API key is required: send Authorization: Bearer <key>") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="voucher-ledger"'})


class Forbidden(ProblemError):
    status = 403
    code = "forbidden"


class NotFound(ProblemError):
    status = 404
    code = "not_found"


class Conflict(ProblemError):
    status = 409
    code = "conflict"


class ValidationFailed(ProblemError):
    """A 422 found after parsing (a bad cursor, a rule across fields): same shape as pydantic's errors."""

    status = 422
    code = "validation_error"

    def __init__(self, detail: str, *, loc: Sequence[str | int] = ()) -> None:
        errors = [{"loc": list(loc), "msg": detail, "type": "value_error"}] if loc else []
        super().__init__(detail, extra={"errors": errors})


class ServiceUnavailable(ProblemError):
    status = 503
    code = "service_unavailable"

    def __init__(self, detail: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(retry_after_s)})


# --------------------------------------------------------------------------------------------------------
# Domain errors: class -> (status, code). `None` keeps the class's own `code` attribute, so every
# subclass of a mapped class answers with its own stable code. The nearest class in the MRO wins.

DOMAIN_ERRORS: dict[type[Exception], tuple[int, str | None]] = {
    # API.md's stable codes: malformed input is validation_error, a missing object is not_found
    ledger_errors.InvalidEntry: (422, "validation_error"),
    ledger_errors.AccountNotFound: (404, "not_found"),
    ledger_errors.AccountExists: (409, None),
    ledger_errors.EntryNotFound: (404, "not_found"),
    ledger_errors.NotReversible: (409, None),
    ledger_errors.IdempotencyConflict: (422, None),
    ledger_errors.AppendOnlyViolation: (409, None),
    ledger_errors.Refusal: (409, None),
    # the entity registry (art. 25)
    InvalidUscc: (422, None),
    InvalidEntity: (422, "validation_error"),
    EntityExists: (409, None),
    EntityNotFound: (404, "not_found"),
    # programs and budgets (arts. 27, 28)
    UnknownProgram: (422, "validation_error"),
    OutsidePolicyTerm: (422, None),
    AppropriationExceeded: (409, None),
    BudgetBelowCommitted: (409, None),
    # affiliated parties (arts. 8, 9)
    InvalidAffiliation: (422, None),
    AffiliationNotFound: (404, None),
    UnknownEntity: (404, None),
    AffiliationAlreadyEnded: (409, None),
    # applications and awards
    applications.InvalidApplication: (422, None),
    applications.ApplicationNotFound: (404, None),
    applications.ApplicationNotPending: (409, None),
    applications.YearClosed: (409, None),
    applications.YearNotStarted: (409, None),
    applications.CapExceeded: (409, None),
    applications.NothingOwed: (409, None),
    applications.AwardLimitReached: (409, None),
    applications.BudgetExhausted: (409, None),
    applications.BasisAlreadyUsed: (409, None),
    applications.PurchaseAlreadyReported: (409, None),
    applications.DuplicateBasis: (422, None),
    applications.AffiliatedPurchaser: (403, None),
    notices.ObjectionNotFound: (404, None),
    # redemption (arts. 8, 9, 11)
    redemption.VoucherExhausted: (409, None),
    redemption.AffiliatedParty: (403, None),
    redemption.NotTheVendor: (403, None),
    redemption.NothingEligible: (409, None),
    redemption.TokenLimitReached: (409, None),
    redemption.InvoiceAlreadyRedeemed: (409, None),
    redemption.RedemptionNotFound: (404, None),
    redemption.RefundTooLarge: (409, None),
    redemption.RedemptionSettled: (409, None),
    redemption.HoldNotFound: (404, None),
    redemption.HoldNotPending: (409, None),
    redemption.HoldExpired: (409, None),
    notices.ObjectionResolved: (409, None),
    # vouchers after issue, and reversed awards
    VoucherNotFound: (404, None),
    VoucherRevoked: (409, None),
    VoucherExpired: (409, None),
    AwardNotReversible: (409, None),
    # grounds and sanctions (art. 25), external awards
    sanctions.EntitySanctioned: (409, None),
    sanctions.SanctionNotFound: (404, None),
    sanctions.SanctionAlreadyLifted: (409, None),
    external_awards.ExternalAwardNotFound: (404, None),
    external_awards.ExternalAwardReversed: (409, None),
    # voucher tokens: a token that does not verify is 401; a sound one narrowed to another provider is 403
    InvalidToken: (401, None),
    WrongProvider: (403, None),
    TokenNotFound: (404, None),
    InvalidTokenRequest: (422, None),
    # idempotent commands (app/idempotency.py) and settlement
    IdempotencyKeyReused: (422, None),
    RequestInProgress: (409, None),
    NothingToSettle: (409, None),
    SettlementNotFound: (404, None),
}


def domain_problem(exc: Exception) -> tuple[int, dict[str, Any]] | None:
    """The status and problem body a mapped domain error answers with (None: not a domain error); for
    routes that store their answer (idempotent commands) before sending it."""
    mapped = domain_status(exc)
    if mapped is None:
        return None
    status, code = mapped
    detail = getattr(exc, "detail", None)
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail if isinstance(detail, str) else HTTPStatus(status).phrase,
        "code": code,
    }
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        body["errors"] = errors
    return status, body


def domain_status(exc: Exception) -> tuple[int, str] | None:
    for cls in type(exc).__mro__:
        mapped = DOMAIN_ERRORS.get(cls)
        if mapped is not None:
            status, code = mapped
            return status, code or str(getattr(exc, "code", code_for_status(status)))
    return None


# --------------------------------------------------------------------------------------------------------
# Handlers


async def _problem_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers, extra=exc.extra)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    mapped = domain_status(exc)
    if mapped is None:  # a handler is only installed for mapped classes; stay safe anyway
        return _internal_error_response()
    status, code = mapped
    detail = getattr(exc, "detail", None)
    errors = getattr(exc, "errors", None)  # a domain validation error may say which fields, as FastAPI's do
    return problem_response(
        status,
        code,
        detail if isinstance(detail, str) else HTTPStatus(status).phrase,
        extra={"errors": errors} if isinstance(errors, list) and errors else None,
    )


_GENERIC_DETAILS: dict[int, str] = {
    404: "no resource at this path",
    500: "the server could not complete the request; it has been logged",
}


# FastAPI answers a JSON body it cannot decode with this 400; a UnicodeDecodeError as its cause: not UTF-8
_BODY_NOT_PARSED = "There was an error parsing the body"
_NOT_UTF8 = "the body is not valid UTF-8 JSON"


def _routes(app: FastAPI) -> Iterable[Any]:
    """Every route of the app, those of included routers too. FastAPI 0.165 (uv.lock) keeps an included router
    as one entry of `app.router.routes`, whose `matches` reports its first partial match only;
    `iter_route_contexts` lists the routes inside it. Older versions copied them into the app's own list."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return app.router.routes if flatten is None else flatten(app.router.routes)


def _allowed_methods(request: Request) -> str:
    """The methods of the resource at the request's path (RFC 9110 §10.2.1), not only those of the first route
    the router found: `GET /v1/api-keys` and `POST /v1/api-keys` are two routes. When templates of different
    resources match the path, the most concrete wins, as OpenAPI matches paths: `/v1/affiliations/check` is
    the check (GET), not an affiliation called "check" (`/v1/affiliations/{id}`). Empty when none matches."""
    by_template: dict[str, set[str]] = {}
    for route in _routes(request.app):
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] == Match.PARTIAL:
            by_template.setdefault(str(route.path), set()).update(route_methods)
    if not by_template:
        return ""
    fewest = min(template.count("{") for template in by_template)
    methods = set().union(*(m for template, m in by_template.items() if template.count("{") == fewest))
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail
    headers = dict(exc.headers or {})
    if status == 400 and detail == _BODY_NOT_PARSED and isinstance(exc.__cause__, UnicodeDecodeError):
        # no operation documents a 400, and malformed input is a 422 (API.md), as a body that is not JSON is
        errors = [{"loc": ["body"], "msg": _NOT_UTF8, "type": "json_invalid"}]
        return problem_response(422, "validation_error", _NOT_UTF8, extra={"errors": errors})
    if isinstance(exc, BodyTooDeep):  # app.json_depth, raised while the body is read, before it is parsed
        return problem_response(422, "validation_error", str(detail), extra={"errors": exc.errors})
    if status == 405:
        allowed = _allowed_methods(request) or headers.get("Allow", "")
        if allowed:
            headers["Allow"] = allowed
        detail = f"{request.method} is not allowed here" + (f"; allowed: {allowed}" if allowed else "")
    elif not detail or detail == HTTPStatus(status).phrase:
        detail = _GENERIC_DETAILS.get(status, HTTPStatus(status).phrase)
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="voucher-ledger"')
    return problem_response(status, code_for_status(status), str(detail), headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only location, message and type: never `input` (it may carry a key or a token) nor `ctx`.
    errors: list[dict[str, Any]] = []
    messages: list[str] = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        msg = str(error.get("msg", ""))
        errors.append({"loc": loc, "msg": msg, "type": str(error.get("type", ""))})
        where = ".".join(str(part) for part in loc)
        messages.append(f"{where}: {msg}" if where else msg)
    detail = messages[0] if messages else "the request is not valid"
    if len(messages) > 1:
        detail += f" (and {len(messages) - 1} more)"
    return problem_response(422, "validation_error", detail, extra={"errors": errors})


async def _pool_timeout(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database pool exhausted: %s", type(exc).__name__)
    return problem_response(
        503, "service_unavailable", "the database is busy; retry shortly", headers={"Retry-After": "1"}
    )


# A client told to come back after this many seconds: a restarting server is back within a few.
DATABASE_RETRY_AFTER_S = 1
# While the database is away every request fails the same way: one line per interval says so, with a count.
UNAVAILABLE_LOG_INTERVAL_S = 5.0


def failure_name(exc: BaseException) -> str:
    """The innermost error's class and SQLSTATE (never its message, which may quote a statement's values)."""
    inner: BaseException = exc
    for _ in range(8):
        following = getattr(inner, "orig", None) or inner.__cause__
        if not isinstance(following, BaseException) or following is inner:
            break
        inner = following
    state = getattr(inner, "sqlstate", None)
    return f"{type(inner).__name__} {state}" if isinstance(state, str) and state else type(inner).__name__


class _UnavailableLog:
    """Logs the first request answered 503 for a lost database at once, then at most one line per interval
    counting the others, so an outage under load does not flood the log."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next_at = 0.0
        self._suppressed = 0

    def note(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        more = f"; {self._suppressed} more answered so since the last line" if self._suppressed else ""
        log.warning("database unavailable (%s): %s answered 503%s", failure_name(exc), where, more)
        self._suppressed = 0
        self._next_at = now + self.interval_s


_unavailable_log = _UnavailableLog(UNAVAILABLE_LOG_INTERVAL_S)


def note_database_unavailable(where: str, exc: BaseException) -> None:
    """Log a 503 answered because the database failed (`where`: method and route template) as the requests'
    503s are: in the process's one line per interval, never one line per request."""
    _unavailable_log.note(where, exc)


def database_unavailable_response(where: str, exc: BaseException) -> JSONResponse:
    """`503 service_unavailable` with `Retry-After` for a request that lost the database (`where`: method and
    route template, for the log line)."""
    _unavailable_log.note(where, exc)
    return problem_response(
        503,
        "service_unavailable",
        "the database cannot be reached right now; retry shortly with the same Idempotency-Key",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def _internal_error_response() -> JSONResponse:
    return problem_response(500, "internal_error", _GENERIC_DETAILS[500])


# innermost frames named in the one line logged for a RecursionError
_RECURSION_FRAMES_LOGGED = 6


def _recursion_in(exc: BaseException) -> RecursionError | None:
    """The RecursionError `exc` is or was raised from or while handling, if any."""
    inner: BaseException | None = exc
    for _ in range(8):
        if inner is None or isinstance(inner, RecursionError):
            return inner
        inner = inner.__cause__ or inner.__context__
    return None


def _log_unhandled(where: str, exc: BaseException) -> None:
    """One log record per unhandled error, with its stack trace; for a RecursionError (in it, or in its
    cause), whose trace repeats the same frames a thousand times, one line naming the innermost few."""
    recursion = _recursion_in(exc)
    if recursion is None:
        log.error("unhandled error in %s", where, exc_info=exc)
        return
    frames = traceback.extract_tb(recursion.__traceback__)[-_RECURSION_FRAMES_LOGGED:]
    innermost = " < ".join(f"{frame.name} ({frame.filename}:{frame.lineno})" for frame in reversed(frames))
    name = type(exc).__name__ if recursion is exc else f"{type(exc).__name__} after a RecursionError"
    log.error("unhandled error in %s: %s, innermost frames: %s", where, name, innermost or "none")


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    if connection_lost(exc):
        return database_unavailable_response(f"{request.method} {request.url.path}", exc)
    _log_unhandled(f"{request.method} {request.url.path}", exc)
    return _internal_error_response()


def unhandled_response(where: str, exc: Exception) -> JSONResponse:
    """The answer to an exception no handler took (`where`: method and route template, for the log line): a
    lost database is a 503 (`database_unavailable_response`), anything else a generic 500, logged with its
    stack trace."""
    if connection_lost(exc):
        return database_unavailable_response(where, exc)
    _log_unhandled(where, exc)
    return _internal_error_response()


async def route_error_response(request: Request, exc: Exception, where: str) -> Response:
    """The answer the app gives when a route raises `exc`, for work done outside FastAPI's machinery
    (`app.fastpath`): the handler registered for the exception's nearest class, as Starlette's
    ExceptionMiddleware picks it (an HTTPException's status first; the `Exception`/500 handler is not among
    them: Starlette keeps that one for its outermost middleware), else what `UnhandledErrorMiddleware`
    answers."""
    handlers: Mapping[Any, Any] = request.app.exception_handlers
    handler = None
    if isinstance(exc, StarletteHTTPException) and exc.status_code != 500:
        handler = handlers.get(exc.status_code)
    if handler is None:
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls is not Exception and cls in handlers), None)
    if handler is None:
        return unhandled_response(where, exc)
    if inspect.iscoroutinefunction(handler):
        response: Response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    return response


class UnhandledErrorMiddleware:
    """Answers an exception no handler took: a lost database with a 503 problem (`connection_lost`),
    anything else with a generic 500 problem, logged with its stack trace.

    Starlette's own last-resort handler answers too, but then re-raises to the server, which logs the
    exception a second time; this middleware ends the story here. A response already started cannot be
    replaced, so that case is re-raised for the server to close the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            where = f"{scope.get('method')} {getattr(scope.get('route'), 'path', 'unmatched')}"
            await unhandled_response(where, exc)(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses a request body larger than `max_body_size` bytes with a `413 payload_too_large` problem:
    at once when Content-Length announces it, else as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the request body is larger than {self.max_body_size} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_size:
                    exc = self._too_large()
                    await problem_response(413, "payload_too_large", exc.detail)(scope, receive, send)
                    return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    raise self._too_large()  # answered by the HTTP error handler, inside
            return message

        await self.app(scope, receive_limited, send)


def install_error_handlers(app: FastAPI, *, max_body_size: int) -> None:
    app.openapi = _openapi_with_problem(app)  # type: ignore[method-assign]
    app.add_exception_handler(ProblemError, _problem_error)
    for cls in DOMAIN_ERRORS:
        app.add_exception_handler(cls, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout)
    app.add_exception_handler(Exception, _unhandled)
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(JsonDepthLimitMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_size=max_body_size)
