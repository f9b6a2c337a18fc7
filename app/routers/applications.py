"""`/v1/applications`: submit, read, approve (issuing a voucher or a payout from the program budget) and
reject; `/v1/external-awards` and `/v1/purchases`, which feed the rules.

Administrators act on the programs of their voucher types; an enterprise submits and reads its own
applications (another entity's is `404 not_found`); providers report their sales.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import Field, StringConstraints
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app import idempotency
from app.apikeys import Caller
from app.commands import run_command
from app.dependencies import AdminOrAuditorCaller, CallerDep, SessionDep, UnrestrictedAdminCaller, require_roles
from app.errors import Forbidden, ValidationFailed, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.policy_tasks import affiliation_checker
from app.roles import Role
from app.schemas import Fen, PositiveFen, RequestModel, ResponseModel
from vouchers import applications as service
from vouchers import external_awards, notices
from vouchers.applications import AffiliationChecker, Application, ApplicationNotFound, Issued, new_id
from vouchers.bases import DOCUMENT_KINDS, EntityId, external_document
from vouchers.catalog import Catalog, publish
from vouchers.programs import ProgramCode
from vouchers.sanctions import Grounds

router = APIRouter(tags=["applications"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
ApplicationId = Annotated[str, Path(pattern=r"^app_[a-z0-9]{24}$")]
AdminOrEnterprise = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.ENTERPRISE))]
Reader = Annotated[Caller, Depends(require_roles(Role.ADMIN, Role.ENTERPRISE, Role.AUDITOR))]
Admin = Annotated[Caller, Depends(require_roles(Role.ADMIN))]
Provider = Annotated[Caller, Depends(require_roles(Role.PROVIDER))]


class ApplicationIn(RequestModel):
    program: ProgramCode
    applicant_entity_id: EntityId
    year: int = Field(ge=2000, le=2100)
    basis: dict[str, Any]


class ApplicationOut(ResponseModel):
    id: str
    program: str
    definition_version: int
    applicant_entity_id: str
    year: int
    status: str
    basis: dict[str, Any]
    computed: dict[str, Any]
    award_fen: int | None
    automatic: bool
    decision_reason: str | None
    voucher_id: str | None
    payout_id: str | None
    notice_ends_at: datetime | None
    created_at: datetime
    decided_at: datetime | None
    issued_at: datetime | None
    reversed_at: datetime | None
    reversal_reason: str | None


class ApproveIn(RequestModel):
    award_fen: PositiveFen | None = None


class RejectIn(RequestModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class IssuedOut(ResponseModel):
    """The voucher (`kind: voucher`) or the payout (`kind: payout`) the approval issued; in a program with a
    public notice period, the award waiting it out (`kind: notice`, `status: in_notice`, `id` the voucher or
    payout it will become)."""

    id: str
    kind: Literal["voucher", "payout", "notice"]
    application_id: str
    program: str
    holder_entity_id: str
    year: int
    face_value_fen: int | None = Field(description="vouchers: the value issued")
    amount_fen: int
    expires_at: datetime | None
    status: str
    application: ApplicationOut


class ExternalAwardIn(RequestModel):
    entity_id: EntityId
    basis_ref: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=300)] = Field(
        description=f"the document as `kind:reference`, kind one of {', '.join(DOCUMENT_KINDS)}; an invoice or a "
        "contract as `invoice:<counterparty entity id>:<number>` (or `contract:` or `doc:`, one identity)"
    )
    policy: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    amount_fen: PositiveFen
    awarded_on: date
    draws_appropriation: bool = Field(
        default=False,
        description="support this city pays under an article other than 8-11: drawn from the appropriation of the "
        "year of `awarded_on`, which program budgets and these draws together never exceed (art. 27; "
        "`409 appropriation_exceeded` otherwise)",
    )


class ExternalAwardOut(ResponseModel):
    id: str
    entity_id: str
    basis_ref: str
    policy: str
    amount_fen: int
    awarded_on: date
    draws_appropriation: bool
    draw_entry_id: str | None = Field(default=None, description="the ledger entry that drew it from the appropriation")
    created_at: datetime
    reversed_at: datetime | None = None
    reversal_grounds: Grounds | None = None
    reversal_reason: str | None = None
    return_entry_id: str | None = Field(default=None, description="the entry that returned the draw on reversal")
    sanction_id: str | None = Field(default=None, description="misconduct: the sanction recorded against the entity")
    released_documents: list[str] = Field(default_factory=list, description="freed by an administrative reversal")


class ExternalAwardReverseIn(RequestModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
    grounds: Grounds = Field(
        description="`administrative` (就高: the entity chose a higher award here, or an error) frees the document; "
        "`misconduct` keeps it claimed for good and sanctions the entity (art. 25)"
    )


class PurchaseIn(RequestModel):
    buyer_entity_id: EntityId
    invoice_no: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^:]+$")
    ]
    category: Literal["compute", "storage", "network", "security", "other"]
    amount_fen: PositiveFen
    purchased_on: date


class PurchaseOut(ResponseModel):
    id: str
    provider_entity_id: str
    buyer_entity_id: str
    invoice_no: str
    category: str
    amount_fen: Fen
    purchased_on: date
    created_at: datetime


def _out(application: Application) -> ApplicationOut:
    return ApplicationOut.model_validate(application, from_attributes=True)


def _catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def _checker(request: Request, session: AsyncSession) -> AffiliationChecker:
    return affiliation_checker(request.app.state.settings, session)


async def _ensure_programs_published(request: Request, conn: AsyncConnection) -> None:
    """An application names a published definition: publish now if start-up found no database to publish to."""
    if not request.app.state.programs_published:
        await publish(conn, request.app.state.definitions)
        request.app.state.programs_published = True


def _may_administer(caller: Caller, catalog: Catalog, program: str, year: int) -> None:
    if caller.role is Role.ADMIN and not caller.administers(catalog.for_year(program, year).voucher_type):
        raise Forbidden(f"this key does not administer {program}")


def _visible(caller: Caller, application: Application) -> None:
    """Another entity's application does not exist for an enterprise key."""
    if caller.role is Role.ENTERPRISE and application.applicant_entity_id != caller.entity_id:
        raise ApplicationNotFound(f"no application {application.id}")


