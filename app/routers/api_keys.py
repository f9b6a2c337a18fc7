"""`/v1/api-keys`: create (the key is shown once), list, revoke. Admins limited to no voucher type only: a key
bound to an entity acts in every program, so handing one out is not within a program (API.md, "Admin scope")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from app.apikeys import (
    ApiKey,
    ApiKeyAuthenticator,
    ApiKeyCreate,
    VoucherType,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from app.dependencies import SessionDep, UnrestrictedAdminCaller
from app.errors import problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.roles import Role
from app.schemas import ResponseModel

router = APIRouter(prefix="/api-keys", tags=["api keys"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])


class ApiKeyOut(ResponseModel):
    id: str
    prefix: str
    role: Role
    entity_id: str | None
    voucher_types: list[VoucherType] | None
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str


def _out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut.model_validate(row)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key; the response is the only place the key ever appears",
)
async def create(body: ApiKeyCreate, session: SessionDep, _caller: UnrestrictedAdminCaller) -> ApiKeyCreated:
    row, key = await create_api_key(session, body)
    await session.commit()
    return ApiKeyCreated(**_out(row).model_dump(), key=key)


@router.get("", summary="List API keys, newest first (never the key or its hash)")
async def list_keys(session: SessionDep, _caller: UnrestrictedAdminCaller, page: PageDep) -> Page[ApiKeyOut]:
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    rows = await list_api_keys(session, after=after, limit=page.limit + 1)
    rows, next_cursor = split_page(rows, page.limit, lambda row: _CURSOR.encode((row.created_at, row.id)))
    return Page[ApiKeyOut](data=[_out(row) for row in rows], next_cursor=next_cursor)


@router.delete(
    "/{id}",
    summary="Revoke an API key: 200 with its record, now with `revoked_at` (revoking twice changes nothing)",
    responses=problem_responses(404),
)
async def revoke(
    id: Annotated[str, Path(max_length=64)],
    request: Request,
    session: SessionDep,
    _caller: UnrestrictedAdminCaller,
) -> ApiKeyOut:
    row = await revoke_api_key(session, id)
    await session.commit()
    authenticator: ApiKeyAuthenticator = request.app.state.api_keys
    authenticator.forget(row.prefix)
    return _out(row)
