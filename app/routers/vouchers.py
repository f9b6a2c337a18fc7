"""`/v1/vouchers` (read, revoke), `/v1/entities/{id}/balances`, and `/v1/applications/{id}/reverse`
(clawback of an issued award, 就高不重复 art. 25).

Admins and auditors read every voucher and balance; an enterprise key reads the vouchers its entity holds
and that entity's balances (another entity's voucher is `404 not_found`); provider keys read no vouchers
here (they redeem with tokens). Revoking and reversing take an admin of the program's voucher type.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncConnection

from app.apikeys import Caller
from app.commands import run_command
from app.dependencies import CallerDep, SessionDep, require_roles
from app.errors import Forbidden, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.roles import Role
from app.schemas import RequestModel, ResponseModel
from ledger.service import Ledger
from vouchers import vouchers as service
from vouchers.applications import ApplicationNotFound
from vouchers.catalog import Catalog
from vouchers.entities import EntityNotFound
from vouchers.programs import ProgramCode
from vouchers.rules import program_year
from vouchers.sanctions import Grounds
from vouchers.vouchers import Voucher, VoucherNotFound, VoucherStatus

router = APIRouter(tags=["vouchers"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
VoucherId = Annotated[str, Path(pattern=r"^vch_[a-z0-9]{24}$")]
EntityIdPath = Annotated[str, Path(pattern=r"^ent_[a-z0-9]{24}$")]
ApplicationId = Annotated[str, Path(pattern=r"^app_[a-z0-9]{24}$")]
Reader = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.AUDITOR, Role.ENTERPRISE))]
Admin = Annotated[Caller, Depends(require_roles(Role.ADMIN))]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", min_length=1, max_length=255, description="optional: a retry gets the first answer"
    ),
]


class VoucherOut(ResponseModel):
    id: str
    program: str
    holder_entity_id: str
    status: VoucherStatus
    face_value_fen: int
    available_fen: int
    held_fen: int
    redeemed_fen: int
    released_fen: int
    expires_at: datetime
    year: int
    application_id: str
    vendor_entity_id: str | None
    redemption_rate_bp: int
    created_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    revocation_grounds: Grounds | None = Field(description="revoked vouchers: administrative or misconduct")
    misconduct_sanction_id: str | None = Field(
        description="misconduct was found on this voucher (art. 25): its whole face value stays used against the "
        "cap, and value clawed back from it goes to the program budget"
    )


GROUNDS_DESCRIPTION = (
    "`administrative` (an error, or the applicant's choice of a higher award, 就高): the cap room comes back and "
    "the basis documents are freed. `misconduct` (fraud, misuse, false documents): the cap room stays used, the "
    "documents stay claimed for good, and the beneficiary is sanctioned (no new award for `sanction_years`, art. 25)"
)


class RevokeIn(RequestModel):
    reason: Reason | None = None
    grounds: Grounds = Field(description=GROUNDS_DESCRIPTION)


class ReverseIn(RequestModel):
    reason: Reason
    grounds: Grounds = Field(description=GROUNDS_DESCRIPTION)


class ReversalOut(ResponseModel):
    application_id: str
    status: Literal["reversed"] = "reversed"
    program: str
    holder_entity_id: str
    year: int
    kind: Literal["voucher", "payout"]
    award_id: str
    award_fen: int
    returned_fen: int
    entry_id: str | None
    reason: str
    reversed_at: datetime
    grounds: Grounds
    released_documents: list[str] = Field(description="administrative grounds: free to support another award")
    kept_documents: list[str] = Field(description="misconduct: claimed for good")
    sanction_id: str | None = Field(description="misconduct: the sanction recorded against the applicant")
    voucher: VoucherOut | None


class ProgramBalanceOut(ResponseModel):
    program: str
    year: int
    cap_fen: int
    cap_applies_to: str
    cap_used_fen: int
    issued_fen: int
    available_fen: int
    held_fen: int
    redeemed_fen: int
    released_fen: int
    paid_fen: int
    vouchers: int
    payouts: int


class BalancesOut(ResponseModel):
    entity_id: str
    year: int
    data: list[ProgramBalanceOut]


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _out(voucher: Voucher) -> VoucherOut:
    return VoucherOut.model_validate(voucher, from_attributes=True)


def _may_administer(caller: Caller, catalog: Catalog, program: str, year: int) -> None:
    if not caller.administers(catalog.for_year(program, year).voucher_type):
        raise Forbidden(f"this key does not administer {program}")


@router.get("/vouchers", summary="Vouchers, oldest first; an enterprise key sees the ones its entity holds")
async def list_vouchers(
    request: Request,
    session: SessionDep,
    caller: Reader,
    page: PageDep,
    holder_entity_id: Annotated[str | None, Query(pattern=r"^ent_[a-z0-9]{24}$")] = None,
    program: ProgramCode | None = None,
    year: Annotated[int | None, Query(ge=2000, le=2100)] = None,
    voucher_status: Annotated[VoucherStatus | None, Query(alias="status")] = None,
) -> Page[VoucherOut]:
    if caller.role is Role.ENTERPRISE:
        if holder_entity_id not in (None, caller.entity_id):
            return Page(data=[], next_cursor=None)  # another holder's vouchers do not exist for this key
        holder_entity_id = caller.entity_id
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    rows = await service.list_vouchers(
        await session.connection(),
        _ledger(request),
        now=datetime.now(UTC),
        after=after,
        limit=page.limit + 1,
        holder_entity_id=holder_entity_id,
        program=program,
        year=year,
        status=voucher_status,
    )
    rows, next_cursor = split_page(rows, page.limit, lambda v: _CURSOR.encode((v.created_at, v.id)))
    return Page(data=[_out(v) for v in rows], next_cursor=next_cursor)


@router.get("/vouchers/{voucher_id}", summary="One voucher and what it holds", responses=problem_responses(404))
async def get_voucher(request: Request, voucher_id: VoucherId, session: SessionDep, caller: Reader) -> VoucherOut:
    voucher = await service.get_voucher(await session.connection(), _ledger(request), voucher_id, now=datetime.now(UTC))
    if caller.role is Role.ENTERPRISE and voucher.holder_entity_id != caller.entity_id:
        raise VoucherNotFound(f"no voucher {voucher_id}")
    return _out(voucher)


@router.post(
    "/vouchers/{voucher_id}/revoke",
    summary="Revoke, on administrative or misconduct grounds: the available value returns to the program budget; "
    "holds in flight stay reserved; misconduct sanctions the holder",
    responses=problem_responses(404, 409),
    response_model=VoucherOut,
)
async def revoke_voucher(
    request: Request,
    voucher_id: VoucherId,
    session: SessionDep,
    caller: Admin,
    body: RevokeIn,
    key: IdempotencyKey = None,
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        now = datetime.now(UTC)
        current = await service.get_voucher(conn, _ledger(request), voucher_id, now=now)
        _may_administer(caller, _catalog(request), current.program, current.year)
        voucher = await service.revoke(
            conn,
            _ledger(request),
            voucher_id=voucher_id,
            reason=body.reason,
            grounds=body.grounds,
            actor=caller.key_id,
            sanction_years=_catalog(request).policy.sanction_years,
            now=now,
        )
        return 200, _out(voucher).model_dump(mode="json")

    return await run_command(session, caller, key, f"POST /v1/vouchers/{voucher_id}/revoke", body, command)


@router.get(
    "/entities/{entity_id}/balances",
    summary="Per program: cap, cap used, available, held, redeemed and paid in a year (default: this year)",
    responses=problem_responses(404),
)
async def balances(
    request: Request,
    entity_id: EntityIdPath,
    session: SessionDep,
    caller: CallerDep,
    year: Annotated[int | None, Query(ge=2000, le=2100, description="program year (Asia/Shanghai)")] = None,
) -> BalancesOut:
    if caller.role not in (Role.ADMIN, Role.AUDITOR) and caller.entity_id != entity_id:
        raise EntityNotFound(f"no entity {entity_id}")  # answered exactly as a missing entity
    now = datetime.now(UTC)
    year = year if year is not None else program_year(now)
    rows = await service.entity_balances(
        await session.connection(), _ledger(request), _catalog(request), entity_id=entity_id, year=year, now=now
    )
    return BalancesOut(
        entity_id=entity_id,
        year=year,
        data=[ProgramBalanceOut.model_validate(r, from_attributes=True) for r in rows],
    )


@router.post(
    "/applications/{application_id}/reverse",
    summary="Reverse an issued award (clawback): revoke its voucher or undo its payout; administrative grounds "
    "release its basis, misconduct keeps it claimed and sanctions the applicant",
    responses=problem_responses(404, 409),
    response_model=ReversalOut,
)
async def reverse_award(
    request: Request,
    application_id: ApplicationId,
    body: ReverseIn,
    session: SessionDep,
    caller: Admin,
    key: IdempotencyKey = None,
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        found = await service.application_program(conn, application_id)
        if found is None:
            raise ApplicationNotFound(f"no application {application_id}")
        _may_administer(caller, _catalog(request), *found)
        reversal = await service.reverse_award(
            conn,
            _ledger(request),
            application_id=application_id,
            reason=body.reason,
            grounds=body.grounds,
            actor=caller.key_id,
            sanction_years=_catalog(request).policy.sanction_years,
            now=datetime.now(UTC),
        )
        out = ReversalOut(
            application_id=reversal.application_id,
            program=reversal.program,
            holder_entity_id=reversal.holder_entity_id,
            year=reversal.year,
            kind=reversal.kind,
            award_id=reversal.award_id,
            award_fen=reversal.award_fen,
            returned_fen=reversal.returned_fen,
            entry_id=None if reversal.entry_id is None else str(reversal.entry_id),
            reason=reversal.reason,
            reversed_at=reversal.reversed_at,
            grounds=reversal.grounds,
            released_documents=list(reversal.released_documents),
            kept_documents=list(reversal.kept_documents),
            sanction_id=None if reversal.sanction is None else reversal.sanction.id,
            voucher=None if reversal.voucher is None else _out(reversal.voucher),
        )
        return 200, out.model_dump(mode="json")

    return await run_command(session, caller, key, f"POST /v1/applications/{application_id}/reverse", body, command)