@router.post(
    "/applications",
    status_code=status.HTTP_201_CREATED,
    summary="Submit an application; the answer carries what POLICY.md says it is owed, and why",
)
async def submit(
    request: Request, body: ApplicationIn, session: SessionDep, caller: AdminOrEnterprise
) -> ApplicationOut:
    catalog = _catalog(request)
    if caller.role is Role.ENTERPRISE and body.applicant_entity_id != caller.entity_id:
        raise Forbidden("an enterprise key applies for its own entity only")
    _may_administer(caller, catalog, body.program, body.year)
    conn = await session.connection()
    await _ensure_programs_published(request, conn)
    application = await service.submit(
        conn,
        catalog,
        _checker(request, session),
        program=body.program,
        applicant_entity_id=body.applicant_entity_id,
        year=body.year,
        basis=body.basis,
        actor=caller.key_id,
    )
    await session.commit()
    return _out(application)


@router.get("/applications", summary="Applications, oldest first")
async def list_applications(
    session: SessionDep,
    caller: Reader,
    page: PageDep,
    program: ProgramCode | None = None,
    application_status: Annotated[
        Literal["submitted", "rejected", "issued", "reversed"] | None, Query(alias="status")
    ] = None,
    year: Annotated[int | None, Query(ge=2000, le=2100)] = None,
    entity_id: Annotated[str | None, Query(pattern=r"^ent_[a-z0-9]{24}$")] = None,
) -> Page[ApplicationOut]:
    if caller.role is Role.ENTERPRISE:
        entity_id = caller.entity_id
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    conn = await session.connection()
    rows = await service.list_applications(
        conn,
        after=after,
        limit=page.limit + 1,
        entity_id=entity_id,
        program=program,
        status=application_status,
        year=year,
    )
    rows, next_cursor = split_page(rows, page.limit, lambda a: _CURSOR.encode((a.created_at, a.id)))
    return Page(data=[_out(a) for a in rows], next_cursor=next_cursor)


