"""A bound on how deeply a request body's JSON nests, checked on the raw bytes before anything parses them.

Python's JSON parser, and every walk of what it returns (pydantic, the NUL check, a log formatter), spends
a stack frame or more per level: a body of a few hundred nested arrays exhausted the interpreter's stack
(a 500 and a traceback of thousands of lines), and a deeper one made FastAPI's parser answer an
undocumented 400. No body this API takes nests more than a few levels (an application's `basis`, the
deepest, four), so a body nested deeper than `DEPTH_MAX` is `422 validation_error`, whatever the route,
before it is parsed.
"""

from __future__ import annotations

import operator
import re
from itertools import accumulate, count

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEPTH_MAX", "BodyTooDeep", "JsonDepthLimitMiddleware", "nesting_exceeds"]

# far above the four levels any body of this API has, far below what exhausts the stack (about 400)
DEPTH_MAX = 32

# A JSON string, escapes included; unterminated, it runs to the end of the body. Possessive, so an
# unterminated string is read once, never backtracked: the scan stays linear in the body.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
# an opening bracket steps the depth by +1, a closing one by -1: stored as +2 and 0, one is taken off below
_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
# brackets walked at once (C loops), between which a deep body is stopped early
_CHUNK = 8192


def nesting_exceeds(body: bytes, depth_max: int = DEPTH_MAX) -> bool:
    """Whether the JSON text `body` opens more than `depth_max` arrays and objects inside one another at any
    point (brackets inside strings do not count; a malformed body is judged by its brackets all the same).
    A body with no more than `depth_max` opening brackets is not scanned; else the work is linear, in C
    loops, under what `json.loads` spends on the same body."""
    if body.count(b"[") + body.count(b"{") <= depth_max:
        return False
    steps = _STRING.sub(b"", body).translate(_STEP, _NOT_BRACKET)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        chunk = steps[start : start + _CHUNK]
        # the depth after each bracket of the chunk, relative to its start: the running sum of (step - 1)
        peak = max(map(operator.sub, accumulate(chunk), count(1)))
        if depth + peak > depth_max:
            return True
        depth += sum(chunk) - len(chunk)
    return False


class BodyTooDeep(HTTPException):
    """Raised from `receive` while the app reads the body; FastAPI passes an HTTPException raised there on to
    the app's handler (`app.errors`), which answers `422 validation_error` with these `errors`."""

    def __init__(self, depth_max: int) -> None:
        detail = f"the body nests arrays and objects more than {depth_max} deep"
        super().__init__(422, detail)
        self.errors = [{"loc": ["body"], "msg": detail, "type": "json_too_deep"}]


class JsonDepthLimitMiddleware:
    """Refuses a request body nested deeper than `depth_max` (`nesting_exceeds`) when the app reads its last
    part, before anything parses it. A route that reads no body costs nothing."""

    def __init__(self, app: ASGIApp, depth_max: int = DEPTH_MAX) -> None:
        self.app = app
        self.depth_max = depth_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        opened = 0

        async def receive_checked() -> Message:
            nonlocal opened
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                chunks.append(chunk)
                opened += chunk.count(b"[") + chunk.count(b"{")
                if not message.get("more_body", False) and opened > self.depth_max:
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    if nesting_exceeds(body, self.depth_max):
                        raise BodyTooDeep(self.depth_max)
            return message

        await self.app(scope, receive_checked, send)
