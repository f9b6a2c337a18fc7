"""`/v1/settlements`: pay out what is payable to providers and award beneficiaries (one ledger entry per
batch of at most 63 payable accounts), and read the settlements made.

Settling is cross-program (a provider's payable account mixes every program's redemptions), so it takes
an admin key limited to no voucher type; auditors and every admin read. `POST` needs an `Idempotency-Key`:
its answer, `nothing_to_settle` included, is stored with the postings (`app.idempotency`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt

from app import idempotency
from app.apikeys import Caller
from app.dependencies import SessionDep, UnrestrictedAdminCaller, require_roles
from app.errors import domain_problem, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.roles import Role
from app.schemas import RequestModel, ResponseModel
from ledger.service import Ledger
from vouchers import settlements as service
from vouchers.settlements import ITEMS_PER_REQUEST_MAX, NothingToSettle, Settlement, SettlementRun

router = APIRouter(tags=["settlements"], responses=problem_responses(401, 403, 422))

ROUTE = "POST /v1/settlements"
_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
EntityId = Annotated[str, Field(pattern=r"^ent_[a-z0-9]{24}$")]
SettlementId = Annotated[str, Path(pattern=r"^stl_[a-z0-9]{24}$")]
Reader = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.AUDITOR))]


class SettlementIn(RequestModel):
    entity_ids: list[EntityId] | None = Field(
        default=None,
        min_length=1,
        max_length=ITEMS_PER_REQUEST_MAX,
        description="settle only these entities' payable accounts (default: every one with a positive balance)",
    )
    max_items: Annotated[StrictInt, Field(ge=1, le=ITEMS_PER_REQUEST_MAX)] | None = Field(
        default=None,
        description=f"settle at most this many payable accounts, in account order (default {ITEMS_PER_REQUEST_MAX})",
    )


class SettlementItemOut(ResponseModel):
    entity_id: str
    account: str
    amount_fen: int = Field(description="paid out to the entity")
    recovered_fen: int = Field(
        description="kept back against what the entity owed from clawbacks after an earlier settlement"
    )


class SettlementOut(ResponseModel):
    id: str
    entry_id: str
    total_fen: int = Field(description="paid out, the sum of the items' amount_fen")
    recovered_fen: int = Field(description="recovered by netting, the sum of the items' recovered_fen")
    items: list[SettlementItemOut]
    created_by: str | None
    created_at: datetime


class SettlementCreatedOut(SettlementOut):
    settlement_ids: list[str] = Field(
        description="every settlement this request made, in order, one per ledger entry (more than one only "
        "when over 63 accounts were settled); the first is the one described at the top level"
    )
    has_more: bool = Field(description="more was payable than max_items allowed: another request settles it")


def _out(settlement: Settlement) -> SettlementOut:
    return SettlementOut(
        id=settlement.id,
        entry_id=str(settlement.entry_id),
        total_fen=settlement.total_fen,
        recovered_fen=settlement.recovered_fen,
        items=[SettlementItemOut.model_validate(item, from_attributes=True) for item in settlement.items],
        created_by=settlement.created_by,
        created_at=settlement.created_at,
    )


def _created(run: SettlementRun) -> dict[str, Any]:
    first = _out(run.settlements[0])
    return SettlementCreatedOut(
        **first.model_dump(),
        settlement_ids=[s.id for s in run.settlements],
        has_more=run.has_more,
    ).model_dump(mode="json")


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


@router.post(
    "/settlements",
    status_code=status.HTTP_201_CREATED,
    summary="Settle what is payable now: each payable account to treasury:disbursed, one entry per batch",
    response_model=SettlementCreatedOut,
    responses=problem_responses(409),
)
async def create_settlement(
    request: Request,
    session: SessionDep,
    caller: UnrestrictedAdminCaller,
    key: idempotency.IdempotencyKeyHeader,
    body: SettlementIn | None = None,
) -> JSONResponse:
    body = body or SettlementIn()
    conn = await session.connection()
    request_hash = idempotency.request_hash(ROUTE, body.model_dump(mode="json"))
    stored = await idempotency.replay_or_none(
        conn, caller_key_id=caller.key_id, key=key, route=ROUTE, request_hash=request_hash
    )
    if stored is not None:
        await session.rollback()  # nothing was written; end the transaction and its key lock now
        return idempotency.response(stored)
    try:
        run = await service.settle(
            conn,
            _ledger(request),
            entity_ids=body.entity_ids,
            items_max=body.max_items or ITEMS_PER_REQUEST_MAX,
            actor=caller.key_id,
            now=datetime.now(UTC),
        )
    except NothingToSettle as exc:  # raised before anything is written: an answer to keep, like any other
        answer = domain_problem(exc)
        assert answer is not None, "NothingToSettle is mapped in app.errors.DOMAIN_ERRORS"
        stored = idempotency.Stored(*answer)
    else:
        stored = idempotency.Stored(status.HTTP_201_CREATED, _created(run))
    await idempotency.remember(
        conn,
        caller_key_id=caller.key_id,
        key=key,
        route=ROUTE,
        request_hash=request_hash,
        status_code=stored.status_code,
        body=stored.body,
    )
    await session.commit()
    return idempotency.response(stored)


@router.get("/settlements", summary="Settlements, oldest first; `entity_id` keeps those paying that entity")
async def list_settlements(
    session: SessionDep,
    caller: Reader,
    page: PageDep,
    entity_id: Annotated[str | None, Query(pattern=r"^ent_[a-z0-9]{24}$")] = None,
) -> Page[SettlementOut]:
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    rows = await service.list_settlements(
        await session.connection(), after=after, limit=page.limit + 1, entity_id=entity_id
    )
    rows, next_cursor = split_page(rows, page.limit, lambda s: _CURSOR.encode((s.created_at, s.id)))
    return Page(data=[_out(s) for s in rows], next_cursor=next_cursor)


@router.get("/settlements/{settlement_id}", summary="One settlement and its items", responses=problem_responses(404))
async def get_settlement(settlement_id: SettlementId, session: SessionDep, caller: Reader) -> SettlementOut:
    return _out(await service.get_settlement(await session.connection(), settlement_id))
