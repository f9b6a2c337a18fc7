"""`/v1/affiliations`: record and end relations between entities (an admin limited to no voucher type: they
decide awards in every program), read them (admins, auditors), and check whether two entities are affiliated
on a date (admins, auditors, a provider for itself).

Percentages never pass through a float: the body of `POST /v1/affiliations` is parsed here with
`json.loads(parse_float=Decimal)` (FastAPI's own parsing would make 33.33 a binary fraction first), and a
percentage is answered as a string with two decimals ("20.00").
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, NoReturn
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator, Field, StringConstraints, ValidationError, WithJsonSchema

from app.dependencies import (
    AdminOrAuditorCaller,
    Caller,
    SessionDep,
    SettingsDep,
    UnrestrictedAdminCaller,
    require_roles,
)
from app.errors import Forbidden, ValidationFailed, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.policy_tasks import thresholds_of
from app.roles import Role
from app.schemas import RequestModel, ResponseModel
from vouchers.affiliations import (
    SOURCE_LENGTH_MAX,
    AffiliationRecord,
    Effect,
    InvalidAffiliation,
    Kind,
    NewAffiliation,
    Relation,
    Thresholds,
    check_affiliation,
    end_affiliation,
    get_affiliation,
    list_affiliations,
    months_before,
    parse_equity_pct,
    record_affiliation,
)

router = APIRouter(prefix="/affiliations", tags=["affiliations"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ENTITY_ID = r"^ent_[a-z0-9]{24}$"
# loose on purpose: `PATCH /v1/affiliations/check` reaches `/{id}` and stays a 404 lookup, not a 422
_AFFILIATION_ID = r"^[a-z0-9_]{1,64}$"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def _iso_date(value: object) -> date:
    """`YYYY-MM-DD` and nothing else: no timestamps, no numbers of days."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _DATE_TEXT.fullmatch(value):
        raise ValueError("a date is YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value} is not a calendar date") from None


def _pct_or_none(value: object) -> Decimal | None:
    return None if value is None else parse_equity_pct(value)


IsoDate = Annotated[date, BeforeValidator(_iso_date), WithJsonSchema({"type": "string", "format": "date"})]
EntityIdField = Annotated[str, StringConstraints(pattern=_ENTITY_ID)]
EquityPct = Annotated[
    Decimal | None,
    BeforeValidator(_pct_or_none),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "multipleOf": 0.01},
                {"type": "string", "pattern": r"^[0-9]{1,3}(\.[0-9]+)?$"},
                {"type": "null"},
            ],
            "description": "percent of equity, above 0 and at most 100, at most two decimals; equity only",
        }
    ),
]


class AffiliationCreate(RequestModel):
    from_entity_id: EntityIdField
    to_entity_id: EntityIdField
    kind: Literal["equity", "control", "personnel"]
    equity_pct: EquityPct = None
    valid_from: IsoDate
    valid_to: IsoDate | None = None
    source: Annotated[str, StringConstraints(min_length=1, max_length=SOURCE_LENGTH_MAX)] | None = None


class AffiliationEnd(RequestModel):
    valid_to: IsoDate


def _pct_text(pct: Decimal | None) -> str | None:
    return None if pct is None else f"{pct:.2f}"


class AffiliationOut(ResponseModel):
    id: str
    from_entity_id: str
    to_entity_id: str
    kind: Kind
    equity_pct: str | None
    valid_from: date
    valid_to: date | None
    source: str | None
    created_at: datetime
    ended_at: datetime | None

    @classmethod
    def of(cls, record: AffiliationRecord) -> AffiliationOut:
        return cls(
            id=record.id,
            from_entity_id=record.from_entity_id,
            to_entity_id=record.to_entity_id,
            kind=record.kind,
            equity_pct=_pct_text(record.equity_pct),
            valid_from=record.valid_from,
            valid_to=record.valid_to,
            source=record.source,
            created_at=record.created_at,
            ended_at=record.ended_at,
        )


class PathStep(ResponseModel):
    id: str
    from_entity_id: str
    to_entity_id: str
    kind: Kind
    equity_pct: str | None
    effect: Effect


class AffiliationCheck(ResponseModel):
    affiliated: bool
    path: list[PathStep]
    as_of: date
    lookback_from: date = Field(
        description="the first day looked at: parties affiliated on any day from it to `as_of` are affiliated "
        "(POLICY.md, VL_AFFILIATION_LOOKBACK_MONTHS)"
    )
    held_on: date | None = Field(description="the latest day in that window on which every relation of `path` held")


def _step(relation: Relation, thresholds: Thresholds) -> PathStep:
    effect = thresholds.effect(relation.kind, relation.equity_pct)
    assert effect is not None, "a path only holds relations that control, influence or link"
    return PathStep(
        id=relation.id,
        from_entity_id=relation.from_entity_id,
        to_entity_id=relation.to_entity_id,
        kind=relation.kind,
        equity_pct=_pct_text(relation.equity_pct),
        effect=effect,
    )


