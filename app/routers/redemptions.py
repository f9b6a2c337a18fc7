"""`/v1/redemptions` and `/v1/holds`: providers redeem voucher tokens, exactly once, never beyond a balance.

Every command here takes an `Idempotency-Key` and stores its answer in the same transaction as its
postings: the same key and body gets the first answer again (same ids, nothing new posted), forever; a
refusal is an answer too, so a refused redemption stays refused; a different body is `422
idempotency_conflict`. The command itself runs inside a savepoint, so a refusal leaves nothing behind but
its stored answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StringConstraints
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app import idempotency
from app.apikeys import Caller
from app.commands import run_idempotent
from app.db import invalidate_if_lost
from app.dependencies import SessionDep, require_roles
from app.errors import PROBLEM_MEDIA_TYPE, Forbidden, domain_problem, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.policy_tasks import affiliation_checker, thresholds_of
from app.ratelimit import RedemptionRate
from app.roles import Role
from app.schemas import PositiveFen, RequestModel, ResponseModel
from vouchers import redemption as service
from vouchers.programs import Category
from vouchers.redemption import HOLD_DEFAULT_S, HOLD_MAX_S, Hold, Line, Presented, Redemption
from vouchers.sanctions import Grounds
from vouchers.tokens import verify_token

router = APIRouter(tags=["redemptions"], responses=problem_responses(401, 403, 422))

Provider = Annotated[Caller, Depends(require_roles(Role.PROVIDER))]
Admin = Annotated[Caller, Depends(require_roles(Role.ADMIN))]
Reader = Annotated[Caller, Depends(require_roles(Role.PROVIDER, Role.ENTERPRISE, Role.ADMIN, Role.AUDITOR))]
IdempotencyKey = idempotency.IdempotencyKeyHeader
RedemptionId = Annotated[str, Path(pattern=r"^rdm_[a-z0-9]{24}$")]
HoldId = Annotated[str, Path(pattern=r"^hld_[a-z0-9]{24}$")]
_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
REDEEM_ROUTE = "POST /v1/redemptions"
_PROGRAM_OF = text("SELECT program, year FROM voucher WHERE id = :v")
Token = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
InvoiceNo = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class LineIn(RequestModel):
    category: Category
    amount_fen: PositiveFen
    description: Annotated[str, StringConstraints(max_length=500)] = ""


class RedemptionIn(RequestModel):
    token: Token
    invoice_no: InvoiceNo
    lines: list[LineIn] = Field(min_length=1, max_length=500)


class HoldIn(RequestModel):
    token: Token
    amount_fen: PositiveFen
    expires_in_s: int = Field(default=HOLD_DEFAULT_S, ge=1, le=HOLD_MAX_S)


class CaptureIn(RequestModel):
    invoice_no: InvoiceNo
    lines: list[LineIn] = Field(min_length=1, max_length=500)


class RefundIn(RequestModel):
    amount_fen: PositiveFen | None = None
    reason: Reason


class ReverseIn(RequestModel):
    reason: Reason
    grounds: Grounds = Field(
        description="`administrative`: the value goes back to the voucher (or the budget once it has ended). "
        "`misconduct`: the voucher's holder is sanctioned (art. 25) and the value goes to the program budget, "
        "never back to the voucher"
    )


class RedemptionOut(ResponseModel):
    id: str
    voucher_id: str
    provider_entity_id: str
    invoice_no: str
    eligible_fen: int
    subsidy_fen: int
    holder_pays_fen: int
    excluded: list[dict[str, Any]]
    lines: list[dict[str, Any]]
    refunded_fen: int
    reversed_at: datetime | None
    hold_id: str | None
    created_at: datetime


class HoldOut(ResponseModel):
    id: str
    voucher_id: str
    amount_fen: int
    status: str
    expires_at: datetime


def _redemption_out(redemption: Redemption) -> dict[str, Any]:
    return RedemptionOut.model_validate(redemption, from_attributes=True).model_dump(mode="json")


def _hold_out(hold: Hold) -> dict[str, Any]:
    return HoldOut.model_validate(hold, from_attributes=True).model_dump(mode="json")


async def _presented(request: Request, conn: AsyncConnection, token: str, caller: Caller) -> Presented:
    assert caller.entity_id is not None
    verified = await verify_token(
        conn, request.app.state.keyring, token, caller_entity_id=caller.entity_id, now=datetime.now(UTC)
    )
    return Presented(verified.jti, verified.voucher_id, verified.holder_entity_id, verified.max_amount_fen)


def _lines(lines: list[LineIn]) -> list[Line]:
    return [Line(line.category, line.amount_fen, line.description) for line in lines]


@router.post(
    "/redemptions",
    status_code=status.HTTP_201_CREATED,
    summary="Redeem a voucher token against an invoice: the program's share of the eligible lines",
    responses=problem_responses(404, 409, 429),
    dependencies=[RedemptionRate],
    response_model=RedemptionOut,
)
async def redeem(request: Request, body: RedemptionIn, caller: Provider, key: IdempotencyKey) -> Response:
    """One database round trip when the token and the affiliation graph are cached (`voucher_redeem`,
    vouchers/sql/voucher_redeem.sql): the answer, created or stored, comes back as the JSON the database stored."""
    status_code, media_type, content = await redemption_answer(request.app.state, caller, key, body)
    return Response(content, status_code=status_code, media_type=media_type)


async def redemption_answer(state: Any, caller: Caller, key: str, body: RedemptionIn) -> tuple[int, str, bytes]:
    """The answer to `POST /v1/redemptions` from an authenticated provider, as (status, media type, body):
    created, replayed, or a refusal. A refusal writes nothing; its problem document is stored under the key
    afterwards, unless a concurrent twin's answer was stored first, which is then the answer. Shared by the
    route and the app's fast path (`app.fastpath`), which must answer alike."""
    assert caller.entity_id is not None
    fingerprint = idempotency.request_hash(REDEEM_ROUTE, body.model_dump(mode="json"))
    try:
        outcome = await service.redeem_at_once(
            state.engine,
            keyring=state.keyring,
            catalog=state.catalog,
            thresholds=thresholds_of(state.settings),
            cache=state.redeemables,
            caller_key_id=caller.key_id,
            idempotency_key=key,
            route=REDEEM_ROUTE,
            request_hash=fingerprint,
            token=body.token,
            provider_entity_id=caller.entity_id,
            invoice_no=body.invoice_no,
            lines=_lines(body.lines),
            now=datetime.now(UTC),
            on_error=invalidate_if_lost,  # a connection lost under a raw statement is not handed out again
            batcher=state.redeem_batcher,
        )
    except Exception as exc:
        answer = domain_problem(exc)
        if answer is None or answer[0] >= 500:
            raise
        async with state.engine.connect() as conn:
            stored = await idempotency.remember_unless_answered(
                conn,
                caller_key_id=caller.key_id,
                key=key,
                route=REDEEM_ROUTE,
                request_hash=fingerprint,
                status_code=answer[0],
                body=answer[1],
            )
        response = idempotency.response(stored)
        return response.status_code, response.media_type or PROBLEM_MEDIA_TYPE, bytes(response.body)
    if outcome.kind == "key_reused":
        raise idempotency.IdempotencyKeyReused(idempotency.KEY_REUSED)
    if outcome.kind == "in_progress":
        raise idempotency.RequestInProgress(idempotency.IN_PROGRESS)
    media_type = "application/json" if outcome.status_code < 400 else PROBLEM_MEDIA_TYPE
    body_text = outcome.body
    return outcome.status_code, media_type, body_text.encode() if isinstance(body_text, str) else bytes(body_text)


