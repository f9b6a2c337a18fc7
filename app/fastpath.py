"""A lean path for `POST /v1/redemptions`, the hot route, that answers exactly as the FastAPI route does.

py-spy on the load test (32 connections, `voucher-ledger serve --workers 2`) shows FastAPI's machinery, not
the route's work, costing most of the Python per redemption: the middleware stack, routing,
`solve_dependencies`, request validation through FastAPI, Response objects. `RedemptionFastPath` is a pure
ASGI layer, outermost of the app's own middleware, that answers the common case itself and hands
everything else to the app unchanged.

It answers a request only when all of these hold, in this order, each checked the way the route checks it:

- `POST` to exactly `/v1/redemptions` (no `root_path`);
- `Authorization: Bearer <key>`, an `Idempotency-Key` of 1 to 255 characters, a JSON content type
  (`application/json` or `application/*+json`, as FastAPI reads a body as JSON), and no Content-Length
  over the body limit; none of these headers sent twice;
- a body within the limit, nested no deeper than the app takes (`app.json_depth`), that
  `RedemptionIn.model_validate_json` accepts (the NUL check included: it is the model's own). Whatever
  that rejects and FastAPI's `json.loads` might take (a byte-order mark, UTF-16) is deferred; whatever it
  accepts, `json.loads` and the model take alike;
- a key the authenticator has cached (`ApiKeyAuthenticator.cached`, no database), of a provider.

Anything else (no or unknown key, another role, a missing or bad header or body, a body too large, a
client gone while sending) goes to the app with the body bytes already read replayed as they came, so the
app gives its canonical answer (401, 403, 413, 422, ...) and charges the rate limit as it always does.

Once it answers, it does what the route's dependencies and handlers do: takes one token from the key's
`redemption` bucket (the app's own limiter: 429 with `Retry-After`), calls `redemption_answer` (the route's
whole work), sends it as the route's own Starlette `Response`, turns an exception into the answer the app's
handlers give (`route_error_response`: the same problem documents, 503 for a lost database), and counts the
request in the HTTP metrics under the route's template. uvicorn's access log sees it as any other request.

Every check is the route's own code: `bearer_credentials` (every route's reading of the key),
`IdempotencyKeyHeader`'s `KEY_LENGTH_MAX`, the app's body limit, `nesting_exceeds`, `RedemptionIn`. One
cannot be: FastAPI decides whether a body is JSON by a content-type test written inline in its routing, so
`is_json_type` restates it and tests/test_fastpath.py holds the two to the same answers.

Why it is kept (issue 14): bench/fastpath.py, on and off in alternating rounds of one run, puts the route's
machinery at about a third of a worker's CPU per redemption (see README, "Performance").
"""

from __future__ import annotations

import email.message
import time
from collections import deque
from typing import ClassVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.dependencies import bearer_credentials
from app.errors import Unauthorized, route_error_response
from app.idempotency import KEY_LENGTH_MAX
from app.json_depth import nesting_exceeds
from app.metrics import observe_request
from app.ratelimit import app_limiter
from app.roles import Role
from app.routers.redemptions import RedemptionIn, redemption_answer

__all__ = ["PATH", "RedemptionFastPath", "is_json_type"]

PATH = "/v1/redemptions"
_WHERE = f"POST {PATH}"
# content types seen, and whether FastAPI reads a body sent with them as JSON; bounded, a client may vary them
_JSON_TYPES: dict[bytes, bool] = {b"application/json": True}
_JSON_TYPES_MAX = 64


def is_json_type(value: bytes) -> bool:
    """FastAPI's own test (fastapi.routing, `strict_content_type`): an `application/json` or
    `application/*+json` content type reads the body as JSON; anything else does not."""
    known = _JSON_TYPES.get(value)
    if known is not None:
        return known
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    json_type = message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
    if len(_JSON_TYPES) < _JSON_TYPES_MAX:
        _JSON_TYPES[value] = json_type
    return json_type


class RedemptionFastPath:
    """See the module's docstring. `max_body_size`: the app's body limit (BodySizeLimitMiddleware's)."""

    # requests the fast path answered in this process: tests see by it that it, not the route, answered
    answered: ClassVar[int] = 0

    def __init__(self, app: ASGIApp, *, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        headers = self._headers(scope)
        if headers is None:
            await self.app(scope, receive, send)
            return
        credentials, key = headers
        read: list[Message] = []
        body = await self._body(receive, read)
        if body is None or nesting_exceeds(body):
            await self.app(scope, _replaying(read, receive), send)
            return
        try:
            redemption = RedemptionIn.model_validate_json(body)
        except ValidationError:
            await self.app(scope, _replaying(read, receive), send)
            return
        state = scope["app"].state
        authenticator = getattr(state, "api_keys", None)
        try:
            caller = authenticator.cached(credentials) if authenticator is not None else None
        except Unauthorized:
            caller = None
        if caller is None or caller.role is not Role.PROVIDER:
            await self.app(scope, _replaying(read, receive), send)
            return

        RedemptionFastPath.answered += 1
        status = 500
        try:
            try:
                app_limiter(state).check(caller, "redemption")
                status, media_type, content = await redemption_answer(state, caller, key, redemption)
            except Exception as exc:
                response = await route_error_response(Request(scope), exc, _WHERE)
                status = response.status_code
                await response(scope, receive, send)
                return
            await Response(content, status_code=status, media_type=media_type)(scope, receive, send)
        finally:
            observe_request("POST", PATH, status, started_at)

    def _headers(self, scope: Scope) -> tuple[str, str] | None:
        """(credentials, Idempotency-Key) when the headers are as the fast path takes them, else None."""
        authorization = key = content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return None
                authorization = value
            elif name == b"idempotency-key":
                if key is not None:
                    return None
                key = value
            elif name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value
            elif name == b"content-length":
                if content_length is not None:
                    return None
                content_length = value
        if authorization is None or key is None or content_type is None or not is_json_type(content_type):
            return None
        if not 1 <= len(key) <= KEY_LENGTH_MAX:
            return None
        if content_length is not None and not (content_length.isdigit() and int(content_length) <= self.max_body_size):
            return None
        credentials = bearer_credentials(authorization.decode("latin-1"))
        if credentials is None:
            return None
        return credentials, key.decode("latin-1")

    async def _body(self, receive: Receive, read: list[Message]) -> bytes | None:
        """The whole body, every message read kept in `read`; None as soon as it passes the limit or the
        client is gone."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replaying(read: list[Message], receive: Receive) -> Receive:
    """`receive` for the app: the messages already read, as they came, then the client's own."""
    pending = deque(read)

    async def replay() -> Message:
        if pending:
            return pending.popleft()
        return await receive()

    return replay