@router.get("/applications/{application_id}", summary="One application", responses=problem_responses(404))
async def get_application(application_id: ApplicationId, session: SessionDep, caller: Reader) -> ApplicationOut:
    application = await service.get(await session.connection(), application_id)
    _visible(caller, application)
    return _out(application)


@router.post(
    "/applications/{application_id}/approve",
    status_code=status.HTTP_201_CREATED,
    summary="Approve: issue the voucher or the payout from the program budget",
    responses=problem_responses(404, 409),
    response_model=IssuedOut,
)
async def approve(
    request: Request,
    application_id: ApplicationId,
    session: SessionDep,
    caller: Admin,
    body: ApproveIn | None = None,
    key: idempotency.OptionalIdempotencyKeyHeader = None,
) -> JSONResponse:
    """With an `Idempotency-Key` a retry gets the first answer (the same voucher, or the same refusal)."""

    async def command(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        current = await service.get(conn, application_id)
        _may_administer(caller, _catalog(request), current.program, current.year)
        issued = await service.approve(
            conn,
            request.app.state.ledger,
            _catalog(request),
            _checker(request, session),
            application_id=application_id,
            award_fen=body.award_fen if body else None,
            actor=caller.key_id,
            now=datetime.now(UTC),
        )
        return status.HTTP_201_CREATED, _issued_out(issued).model_dump(mode="json")

    return await run_command(session, caller, key, f"POST /v1/applications/{application_id}/approve", body, command)


def _issued_out(issued: Issued) -> IssuedOut:
    application = issued.application
    return IssuedOut(
        id=issued.id,
        kind="voucher" if issued.kind == "voucher" else "payout" if issued.kind == "payout" else "notice",
        application_id=application.id,
        program=application.program,
        holder_entity_id=application.applicant_entity_id,
        year=application.year,
        face_value_fen=issued.amount_fen if issued.kind == "voucher" else None,
        amount_fen=issued.amount_fen,
        expires_at=issued.expires_at,
        status={"voucher": "active", "payout": "payable"}.get(issued.kind, "in_notice"),
        application=_out(application),
    )


@router.post(
    "/applications/{application_id}/reject",
    summary="Reject, with the reason",
    responses=problem_responses(404, 409),
)
async def reject(
    request: Request, application_id: ApplicationId, body: RejectIn, session: SessionDep, caller: Admin
) -> ApplicationOut:
    conn = await session.connection()
    current = await service.get(conn, application_id)
    _may_administer(caller, _catalog(request), current.program, current.year)
    application = await service.reject(conn, application_id=application_id, reason=body.reason, actor=caller.key_id)
    await session.commit()
    return _out(application)


@router.post(
    "/external-awards",
    status_code=status.HTTP_201_CREATED,
    summary="Record support given under another city policy: its basis document cannot be claimed here",
    responses=problem_responses(409),
)
async def record_external_award(
    request: Request, body: ExternalAwardIn, session: SessionDep, caller: UnrestrictedAdminCaller
) -> ExternalAwardOut:
    try:  # one identity per document: an invoice or a contract is its counterparty plus its number (art. 25)
        document, counterparty = external_document(body.basis_ref)
    except ValueError as invalid:
        raise ValidationFailed(str(invalid), loc=("body", "basis_ref")) from None
    conn = await session.connection()
    if await conn.scalar(text("SELECT 1 FROM entity WHERE id = :id"), {"id": body.entity_id}) is None:
        raise ValidationFailed(f"no entity {body.entity_id}", loc=("body", "entity_id"))
    if counterparty and await conn.scalar(text("SELECT 1 FROM entity WHERE id = :id"), {"id": counterparty}) is None:
        raise ValidationFailed(f"no entity {counterparty}", loc=("body", "basis_ref"))
    if taken := await service.active_holders(conn, [document]):
        raise service.BasisAlreadyUsed(f"no double support (art. 25): {document} already supports {taken[document]}")
    award_id = new_id("ext_")
    row = (
        await conn.execute(
            text(
                "INSERT INTO external_award (id, entity_id, basis_ref, policy, amount_fen, awarded_on, recorded_by) "
                "VALUES (:id, :e, :b, :p, :a, :d, :by) RETURNING created_at"
            ),
            {
                "id": award_id,
                "e": body.entity_id,
                "b": body.basis_ref,
                "p": body.policy,
                "a": body.amount_fen,
                "d": body.awarded_on,
                "by": caller.key_id,
            },
        )
    ).one()
    claimed = await conn.scalar(
        text(
            "INSERT INTO basis_claim (document, external_award_id) VALUES (:d, :id) "
            "ON CONFLICT (document) WHERE released_at IS NULL AND duplicate_of IS NULL DO NOTHING RETURNING id"
        ),
        {"d": document, "id": award_id},
    )
    if claimed is None:
        holder = await conn.scalar(
            text(
                "SELECT coalesce(application_id, external_award_id) FROM basis_claim "
                "WHERE document = :d AND released_at IS NULL"
            ),
            {"d": document},
        )
        raise service.BasisAlreadyUsed(f"no double support (art. 25): {document} already supports {holder}")
    if body.draws_appropriation:
        drawn = await external_awards.draw(
            conn,
            request.app.state.ledger,
            award_id=award_id,
            appropriation_fen=request.app.state.settings.appropriation_fen,
            now=datetime.now(UTC),
        )
        await session.commit()
        return _external_out(drawn)
    await session.commit()
    return ExternalAwardOut(id=award_id, created_at=row.created_at, **body.model_dump())


def _external_out(award: external_awards.ExternalAward) -> ExternalAwardOut:
    return ExternalAwardOut(
        id=award.id,
        entity_id=award.entity_id,
        basis_ref=award.basis_ref,
        policy=award.policy,
        amount_fen=award.amount_fen,
        awarded_on=award.awarded_on,
        draws_appropriation=award.draws_appropriation,
        draw_entry_id=None if award.draw_entry_id is None else str(award.draw_entry_id),
        created_at=award.created_at,
        reversed_at=award.reversed_at,
        reversal_grounds=award.reversal_grounds,
        reversal_reason=award.reversal_reason,
        return_entry_id=None if award.return_entry_id is None else str(award.return_entry_id),
        sanction_id=award.sanction_id,
        released_documents=list(award.released_documents),
    )


ExternalAwardId = Annotated[str, Path(pattern=r"^ext_[a-z0-9]{24}$")]


@router.get(
    "/external-awards/{award_id}",
    summary="One external award: its draw on the appropriation and its reversal, if any",
    responses=problem_responses(404),
)
async def get_external_award(
    award_id: ExternalAwardId, session: SessionDep, _caller: AdminOrAuditorCaller
) -> ExternalAwardOut:
    return _external_out(await external_awards.get(await session.connection(), award_id))


@router.post(
    "/external-awards/{award_id}/reverse",
    summary="Reverse an external award: administrative grounds free its document (就高), misconduct keeps it "
    "claimed and sanctions the entity; a draw on the appropriation is returned",
    responses=problem_responses(404, 409),
)
async def reverse_external_award(
    request: Request,
    award_id: ExternalAwardId,
    body: ExternalAwardReverseIn,
    session: SessionDep,
    caller: UnrestrictedAdminCaller,
) -> ExternalAwardOut:
    award, _sanction = await external_awards.reverse(
        await session.connection(),
        request.app.state.ledger,
        award_id=award_id,
        reason=body.reason,
        grounds=body.grounds,
        actor=caller.key_id,
        sanction_years=_catalog(request).policy.sanction_years,
        now=datetime.now(UTC),
    )
    await session.commit()
    return _external_out(award)


@router.post(
    "/purchases",
    status_code=status.HTTP_201_CREATED,
    summary="A provider reports a sale: it corroborates applications and feeds 免申即享 (art. 19)",
    responses=problem_responses(409),
)
async def report_purchase(body: PurchaseIn, session: SessionDep, caller: Provider) -> PurchaseOut:
    assert caller.entity_id is not None
    conn = await session.connection()
    if await conn.scalar(text("SELECT 1 FROM entity WHERE id = :id"), {"id": body.buyer_entity_id}) is None:
        raise ValidationFailed(f"no entity {body.buyer_entity_id}", loc=("body", "buyer_entity_id"))
    purchase_id = new_id("pur_")
    row = (
        await conn.execute(
            text(
                "INSERT INTO purchase (id, provider_entity_id, buyer_entity_id, invoice_no, category, amount_fen, "
                "purchased_on, reported_by) VALUES (:id, :p, :b, :n, :c, :a, :d, :by) "
                "ON CONFLICT (provider_entity_id, invoice_no) DO NOTHING RETURNING created_at"
            ),
            {
                "id": purchase_id,
                "p": caller.entity_id,
                "b": body.buyer_entity_id,
                "n": body.invoice_no,
                "c": body.category,
                "a": body.amount_fen,
                "d": body.purchased_on,
                "by": caller.key_id,
            },
        )
    ).first()
    if row is None:
        raise service.PurchaseAlreadyReported(f"invoice {body.invoice_no} was already reported by this provider")
    await session.commit()
    return PurchaseOut(
        id=purchase_id, provider_entity_id=caller.entity_id, created_at=row.created_at, **body.model_dump()
    )


class NoticeOut(ResponseModel):
    application_id: str
    program: str
    year: int
    beneficiary_entity_id: str
    beneficiary_name: str
    amount_fen: int
    notice_ends_at: datetime
    status: Literal["in_notice", "held"]


class ObjectionIn(RequestModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class ObjectionOut(ResponseModel):
    id: str
    application_id: str
    reason: str
    status: Literal["open", "upheld", "dismissed"]
    note: str | None
    created_at: datetime
    resolved_at: datetime | None


class ResolveIn(RequestModel):
    outcome: Literal["upheld", "dismissed"]
    note: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


_NOTICE_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])


