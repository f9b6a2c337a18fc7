"""The entity registry: who may receive or redeem money, and whether art. 25 presumes them eligible.

An entity is identified by its unified social credit code (vouchers/uscc.py), stored normalised. Its
division code and `guangzhou_registered` derive from the code and never change; `eligible` is presumed
from them (art. 25: registered in the Guangzhou area) until an administrator overrides it, either way, with
a reason and an evidence reference. A natural person (kind `person`, a party to relations: POLICY.md) has
no code: it is identified by HMAC-SHA256 of its normalised identity-document number under a key derived
from the service's KEK (`id_document_key`), and the number itself is kept nowhere, shown nowhere, and never
put in the history. A person is presumed not eligible and cannot be made eligible (art. 25 supports
registered enterprises), and its kind never changes, nor does another entity become a person.

Every change (name, kind, tags, eligibility) is an `entity_event` row, append-only, naming the key that made
it: the entity's history.

Commands flush and never commit: the caller owns the transaction. The checks on names, tags and reasons are
pure functions here, so the HTTP layer validates with the very same rules (and the database checks again).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from vouchers.errors import VoucherError
from vouchers.keys import Kek
from vouchers.models import Entity, EntityEvent
from vouchers.uscc import parse_uscc

__all__ = [
    "ENTITY_ID_PATTERN",
    "EVIDENCE_REF_LENGTH_MAX",
    "KEEP",
    "NAME_LENGTH_MAX",
    "REASON_LENGTH_MAX",
    "TAGS_MAX",
    "TAG_PATTERN",
    "EligibilityOverride",
    "Entity",
    "EntityChanges",
    "EntityEvent",
    "EntityExists",
    "EntityKind",
    "EntityNotFound",
    "EntityUpdate",
    "InvalidEntity",
    "NewEntity",
    "OverrideChange",
    "create_entity",
    "entity_exists",
    "find_entity",
    "get_entity",
    "id_document_hmac",
    "id_document_key",
    "list_entities",
    "list_entity_events",
    "normalise_evidence_ref",
    "normalise_id_document_no",
    "normalise_kind",
    "normalise_name",
    "normalise_reason",
    "normalise_tags",
    "update_entity",
]


class EntityKind(StrEnum):
    ENTERPRISE = "enterprise"
    PROVIDER = "provider"
    INSTITUTION = "institution"
    ASSOCIATION = "association"
    DEPARTMENT = "department"
    PERSON = "person"  # a natural person: a party to relations, never a recipient (POLICY.md; art. 25)


# Limits, each matched by a CHECK in migration 0003.
NAME_LENGTH_MAX = 200
REASON_LENGTH_MAX = 1000
EVIDENCE_REF_LENGTH_MAX = 500
TAGS_MAX = 32
TAG_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,49}")
ENTITY_ID_PATTERN = re.compile(r"ent_[a-z0-9]{24}")
# An identity-document number once normalised: resident identity cards (18, the last possibly X), passports,
# Hong Kong, Macao and Taiwan permits (letters, digits, parentheses, hyphens)
_ID_DOCUMENT_PATTERN = re.compile(r"[0-9A-Z()\-]{4,64}")
# HKDF's info: the key is for this one purpose, so it is never the key of anything else the KEK protects
_ID_DOCUMENT_KEY_INFO = b"voucher-ledger/entity/id-document-hmac/v1"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 24


# --------------------------------------------------------------------------------------------------------
# Errors


class EntityNotFound(VoucherError):
    code = "not_found"


class EntityExists(VoucherError):
    """An entity with this unified social credit code is registered already (one code, one entity)."""

    code = "entity_exists"

    def __init__(self, detail: str, *, existing_id: str) -> None:
        super().__init__(detail)
        self.existing_id = existing_id


class InvalidEntity(VoucherError):
    """A name, tag, kind or reason the registry does not take; `field` names it."""

    code = "validation_error"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail)
        self.field = field


# --------------------------------------------------------------------------------------------------------
# Pure rules


def _bounded_text(value: str, *, field: str, length_max: int) -> str:
    text = value.strip()
    if not 1 <= len(text) <= length_max:
        raise InvalidEntity(f"{field} must be 1 to {length_max} characters (surrounding spaces aside)", field=field)
    return text


def normalise_name(name: str) -> str:
    return _bounded_text(name, field="name", length_max=NAME_LENGTH_MAX)


def normalise_reason(reason: str) -> str:
    return _bounded_text(reason, field="reason", length_max=REASON_LENGTH_MAX)


def normalise_evidence_ref(evidence_ref: str) -> str:
    return _bounded_text(evidence_ref, field="evidence_ref", length_max=EVIDENCE_REF_LENGTH_MAX)


def normalise_kind(kind: str) -> EntityKind:
    try:
        return EntityKind(kind)
    except ValueError:
        kinds = ", ".join(k.value for k in EntityKind)
        raise InvalidEntity(f"kind {kind[:60]!r} is not one of {kinds}", field="kind") from None


def normalise_id_document_no(number: str) -> str:
    """The number as it is hashed: NFKC (full-width digits and letters, common in Chinese input, become
    ASCII), spaces around it trimmed, upper case (a resident card's check character x is X). The message of
    a refusal never repeats the number."""
    normalised = unicodedata.normalize("NFKC", number).strip().upper()
    if not _ID_DOCUMENT_PATTERN.fullmatch(normalised):
        raise InvalidEntity(
            "id_document_no must be 4 to 64 letters, digits, hyphens or parentheses (spaces around it and lower "
            "case are accepted)",
            field="id_document_no",
        )
    return normalised


def id_document_key(kek: Kek) -> bytes:
    """The HMAC key for identity-document numbers: HKDF-SHA256 of the KEK with a fixed info string (no salt:
    the KEK is already uniformly random). Derived, so it is as safe as the KEK and needs no storage of its
    own; separate, so a hash never doubles as anything the KEK seals."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_ID_DOCUMENT_KEY_INFO).derive(kek.key)


def id_document_hmac(key: bytes, number: str) -> bytes:
    """HMAC-SHA256 of the normalised number: equal for one person however the number was typed, and
    without the key not testable against the few billion numbers a resident card can have."""
    return hmac.new(key, normalise_id_document_no(number).encode("ascii"), hashlib.sha256).digest()


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Tags are a set: deduplicated and sorted. Each is snake_case (`innovation_team`); they are names the
    policy reads (POLICY.md: `multimodal_foundation_model`, `innovation_team`), so they are not case-folded:
    `Innovation_Team` is refused rather than silently read as another tag."""
    unique = set()
    for tag in tags:
        if not TAG_PATTERN.fullmatch(tag):
            raise InvalidEntity(
                f"tag {tag[:60]!r} is not a tag: lower-case snake_case, a letter first, at most 50 characters",
                field="tags",
            )
        unique.add(tag)
    if len(unique) > TAGS_MAX:
        raise InvalidEntity(f"an entity has at most {TAGS_MAX} tags, not {len(unique)}", field="tags")
    return tuple(sorted(unique))


@dataclass(frozen=True, slots=True)
class NewEntity:
    """An organisation by its `uscc`, or a person (`kind` person) by its `id_document_no`, never both."""

    uscc: str | None
    name: str
    kind: EntityKind
    tags: Sequence[str] = ()
    id_document_no: str | None = field(default=None, repr=False)  # hashed at once, never kept or shown


@dataclass(frozen=True, slots=True)
class EligibilityOverride:
    """An administrator's decision on art. 25, either way, against the presumption."""

    eligible: bool
    reason: str
    evidence_ref: str


class _Keep(Enum):
    KEEP = "keep"


KEEP: Literal[_Keep.KEEP] = _Keep.KEEP
"""`EntityChanges.eligibility_override`'s default: leave the eligibility as it is (None clears an override)."""
OverrideChange = EligibilityOverride | None | Literal[_Keep.KEEP]


@dataclass(frozen=True, slots=True)
class EntityChanges:
    """A PATCH: None (KEEP for the override) leaves a field alone; `eligibility_override=None` returns the
    entity to the presumption. `reason` explains the changes that carry no reason of their own (a rename,
    new tags, clearing an override, which requires it); an override's own reason explains the override."""

    name: str | None = None
    kind: EntityKind | None = None
    tags: Sequence[str] | None = None
    eligibility_override: OverrideChange = KEEP
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class EntityUpdate:
    """The entity after a PATCH, what the PATCH recorded, and the tag sets on either side of it, so a caller
    can act on a tag that appeared (免申即享, art. 19: tagging an entity `innovation_team`)."""

    entity: Entity
    events: tuple[EntityEvent, ...]
    tags_before: frozenset[str]
    tags_after: frozenset[str]

    @property
    def tags_added(self) -> frozenset[str]:
        return self.tags_after - self.tags_before

    @property
    def tags_removed(self) -> frozenset[str]:
        return self.tags_before - self.tags_after


@dataclass(frozen=True, slots=True)
class _Eligibility:
    eligible: bool
    overridden: bool
    reason: str | None
    evidence_ref: str | None

    @classmethod
    def of(cls, entity: Entity) -> _Eligibility:
        return cls(
            entity.eligible, entity.eligibility_overridden, entity.eligibility_reason, entity.eligibility_evidence_ref
        )

    def as_change(self) -> dict[str, Any]:
        return {
            "eligible": self.eligible,
            "overridden": self.overridden,
            "reason": self.reason,
            "evidence_ref": self.evidence_ref,
        }


def _snapshot(entity: Entity) -> dict[str, Any]:
    return {
        "uscc": entity.uscc,
        "name": entity.name,
        "kind": entity.kind,
        "tags": list(entity.tags),
        "division_code": entity.division_code,
        "guangzhou_registered": entity.guangzhou_registered,
        "eligible": entity.eligible,
    }


def _new_id() -> str:
    entity_id = "ent_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))
    assert ENTITY_ID_PATTERN.fullmatch(entity_id)
    return entity_id


# --------------------------------------------------------------------------------------------------------
# Commands (they flush; the caller commits)


async def create_entity(
    session: AsyncSession, new: NewEntity, *, actor_key_id: str | None, id_document_key: bytes | None = None
) -> Entity:
    """Register an entity and its `created` event. `InvalidUscc` for a code that is not one,
    `EntityExists` when the code (or a person's document) is registered already: either way nothing is
    written. A person needs `id_document_key` (see `id_document_key()`)."""
    name = normalise_name(new.name)
    kind = normalise_kind(new.kind)
    tags = normalise_tags(new.tags)
    if kind is EntityKind.PERSON:
        return await _create_person(session, new, name, tags, actor_key_id, id_document_key)
    if new.id_document_no is not None:
        raise InvalidEntity("only a person (kind person) is identified by id_document_no", field="id_document_no")
    if new.uscc is None:
        raise InvalidEntity(f"a {kind.value} is identified by its uscc", field="uscc")
    uscc = parse_uscc(new.uscc)
    # ON CONFLICT DO NOTHING, not a failed INSERT: the caller's transaction stays usable, and of two
    # concurrent registrations of one code the second waits for the first and then finds it.
    statement = (
        insert(Entity)
        .values(
            id=_new_id(),
            uscc=uscc.code,
            name=name,
            kind=kind.value,
            division_code=uscc.division_code,
            guangzhou_registered=uscc.guangzhou_registered,
            # art. 25: the division code is the presumption until an administrator overrides it
            eligible=uscc.guangzhou_registered,
            eligibility_overridden=False,
            tags=list(tags),
        )
        .on_conflict_do_nothing(index_elements=[Entity.uscc])
        .returning(Entity)
    )
    entity = (await session.scalars(statement)).one_or_none()
    if entity is None:
        existing_id = await session.scalar(select(Entity.id).where(Entity.uscc == uscc.code))
        assert existing_id is not None
        raise EntityExists(
            f"an entity with uscc {uscc.code} is registered already: {existing_id}", existing_id=existing_id
        )
    return await _created(session, entity, actor_key_id)


async def _create_person(
    session: AsyncSession,
    new: NewEntity,
    name: str,
    tags: tuple[str, ...],
    actor_key_id: str | None,
    key: bytes | None,
) -> Entity:
    if new.uscc is not None:
        raise InvalidEntity("a person has no uscc: it is identified by id_document_no", field="uscc")
    if new.id_document_no is None:
        raise InvalidEntity("a person is identified by id_document_no", field="id_document_no")
    assert key is not None, "registering a person needs the identity-document key"
    digest = id_document_hmac(key, new.id_document_no)
    statement = (
        insert(Entity)
        .values(
            id=_new_id(),
            uscc=None,
            id_document_hmac=digest,
            name=name,
            kind=EntityKind.PERSON.value,
            division_code=None,
            guangzhou_registered=False,
            # art. 25 supports registered enterprises: a person is never presumed eligible
            eligible=False,
            eligibility_overridden=False,
            tags=list(tags),
        )
        .on_conflict_do_nothing(index_elements=[Entity.id_document_hmac])
        .returning(Entity)
    )
    entity = (await session.scalars(statement)).one_or_none()
    if entity is None:
        existing_id = await session.scalar(select(Entity.id).where(Entity.id_document_hmac == digest))
        assert existing_id is not None
        raise EntityExists(
            f"a person with this identity document is registered already: {existing_id}", existing_id=existing_id
        )
    return await _created(session, entity, actor_key_id)


async def _created(session: AsyncSession, entity: Entity, actor_key_id: str | None) -> Entity:
    session.add(
        EntityEvent(
            entity_id=entity.id,
            kind="created",
            change={"before": None, "after": _snapshot(entity)},
            actor_key_id=actor_key_id,
        )
    )
    await session.flush()
    return entity


async def update_entity(
    session: AsyncSession, entity_id: str, changes: EntityChanges, *, actor_key_id: str | None
) -> EntityUpdate:
    """Apply a PATCH under the entity's row lock, one event per field that really changes (a PATCH that
    changes nothing writes nothing)."""
    name = normalise_name(changes.name) if changes.name is not None else None
    kind = normalise_kind(changes.kind) if changes.kind is not None else None
    tags = normalise_tags(changes.tags) if changes.tags is not None else None
    reason = normalise_reason(changes.reason) if changes.reason is not None else None
    override = changes.eligibility_override
    if isinstance(override, EligibilityOverride):
        override = EligibilityOverride(
            eligible=override.eligible,
            reason=normalise_reason(override.reason),
            evidence_ref=normalise_evidence_ref(override.evidence_ref),
        )
    elif override is None and reason is None:
        raise InvalidEntity("clearing an eligibility override needs a reason", field="reason")

    query = select(Entity).where(Entity.id == entity_id).with_for_update().execution_options(populate_existing=True)
    entity = await session.scalar(query)
    if entity is None:
        raise EntityNotFound(f"no entity {entity_id}")
    tags_before = frozenset(entity.tags)
    events: list[EntityEvent] = []

    def record(kind_: str, before: Any, after: Any, why: str | None, evidence_ref: str | None = None) -> None:
        events.append(
            EntityEvent(
                entity_id=entity.id,
                kind=kind_,
                change={"before": before, "after": after},
                reason=why,
                evidence_ref=evidence_ref,
                actor_key_id=actor_key_id,
            )
        )

    if name is not None and name != entity.name:
        record("renamed", entity.name, name, reason)
        entity.name = name
    if kind is not None and kind.value != entity.kind:
        if EntityKind.PERSON.value in (kind.value, entity.kind):
            raise InvalidEntity(
                "a person stays a person and nothing else becomes one: a person is identified by its identity "
                "document, every other kind by its uscc; register the other party as a new entity",
                field="kind",
            )
        record("kind", entity.kind, kind.value, reason)
        entity.kind = kind.value
    if tags is not None and list(tags) != list(entity.tags):
        record("tags", list(entity.tags), list(tags), reason)
        entity.tags = list(tags)
    if isinstance(override, EligibilityOverride) and override.eligible and entity.kind == EntityKind.PERSON.value:
        raise InvalidEntity(
            "a natural person cannot be made eligible: art. 25 supports registered enterprises",
            field="eligibility_override",
        )
    if override is not KEEP:
        before = _Eligibility.of(entity)
        if override is None:  # back to the presumption from the division code (art. 25)
            after = _Eligibility(entity.guangzhou_registered, False, None, None)
            why = reason
        else:
            after = _Eligibility(override.eligible, True, override.reason, override.evidence_ref)
            why = override.reason
        if after != before:
            record("eligibility", before.as_change(), after.as_change(), why, after.evidence_ref)
            entity.eligible = after.eligible
            entity.eligibility_overridden = after.overridden
            entity.eligibility_reason = after.reason
            entity.eligibility_evidence_ref = after.evidence_ref

    if events:
        entity.updated_at = func.now()  # SQL expression: the row's clock, fetched back by the refresh
        session.add_all(events)
        await session.flush()
        await session.refresh(entity)
    return EntityUpdate(entity=entity, events=tuple(events), tags_before=tags_before, tags_after=frozenset(entity.tags))


# --------------------------------------------------------------------------------------------------------
# Queries


async def find_entity(session: AsyncSession, entity_id: str) -> Entity | None:
    return await session.scalar(select(Entity).where(Entity.id == entity_id))


async def get_entity(session: AsyncSession, entity_id: str) -> Entity:
    entity = await find_entity(session, entity_id)
    if entity is None:
        raise EntityNotFound(f"no entity {entity_id}")
    return entity


async def entity_exists(session: AsyncSession, entity_id: str) -> bool:
    found = await session.scalar(select(Entity.id).where(Entity.id == entity_id))
    return found is not None


async def list_entities(
    session: AsyncSession,
    *,
    after: tuple[datetime, str] | None,
    limit: int,
    tag: str | None = None,
    kind: EntityKind | None = None,
    uscc: str | None = None,
) -> Sequence[Entity]:
    """Newest first, `limit` entities after the key `(created_at, id)`, filtered: carrying `tag`, of `kind`,
    with the normalised code `uscc`."""
    query = select(Entity).order_by(Entity.created_at.desc(), Entity.id.desc()).limit(limit)
    if after is not None:
        query = query.where(tuple_(Entity.created_at, Entity.id) < tuple_(*after))
    if tag is not None:
        query = query.where(Entity.tags.contains([tag]))  # @>, served by the GIN index
    if kind is not None:
        query = query.where(Entity.kind == kind.value)
    if uscc is not None:
        query = query.where(Entity.uscc == uscc)
    return (await session.scalars(query)).all()


async def list_entity_events(
    session: AsyncSession, entity_id: str, *, after: int | None, limit: int
) -> Sequence[EntityEvent]:
    """The entity's history, oldest first, `limit` events after the event id `after`."""
    query = select(EntityEvent).where(EntityEvent.entity_id == entity_id).order_by(EntityEvent.id).limit(limit)
    if after is not None:
        query = query.where(EntityEvent.id > after)
    return (await session.scalars(query)).all()
