"""Building blocks of request and response bodies.

Request bodies forbid unknown fields (a misspelt optional field must not be silently ignored), and money is
a strict integer of fen: `true`, `1.0` and `"1"` are all `422 validation_error`, never coerced.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# A bound on every amount: 10^15 fen is ten trillion yuan, far above any programme budget, and far enough
# below bigint's 9.2e18 that sums of many amounts cannot overflow in the database.
FEN_MAX = 10**15

Fen = Annotated[StrictInt, Field(ge=0, le=FEN_MAX, description="integer fen (0.01 CNY)")]
PositiveFen = Annotated[StrictInt, Field(gt=0, le=FEN_MAX, description="integer fen (0.01 CNY), above zero")]


class RequestModel(BaseModel):
    """Base of every request body."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    """Base of every response body."""

    model_config = ConfigDict(from_attributes=True)
