"""Cursor pagination: `?limit=&cursor=` in, `{"data": [...], "next_cursor": ...}` out.

A cursor is opaque to clients: the base64url of the JSON of the last row's sort key (keyset pagination, so
a page costs an index range scan however deep it is). A route declares the shape of its key once:

    _CURSOR = Cursor(tuple[datetime, str])                      # (created_at, id)

    @router.get("/things")
    async def list_things(session: SessionDep, page: PageDep) -> Page[ThingOut]:
        after = _CURSOR.decode(page.cursor) if page.cursor else None   # bad cursor: 422
        rows = await repository.list_things(session, after=after, limit=page.limit + 1)
        rows, next_cursor = split_page(rows, page.limit, lambda r: _CURSOR.encode((r.created_at, r.id)))
        return Page(data=[ThingOut.model_validate(r) for r in rows], next_cursor=next_cursor)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query, Request
from pydantic import BaseModel, TypeAdapter, ValidationError

from app.errors import ValidationFailed

T = TypeVar("T")
R = TypeVar("R")
ItemT = TypeVar("ItemT")

LIMIT_DEFAULT = 50
CURSOR_LENGTH_MAX = 1024


class Cursor(Generic[T]):
    """Encodes a sort key of shape `T` as an opaque cursor and decodes it back, validated."""

    def __init__(self, shape: Any) -> None:
        self._adapter: TypeAdapter[T] = TypeAdapter(shape)

    def encode(self, key: T) -> str:
        return base64.urlsafe_b64encode(self._adapter.dump_json(key)).rstrip(b"=").decode("ascii")

    def decode(self, cursor: str) -> T:
        """The key inside `cursor`; `422 validation_error` when it is not one this route produced."""
        try:
            raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
            return self._adapter.validate_json(raw)
        except (ValueError, binascii.Error, ValidationError):
            raise ValidationFailed(
                "cursor is not valid: pass next_cursor back unchanged", loc=("query", "cursor")
            ) from None


@dataclass(frozen=True, slots=True)
class PageParams:
    limit: int
    cursor: str | None


async def page_params(
    request: Request,
    limit: Annotated[
        int | None, Query(description=f"page size, default {LIMIT_DEFAULT}, at most the server's page limit")
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=CURSOR_LENGTH_MAX, description="`next_cursor` of the previous page")
    ] = None,
) -> PageParams:
    limit_max: int = request.app.state.settings.page_limit_max
    if limit is None:
        limit = min(LIMIT_DEFAULT, limit_max)
    elif not 1 <= limit <= limit_max:
        raise ValidationFailed(f"limit must be between 1 and {limit_max}", loc=("query", "limit"))
    return PageParams(limit=limit, cursor=cursor or None)


PageDep = Annotated[PageParams, Depends(page_params)]


class Page(BaseModel, Generic[ItemT]):
    data: list[ItemT]
    next_cursor: str | None


def split_page(rows: Sequence[R], limit: int, cursor_of: Callable[[R], str]) -> tuple[list[R], str | None]:
    """`rows` are up to `limit + 1` rows in page order: the page, and the cursor of its last row when more
    rows follow (the extra row only says that there is a next page)."""
    if len(rows) <= limit:
        return list(rows), None
    page = list(rows[:limit])
    return page, cursor_of(page[-1])
