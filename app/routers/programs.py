"""`/v1/programs`: the program definitions in force, and program-year budgets (art. 27)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from app.dependencies import AdminCaller, AdminOrAuditorCaller, CallerDep, SessionDep
from app.errors import Forbidden, problem_responses
from app.schemas import Fen, RequestModel, ResponseModel
from ledger.service import Ledger
from vouchers import budgets
from vouchers.catalog import Catalog
from vouchers.programs import ProgramCode
from vouchers.rules import program_year

router = APIRouter(prefix="/programs", tags=["programs"], responses=problem_responses(401, 403, 422))

Year = Annotated[int, Path(ge=2000, le=2100, description="program year (calendar year in Asia/Shanghai)")]


class ProgramsOut(ResponseModel):
    year: int
    data: list[dict[str, Any]]


class BudgetIn(RequestModel):
    amount_fen: Fen


class BudgetOut(ResponseModel):
    program: str
    year: int
    budget_fen: int
    committed_fen: int
    available_fen: int


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


@router.get("", summary="The program definitions governing a year (default: this year in Asia/Shanghai)")
async def list_programs(
    request: Request,
    _caller: CallerDep,
    year: Annotated[int | None, Query(ge=2000, le=2100)] = None,
) -> ProgramsOut:
    year = year if year is not None else program_year(datetime.now(UTC))
    return ProgramsOut(year=year, data=[d.model_dump(mode="json") for d in _catalog(request).current(year)])


@router.put(
    "/{code}/budgets/{year}",
    summary="Set a program-year budget from that year's appropriation",
    responses=problem_responses(404, 409),
)
async def put_budget(
    request: Request, code: ProgramCode, year: Year, body: BudgetIn, session: SessionDep, caller: AdminCaller
) -> BudgetOut:
    catalog = _catalog(request)
    definition = catalog.for_year(code, year)
    if not caller.administers(definition.voucher_type):
        raise Forbidden(f"this key does not administer {definition.voucher_type} programs")
    conn = await session.connection()
    state = await budgets.set_budget(
        conn,
        _ledger(request),
        catalog,
        code=code,
        year=year,
        amount_fen=body.amount_fen,
        appropriation_fen=request.app.state.settings.appropriation_fen,
        actor=caller.key_id,
    )
    await session.commit()
    return BudgetOut.model_validate(state, from_attributes=True)


@router.get("/{code}/budgets/{year}", summary="A program-year budget", responses=problem_responses(404))
async def get_budget(
    request: Request, code: ProgramCode, year: Year, session: SessionDep, _caller: AdminOrAuditorCaller
) -> BudgetOut:
    _catalog(request).for_year(code, year)
    conn = await session.connection()
    state = await budgets.budget_state(conn, _ledger(request), code, year)
    return BudgetOut.model_validate(state, from_attributes=True)
