"""Building blocks of request and response bodies.

Request bodies forbid unknown fields (a misspelt optional field must not be silently ignored), and money is
a strict integer of fen: `true`, `1.0` and `"1"` are all `422 validation_error`, never coerced.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, model_validator

# A bound on every amount: 10^15 fen is ten trillion yuan, far above any programme budget, and far enough
# below bigint's 9.2e18 that sums of many amounts cannot overflow in the database.
FEN_MAX = 10**15

Fen = Annotated[StrictInt, Field(ge=0, le=FEN_MAX, description="integer fen (0.01 CNY)")]
PositiveFen = Annotated[StrictInt, Field(gt=0, le=FEN_MAX, description="integer fen (0.01 CNY), above zero")]

_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _rfc3339_text(value: object) -> object:
    """RFC 3339 text and nothing else: pydantic alone takes a number (`0.5`) as seconds since 1970."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("a time is RFC 3339 with an offset, e.g. 2027-01-01T08:00:00+08:00")
    return value


# A moment as API.md writes times: RFC 3339 with an offset
Rfc3339Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


def _has_nul(value: object) -> bool:
    """Whether any text in `value`, a key or a value at any depth, holds a NUL. A walk with a list of its
    own, not the stack: how deep a document nests must not decide whether this check fails."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


class RequestModel(BaseModel):
    """Base of every request body. No text in it holds a NUL (U+0000), at any depth (free-form parts such
    as an application's basis included): PostgreSQL cannot store one, and would fail the request late."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _has_nul(data):
            raise ValueError("text may not contain NUL (U+0000)")
        return data


class ResponseModel(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(from_attributes=True)
