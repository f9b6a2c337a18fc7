"""`/v1/entities`: the registry of who may receive or redeem money, and its history (art. 25).

An admin limited to no voucher type registers and changes entities: tags and eligibility decide awards in
every program (tagging grants 免申即享 compute vouchers), so an admin limited to some types reads them but
changes nothing (API.md, "Admin scope"); auditors read everything; an enterprise or provider key reads its
own entity and its history, and any other entity is `404 not_found`, exactly as if it did not exist.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Request, status
from pydantic import AfterValidator, Field, SecretStr, StrictBool, StrictStr, field_validator, model_validator

from app.apikeys import Caller, live_keys_unfit_for
from app.dependencies import AdminOrAuditorCaller, CallerDep, SessionDep, UnrestrictedAdminCaller
from app.errors import ValidationFailed, problem_responses
from app.pagination import Cursor, Page, PageDep, split_page
from app.policy_tasks import grant_automatic
from app.roles import Role
from app.routers.sanctions import SanctionOut
from app.schemas import RequestModel, ResponseModel
from vouchers import entities as service
from vouchers import sanctions
from vouchers.automatic import automatic_tags
from vouchers.entities import (
    KEEP,
    TAG_PATTERN,
    EligibilityOverride,
    Entity,
    EntityChanges,
    EntityEvent,
    EntityKind,
    EntityNotFound,
    InvalidEntity,
    NewEntity,
    OverrideChange,
)
from vouchers.uscc import parse_uscc

__all__ = ["EligibilityOut", "EntityCreate", "EntityEventOut", "EntityOut", "EntityPatch", "router"]

router = APIRouter(prefix="/entities", tags=["entities"], responses=problem_responses(401, 403, 422))

_CURSOR: Cursor[tuple[datetime, str]] = Cursor(tuple[datetime, str])
_EVENT_CURSOR: Cursor[int] = Cursor(int)
# A limit on what is read before the rules run (the rules then allow TAGS_MAX distinct tags).
_TAGS_GIVEN_MAX = 256

T = TypeVar("T")
R = TypeVar("R")


def _rule(check: Callable[[T], R]) -> AfterValidator:
    """A pure rule of vouchers/entities.py as a pydantic validator: same rule, a 422 naming the field."""

    def validate(value: T) -> R:
        try:
            return check(value)
        except InvalidEntity as exc:
            raise ValueError(exc.detail) from None

    return AfterValidator(validate)


def _tags_rule(tags: list[str]) -> list[str]:
    return list(service.normalise_tags(tags))


Name = Annotated[StrictStr, _rule(service.normalise_name), Field(description="1 to 200 characters")]
Reason = Annotated[StrictStr, _rule(service.normalise_reason), Field(description="1 to 1000 characters")]
EvidenceRef = Annotated[
    StrictStr,
    _rule(service.normalise_evidence_ref),
    Field(description="where the evidence is kept: a file number, a document id (1 to 500 characters)"),
]
Tags = Annotated[
    list[StrictStr],
    Field(
        max_length=_TAGS_GIVEN_MAX,
        description="a set of lower-case snake_case tags (`^[a-z][a-z0-9_]{0,49}$`), at most 32; "
        "answered deduplicated and sorted",
    ),
    _rule(_tags_rule),
]
# any id of this shape is looked up (404 when unknown); anything else, a NUL for one, is 422
EntityIdPath = Annotated[str, Path(pattern=r"^ent_[a-z0-9]{1,60}$", description="an entity id, `ent_...`")]


class EntityCreate(RequestModel):
    """An organisation by its `uscc`; a natural person (`kind: person`) by its `id_document_no` instead."""

    uscc: StrictStr | None = Field(
        default=None,
        description="unified social credit code (统一社会信用代码): 18 characters; spaces around it and lower case "
        "are accepted and normalised. Not a valid code: `422 invalid_uscc`. Absent for a person",
    )
    id_document_no: SecretStr | None = Field(
        default=None,
        description="a person's identity-document number (kind `person` only): kept only as a keyed hash, "
        "never returned; spaces around it, full-width characters and lower case are normalised",
    )
    name: Name
    kind: EntityKind
    tags: Tags = Field(default_factory=list)


class EligibilityOverrideIn(RequestModel):
    eligible: StrictBool
    reason: Reason
    evidence_ref: EvidenceRef


class EntityPatch(RequestModel):
    """Fields left out stay as they are. `eligibility_override: {...}` decides art. 25 eligibility either way;
    `eligibility_override: null` returns the entity to the presumption from its division code."""

    name: Name | None = None
    kind: EntityKind | None = None
    tags: Tags | None = Field(default=None, description="replaces the whole set")
    eligibility_override: EligibilityOverrideIn | None = Field(
        default=None, description="an object to override eligibility, null to clear the override"
    )
    reason: Reason | None = Field(
        default=None,
        description="why: recorded in the history with each change this request makes (an override carries "
        "its own); required to clear an override",
    )

    @field_validator("name", "kind", "tags", "reason")
    @classmethod
    def _absent_not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("leave the field out to keep it; it cannot be null")
        return value

    @model_validator(mode="after")
    def _clearing_says_why(self) -> EntityPatch:
        if "eligibility_override" in self.model_fields_set and self.eligibility_override is None and not self.reason:
            raise ValueError("clearing the eligibility override (eligibility_override: null) needs a reason")
        return self

    def changes(self) -> EntityChanges:
        override: OverrideChange = KEEP
        if "eligibility_override" in self.model_fields_set:
            given = self.eligibility_override
            override = (
                None
                if given is None
                else EligibilityOverride(eligible=given.eligible, reason=given.reason, evidence_ref=given.evidence_ref)
            )
        return EntityChanges(
            name=self.name, kind=self.kind, tags=self.tags, eligibility_override=override, reason=self.reason
        )


class EligibilityOut(ResponseModel):
    presumed: bool = Field(description="art. 25's presumption: registered in Guangzhou (division code 4401xx)")
    overridden: bool = Field(description="an administrator decided against or beside the presumption")
    reason: str | None
    evidence_ref: str | None


class EntityOut(ResponseModel):
    id: str
    uscc: str | None = Field(description="absent (null) for a person, whose document number is never shown")
    name: str
    kind: EntityKind
    tags: list[str]
    division_code: str | None = Field(description="characters 3-8 of the uscc (null for a person)")
    guangzhou_registered: bool
    eligible: bool = Field(description="art. 25: the override when there is one, else the presumption")
    eligibility: EligibilityOut
    created_at: datetime
    updated_at: datetime
    sanctions: list[SanctionOut] = Field(
        default_factory=list,
        description="misconduct decisions against the entity, oldest first, lifted and ended ones too (art. 25)",
    )

    @classmethod
    def of(cls, entity: Entity) -> EntityOut:
        return cls(
            id=entity.id,
            uscc=entity.uscc,
            name=entity.name,
            kind=EntityKind(entity.kind),
            tags=list(entity.tags),
            division_code=entity.division_code,
            guangzhou_registered=entity.guangzhou_registered,
            eligible=entity.eligible,
            eligibility=EligibilityOut(
                presumed=entity.guangzhou_registered,
                overridden=entity.eligibility_overridden,
                reason=entity.eligibility_reason,
                evidence_ref=entity.eligibility_evidence_ref,
            ),
            created_at=entity.created_at,
            updated_at=entity.updated_at,
        )


class EntityEventOut(ResponseModel):
    id: str
    entity_id: str
    kind: Literal["created", "renamed", "kind", "tags", "eligibility", "sanctioned", "sanction_lifted"]
    change: dict[str, Any] = Field(description="`{before, after}`")
    reason: str | None
    evidence_ref: str | None
    actor_key_id: str | None = Field(description="the API key that made the change")
    created_at: datetime

    @classmethod
    def of(cls, event: EntityEvent) -> EntityEventOut:
        return cls(
            id=str(event.id),
            entity_id=event.entity_id,
            kind=event.kind,  # the database's CHECK holds it to the literal
            change=event.change,
            reason=event.reason,
            evidence_ref=event.evidence_ref,
            actor_key_id=event.actor_key_id,
            created_at=event.created_at,
        )


def _check_visible(caller: Caller, entity_id: str) -> None:
    """Admins and auditors see every entity; an entity's own keys see that entity only. Another entity is
    answered exactly as a missing one, so a key cannot learn which ids exist."""
    if caller.role in (Role.ADMIN, Role.AUDITOR):
        return
    if caller.entity_id != entity_id:
        raise EntityNotFound(f"no entity {entity_id}")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register an entity by its unified social credit code, or a natural person by its identity document",
    responses=problem_responses(409),
)
async def create(
    request: Request, body: EntityCreate, session: SessionDep, caller: UnrestrictedAdminCaller
) -> EntityOut:
    number = body.id_document_no.get_secret_value() if body.id_document_no is not None else None
    new = NewEntity(uscc=body.uscc, name=body.name, kind=body.kind, tags=body.tags, id_document_no=number)
    key = service.id_document_key(request.app.state.keyring.kek) if body.kind is EntityKind.PERSON else None
    try:
        entity = await service.create_entity(session, new, actor_key_id=caller.key_id, id_document_key=key)
    except InvalidEntity as exc:  # which identifier a kind takes: a 422 naming the field, as pydantic's are
        raise ValidationFailed(exc.detail, loc=("body", exc.field)) from None
    await session.commit()
    return EntityOut.of(entity)


@router.get("", summary="List entities, newest first")
async def list_entities(
    session: SessionDep,
    _caller: AdminOrAuditorCaller,
    page: PageDep,
    tag: Annotated[
        str | None, Query(pattern=f"^{TAG_PATTERN.pattern}$", description="only entities with this tag")
    ] = None,
    kind: Annotated[EntityKind | None, Query(description="only entities of this kind")] = None,
    uscc: Annotated[
        str | None, Query(max_length=64, description="only the entity with this code (normalised; 422 invalid_uscc)")
    ] = None,
) -> Page[EntityOut]:
    after = _CURSOR.decode(page.cursor) if page.cursor else None
    code = parse_uscc(uscc).code if uscc is not None else None
    rows = await service.list_entities(session, after=after, limit=page.limit + 1, tag=tag, kind=kind, uscc=code)
    rows, next_cursor = split_page(rows, page.limit, lambda row: _CURSOR.encode((row.created_at, row.id)))
    decided = await sanctions.for_entities(await session.connection(), [row.id for row in rows])
    return Page[EntityOut](
        data=[
            EntityOut.of(row).model_copy(update={"sanctions": [SanctionOut.of(s) for s in decided[row.id]]})
            for row in rows
        ],
        next_cursor=next_cursor,
    )


@router.get("/{id}", summary="One entity", responses=problem_responses(404))
async def get(id: EntityIdPath, session: SessionDep, caller: CallerDep) -> EntityOut:
    _check_visible(caller, id)
    entity = EntityOut.of(await service.get_entity(session, id))
    decided = await sanctions.for_entity(await session.connection(), id)
    return entity.model_copy(update={"sanctions": [SanctionOut.of(s) for s in decided]})


@router.patch(
    "/{id}",
    summary="Change an entity's name, kind, tags or eligibility; each change is kept in its history",
    responses=problem_responses(404),
)
async def patch(
    request: Request, id: EntityIdPath, body: EntityPatch, session: SessionDep, caller: UnrestrictedAdminCaller
) -> EntityOut:
    update = await service.update_entity(session, id, body.changes(), actor_key_id=caller.key_id)
    if body.kind is not None and any(event.kind == "kind" for event in update.events):
        # under the row lock update_entity took: a key bound meanwhile has committed and shows here
        unfit = await live_keys_unfit_for(session, id, body.kind)
        if unfit:
            raise ValidationFailed(
                f"a {body.kind} entity cannot keep its live keys of another role: revoke {', '.join(unfit)} first",
                loc=("body", "kind"),
            )
    decided = await sanctions.for_entity(await session.connection(), id)
    await session.commit()
    if automatic_tags(request.app.state.catalog) & set(update.tags_added):
        # 免申即享 (art. 19): tagging grants the compute voucher at once, with no action from the entity
        await grant_automatic(request.app.state, id)
    return EntityOut.of(update.entity).model_copy(update={"sanctions": [SanctionOut.of(s) for s in decided]})


@router.get(
    "/{id}/history",
    summary="Every change to an entity, oldest first, with who and why",
    responses=problem_responses(404),
)
async def history(id: EntityIdPath, session: SessionDep, caller: CallerDep, page: PageDep) -> Page[EntityEventOut]:
    _check_visible(caller, id)
    after = _EVENT_CURSOR.decode(page.cursor) if page.cursor else None
    await service.get_entity(session, id)  # a missing entity is 404, not an empty history
    rows = await service.list_entity_events(session, id, after=after, limit=page.limit + 1)
    rows, next_cursor = split_page(rows, page.limit, lambda row: _EVENT_CURSOR.encode(row.id))
    return Page[EntityEventOut](data=[EntityEventOut.of(row) for row in rows], next_cursor=next_cursor)
