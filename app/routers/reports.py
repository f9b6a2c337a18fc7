"""Reports: `GET /v1/reports/programs/{code}/{year}` (admins and auditors) and
`GET /v1/entities/{id}/statement?year=` (the entity's own keys, admins, auditors; another entity is 404).

Each report is read in one REPEATABLE READ snapshot on a connection of its own, so the ledger and the
voucher and payout rows it combines are of one moment and its figures reconcile exactly (see
vouchers/reports.py for the definitions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.dependencies import AdminOrAuditorCaller, CallerDep
from app.errors import problem_responses
from app.pagination import Cursor, PageDep, split_page
from app.roles import Role
from app.routers.sanctions import SanctionOut
from app.schemas import ResponseModel
from ledger.service import Ledger
from vouchers import reports
from vouchers.catalog import Catalog
from vouchers.entities import EntityNotFound
from vouchers.programs import ProgramCode
from vouchers.rules import program_year

router = APIRouter(tags=["reports"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, int, str]] = Cursor(tuple[datetime, int, str])
Year = Annotated[int, Path(ge=2000, le=2100, description="program year (calendar year in Asia/Shanghai)")]
EntityIdPath = Annotated[str, Path(pattern=r"^ent_[a-z0-9]{24}$")]


class AwardCountsOut(ResponseModel):
    issued: int
    reversed: int
    in_notice: int
    vouchers: int
    payouts: int
    reversed_misconduct: int = Field(description="of `reversed`, those reversed for misconduct (art. 25)")


class VoucherCountsOut(ResponseModel):
    active: int
    expired: int
    revoked: int
    total: int
    revoked_misconduct: int = Field(description="of `revoked`, those revoked for misconduct (art. 25)")
    misconduct: int = Field(description="vouchers on which misconduct was found (their face value stays used)")


class ProgramReportOut(ResponseModel):
    program: str
    year: int
    as_of: datetime
    budget_fen: int
    issued_fen: int
    released_fen: int
    in_notice_fen: int
    committed_fen: int
    available_fen: int
    paid_out_fen: int
    redeemed_fen: int
    held_fen: int
    unspent_fen: int
    returning_fen: int
    awards: AwardCountsOut
    vouchers: VoucherCountsOut


class StatementAccountOut(ResponseModel):
    account: str
    voucher_id: str | None
    opening_balance_fen: int
    in_fen: int
    out_fen: int
    closing_balance_fen: int
    opening_pending_fen: int
    closing_pending_fen: int


class StatementLineOut(ResponseModel):
    entry_id: str
    created_at: datetime
    kind: str
    memo: str
    account: str
    in_fen: int
    out_fen: int
    balance_fen: int
    pending_change_fen: int
    pending_fen: int


class StatementOut(ResponseModel):
    entity_id: str
    year: int
    period_from: datetime
    period_to: datetime
    accounts: list[StatementAccountOut]
    sanctions: list[SanctionOut] = Field(description="every sanction decided against the entity (art. 25)")
    data: list[StatementLineOut]
    next_cursor: str | None


@asynccontextmanager
async def _snapshot(request: Request) -> AsyncIterator[AsyncConnection]:
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        yield conn


@router.get(
    "/reports/programs/{code}/{year}",
    summary="A program-year: budget, committed, redeemed, paid out, released, available; awards and vouchers",
    responses=problem_responses(404),
)
async def program_report(
    request: Request, code: ProgramCode, year: Year, _caller: AdminOrAuditorCaller
) -> ProgramReportOut:
    catalog: Catalog = request.app.state.catalog
    catalog.for_year(code, year)  # a year outside the policy term is 422 outside_policy_term
    ledger: Ledger = request.app.state.ledger
    async with _snapshot(request) as conn:
        report = await reports.program_report(conn, ledger, program=code, year=year, now=datetime.now(UTC))
    return ProgramReportOut.model_validate(report)


@router.get(
    "/entities/{entity_id}/statement",
    summary="Every movement of a year (Asia/Shanghai) on the entity's payable account and its vouchers",
    responses=problem_responses(404),
)
async def entity_statement(
    request: Request,
    entity_id: EntityIdPath,
    caller: CallerDep,
    page: PageDep,
    year: Annotated[int | None, Query(ge=2000, le=2100, description="calendar year in Asia/Shanghai")] = None,
) -> StatementOut:
    if caller.role not in (Role.ADMIN, Role.AUDITOR) and caller.entity_id != entity_id:
        raise EntityNotFound(f"no entity {entity_id}")  # answered exactly as a missing entity
    year = year if year is not None else program_year(datetime.now(UTC))
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    async with _snapshot(request) as conn:
        found = await reports.statement(conn, entity_id=entity_id, year=year, after=after, limit=page.limit + 1)
    lines, next_cursor = split_page(
        found.lines, page.limit, lambda line: _CURSOR.encode((line.created_at, line.entry_id, line.account))
    )
    return StatementOut(
        entity_id=found.entity_id,
        year=found.year,
        period_from=found.period_from,
        period_to=found.period_to,
        accounts=[StatementAccountOut.model_validate(a) for a in found.accounts],
        sanctions=[SanctionOut.of(s) for s in found.sanctions],
        data=[
            StatementLineOut(
                entry_id=str(line.entry_id),
                created_at=line.created_at,
                kind=line.kind,
                memo=line.memo,
                account=line.account,
                in_fen=line.in_fen,
                out_fen=line.out_fen,
                balance_fen=line.balance_fen,
                pending_change_fen=line.pending_change_fen,
                pending_fen=line.pending_fen,
            )
            for line in lines
        ],
        next_cursor=next_cursor,
    )