def _invalid(exc: InvalidAffiliation) -> NoReturn:
    raise ValidationFailed(exc.detail, loc=("body", exc.field)) from None


async def _decimal_body(request: Request) -> AffiliationCreate:
    raw = await request.body()

    def no_constants(name: str) -> NoReturn:
        raise ValueError(f"{name} is not a number")

    try:
        data: Any = json.loads(raw, parse_float=Decimal, parse_constant=no_constants)
    except ValueError:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "the body is not valid JSON", "type": "json_invalid"}]
        ) from None
    try:
        return AffiliationCreate.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


_CREATE_BODY_SCHEMA = AffiliationCreate.model_json_schema()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Record a relation: equity (holder -> investee, percent), control (controller -> controlled) "
    "or personnel (undirected)",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _CREATE_BODY_SCHEMA}}}},
)
async def create(
    # the caller before the body: dependencies run in this order, and an anonymous or outside caller is
    # answered 401 or 403 without being told what is wrong with its body
    caller: UnrestrictedAdminCaller,
    body: Annotated[AffiliationCreate, Depends(_decimal_body)],
    session: SessionDep,
) -> AffiliationOut:
    new = NewAffiliation(
        from_entity_id=body.from_entity_id,
        to_entity_id=body.to_entity_id,
        kind=body.kind,
        equity_pct=body.equity_pct,
        valid_from=body.valid_from,
        valid_to=body.valid_to,
        source=body.source,
    )
    try:
        record = await record_affiliation(session, new)
    except InvalidAffiliation as exc:
        _invalid(exc)
    await session.commit()
    return AffiliationOut.of(record)


@router.get(
    "/check",
    summary="Are two entities affiliated on a date (default: today in Asia/Shanghai) or in the look-back before "
    "it, and by which relations on which day",
    responses=problem_responses(404),
)
async def check(
    session: SessionDep,
    settings: SettingsDep,
    caller: Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.AUDITOR, Role.PROVIDER))],
    a: Annotated[str, Query(pattern=_ENTITY_ID, description="an entity id")],
    b: Annotated[str, Query(pattern=_ENTITY_ID, description="an entity id")],
    as_of: Annotated[str | None, Query(description="YYYY-MM-DD; default today in Asia/Shanghai")] = None,
) -> AffiliationCheck:
    if caller.role is Role.PROVIDER and caller.entity_id not in (a, b):
        raise Forbidden("a provider key checks its own affiliations only: a or b must be its entity")
    if as_of is None:
        on = datetime.now(SHANGHAI).date()
    else:
        try:
            on = _iso_date(as_of)
        except ValueError as exc:
            raise ValidationFailed(str(exc), loc=("query", "as_of")) from None
    thresholds = thresholds_of(settings)
    answer = await check_affiliation(session, a, b, on, thresholds)
    return AffiliationCheck(
        affiliated=answer.affiliated,
        path=[_step(r, thresholds) for r in answer.path],
        as_of=on,
        lookback_from=months_before(on, thresholds.lookback_months),
        held_on=answer.held_on,
    )


@router.get("", summary="Relations in the order recorded, of one entity (either end) or all")
async def list_(
    session: SessionDep,
    caller: AdminOrAuditorCaller,
    page: PageDep,
    entity_id: Annotated[str | None, Query(pattern=_ENTITY_ID)] = None,
) -> Page[AffiliationOut]:
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    rows = await list_affiliations(session, entity_id=entity_id, after=after, limit=page.limit + 1)
    rows, next_cursor = split_page(rows, page.limit, lambda row: _CURSOR.encode((row.created_at, row.id)))
    return Page[AffiliationOut](data=[AffiliationOut.of(row) for row in rows], next_cursor=next_cursor)


@router.get("/{id}", summary="One relation", responses=problem_responses(404))
async def get(
    id: Annotated[str, Path(pattern=_AFFILIATION_ID)], session: SessionDep, caller: AdminOrAuditorCaller
) -> AffiliationOut:
    return AffiliationOut.of(await get_affiliation(session, id))


@router.patch(
    "/{id}",
    summary="End a relation: `valid_to` is its last related day; once only (409 when already ended)",
    responses=problem_responses(404, 409),
)
async def end(
    id: Annotated[str, Path(pattern=_AFFILIATION_ID)],
    body: AffiliationEnd,
    session: SessionDep,
    caller: UnrestrictedAdminCaller,
) -> AffiliationOut:
    try:
        record = await end_affiliation(session, id, body.valid_to)
    except InvalidAffiliation as exc:
        _invalid(exc)
    await session.commit()
    return AffiliationOut.of(record)