@router.post(
    "/holds",
    status_code=status.HTTP_201_CREATED,
    summary="Reserve subsidy for metered work (default 24 h, at most 7 days)",
    responses=problem_responses(404, 409, 429),
    dependencies=[RedemptionRate],
    response_model=HoldOut,
)
async def hold(
    request: Request, body: HoldIn, session: SessionDep, caller: Provider, key: IdempotencyKey
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        assert caller.entity_id is not None
        presented = await _presented(request, conn, body.token, caller)
        held = await service.create_hold(
            conn,
            request.app.state.ledger,
            request.app.state.catalog,
            affiliation_checker(request.app.state.settings, session),
            presented,
            provider_entity_id=caller.entity_id,
            amount_fen=body.amount_fen,
            expires_in_s=body.expires_in_s,
            now=datetime.now(UTC),
        )
        return 201, _hold_out(held)

    return await run_idempotent(session, caller, key, "POST /v1/holds", body, command)


@router.post(
    "/holds/{hold_id}/capture",
    status_code=status.HTTP_201_CREATED,
    summary="Capture a hold with the final invoice: a redemption capped by the hold; the rest is released",
    responses=problem_responses(404, 409, 429),
    dependencies=[RedemptionRate],
    response_model=RedemptionOut,
)
async def capture(
    request: Request, hold_id: HoldId, body: CaptureIn, session: SessionDep, caller: Provider, key: IdempotencyKey
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        assert caller.entity_id is not None
        redemption = await service.capture_hold(
            conn,
            request.app.state.ledger,
            request.app.state.catalog,
            affiliation_checker(request.app.state.settings, session),
            hold_id=hold_id,
            provider_entity_id=caller.entity_id,
            invoice_no=body.invoice_no,
            lines=_lines(body.lines),
            now=datetime.now(UTC),
        )
        return 201, _redemption_out(redemption)

    return await run_idempotent(session, caller, key, f"POST /v1/holds/{hold_id}/capture", body, command)


@router.post(
    "/holds/{hold_id}/void",
    summary="Release a hold entirely",
    responses=problem_responses(404, 409),
    response_model=HoldOut,
)
async def void(
    request: Request, hold_id: HoldId, session: SessionDep, caller: Provider, key: IdempotencyKey
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        assert caller.entity_id is not None
        voided = await service.void_hold(
            conn,
            request.app.state.ledger,
            hold_id=hold_id,
            provider_entity_id=caller.entity_id,
            now=datetime.now(UTC),
        )
        return 200, _hold_out(voided)

    return await run_idempotent(session, caller, key, f"POST /v1/holds/{hold_id}/void", None, command)


@router.post(
    "/redemptions/{redemption_id}/refund",
    summary="The provider that redeemed returns value for work not delivered; it goes back to the voucher",
    responses=problem_responses(404, 409),
    response_model=RedemptionOut,
)
async def refund(
    request: Request,
    redemption_id: RedemptionId,
    body: RefundIn,
    session: SessionDep,
    caller: Provider,
    key: IdempotencyKey,
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        assert caller.entity_id is not None
        redemption, _refund_id, _amount = await service.refund(
            conn,
            request.app.state.ledger,
            redemption_id=redemption_id,
            provider_entity_id=caller.entity_id,
            amount_fen=body.amount_fen,
            reason=body.reason,
            now=datetime.now(UTC),
        )
        return 200, _redemption_out(redemption)

    return await run_idempotent(session, caller, key, f"POST /v1/redemptions/{redemption_id}/refund", body, command)


@router.post(
    "/redemptions/{redemption_id}/reverse",
    summary="Clawback by a compensating entry: to the voucher, or to the budget if the voucher has ended",
    responses=problem_responses(404, 409),
    response_model=RedemptionOut,
)
async def reverse(
    request: Request,
    redemption_id: RedemptionId,
    body: ReverseIn,
    session: SessionDep,
    caller: Admin,
    key: idempotency.OptionalIdempotencyKeyHeader = None,
) -> JSONResponse:
    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        current = await service.get_redemption(conn, redemption_id)
        program = (await conn.execute(_PROGRAM_OF, {"v": current.voucher_id})).one()
        if not caller.administers(request.app.state.catalog.for_year(program.program, program.year).voucher_type):
            raise Forbidden("this key does not administer this voucher's program")
        reversed_ = await service.reverse(
            conn,
            request.app.state.ledger,
            redemption_id=redemption_id,
            reason=body.reason,
            grounds=body.grounds,
            actor=caller.key_id,
            sanction_years=request.app.state.catalog.policy.sanction_years,
            now=datetime.now(UTC),
        )
        return 200, _redemption_out(reversed_)

    route = f"POST /v1/redemptions/{redemption_id}/reverse"
    return await run_idempotent(session, caller, key or f"reverse:{redemption_id}", route, body, command)


@router.get("/redemptions", summary="Redemptions, oldest first: a provider's own, a holder's own, or all")
async def list_redemptions(
    session: SessionDep,
    caller: Reader,
    page: PageDep,
    voucher_id: Annotated[str | None, Query(pattern=r"^vch_[a-z0-9]{24}$")] = None,
) -> Page[RedemptionOut]:
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    rows = await service.list_redemptions(
        await session.connection(),
        after=after,
        limit=page.limit + 1,
        voucher_id=voucher_id,
        provider_entity_id=caller.entity_id if caller.role is Role.PROVIDER else None,
        holder_entity_id=caller.entity_id if caller.role is Role.ENTERPRISE else None,
    )
    rows, next_cursor = split_page(rows, page.limit, lambda r: _CURSOR.encode((r.created_at, r.id)))
    return Page(data=[RedemptionOut.model_validate(r, from_attributes=True) for r in rows], next_cursor=next_cursor)


@router.get("/redemptions/{redemption_id}", summary="One redemption", responses=problem_responses(404))
async def get_redemption(redemption_id: RedemptionId, session: SessionDep, caller: Reader) -> RedemptionOut:
    redemption = await service.get_redemption(await session.connection(), redemption_id)
    own = {Role.PROVIDER: redemption.provider_entity_id, Role.ENTERPRISE: redemption.holder_entity_id}
    if caller.role in own and own[caller.role] != caller.entity_id:
        raise service.RedemptionNotFound(f"no redemption {redemption_id}")
    return RedemptionOut.model_validate(redemption, from_attributes=True)