@router.get("/notices", summary="Public: awards in their public-notice period (公示)")
async def list_notices(session: SessionDep, page: PageDep) -> Page[NoticeOut]:
    after = _NOTICE_CURSOR.decode(page.cursor) if page.cursor else None
    rows = await notices.list_notices(await session.connection(), after=after, limit=page.limit + 1)
    rows, next_cursor = split_page(
        rows, page.limit, lambda n: _NOTICE_CURSOR.encode((n.notice_ends_at, n.application_id))
    )
    return Page(data=[NoticeOut.model_validate(n, from_attributes=True) for n in rows], next_cursor=next_cursor)


@router.post(
    "/applications/{application_id}/objections",
    status_code=status.HTTP_201_CREATED,
    summary="Object to an award in public notice: it is held until an administrator resolves the objection",
    responses=problem_responses(404, 409),
)
async def object_to(
    application_id: ApplicationId, body: ObjectionIn, session: SessionDep, caller: CallerDep
) -> ObjectionOut:
    conn = await session.connection()
    application = await service.get(conn, application_id)
    if application.status not in ("in_notice", "held") and caller.role in (Role.ENTERPRISE, Role.PROVIDER):
        # only awards in public notice are public: any other application of another entity does not exist
        # for this caller, and its status is not for it to learn
        _visible(caller, application)
        if caller.role is Role.PROVIDER:
            raise ApplicationNotFound(f"no application {application_id}")
    objection = await notices.raise_objection(
        conn, application_id=application_id, reason=body.reason, actor=caller.key_id
    )
    await session.commit()
    return ObjectionOut.model_validate(objection, from_attributes=True)


@router.post(
    "/objections/{objection_id}/resolve",
    summary="Resolve an objection: upheld rejects the award, dismissed lets it be issued",
    responses=problem_responses(404, 409),
)
async def resolve(
    request: Request,
    objection_id: Annotated[str, Path(pattern=r"^obj_[a-z0-9]{24}$")],
    body: ResolveIn,
    session: SessionDep,
    caller: Admin,
) -> ObjectionOut:
    conn = await session.connection()
    objection = await notices.get_objection(conn, objection_id)
    application = await service.get(conn, objection.application_id)
    _may_administer(caller, _catalog(request), application.program, application.year)
    resolved = await notices.resolve_objection(
        conn,
        request.app.state.ledger,
        _catalog(request),
        objection_id=objection_id,
        outcome=body.outcome,
        note=body.note,
        actor=caller.key_id,
    )
    await session.commit()
    return ObjectionOut.model_validate(resolved, from_attributes=True)
