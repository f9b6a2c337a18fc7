"""API keys: who calls, in which role, for which entity.

A key reads `vl_<prefix>_<secret>`: the prefix (12 characters of [a-z0-9]) is public and finds the row; the
secret is 256 random bits. Only the SHA-256 of the whole key is stored, compared in constant time, and the
key itself is shown once, at creation. Keys are never logged (app/log.py masks any that slips into a
message).

Verified keys are cached in the process for `api_key_cache_ttl_s` seconds, so a hot provider key costs no
database round trip per request; a revocation therefore takes up to that long to reach other processes
(the process that revoked forgets the key at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints, ValidationInfo, field_validator
from sqlalchemy import DateTime, LargeBinary, Text, func, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.errors import NotFound, Unauthorized, ValidationFailed
from app.roles import Role
from app.schemas import RequestModel
from vouchers.entities import Entity, EntityKind

log = logging.getLogger(__name__)


# Roles that act for one entity, and so must name it.
ENTITY_ROLES = frozenset({Role.ENTERPRISE, Role.PROVIDER})


class VoucherType(StrEnum):
    COMPUTE = "compute"
    DATA = "data"
    SCENARIO = "scenario"
    MODEL = "model"


PREFIX_LENGTH = 12
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 24
# token_urlsafe(32): 32 random bytes, 43 base64url characters
SECRET_BYTES = 32
KEY_PATTERN = re.compile(r"vl_([a-z0-9]{12})_([A-Za-z0-9_-]{43})")
# last_used_at is written at most this often per key: a hot key must not turn every request into a write
TOUCH_INTERVAL_S = 60.0
_TOUCH_TIMEOUT_S = 5.0
CACHE_SIZE_MAX = 10_000


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_key"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 (created_at comes back with the INSERT)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    prefix: Mapped[str] = mapped_column(Text, unique=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary)
    role: Mapped[str] = mapped_column(Text)
    entity_id: Mapped[str | None] = mapped_column(Text)
    voucher_types: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


EntityId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class ApiKeyCreate(RequestModel):
    """A new key: the HTTP body of `POST /v1/api-keys` and the options of `voucher-ledger apikey create`."""

    role: Role
    name: KeyName
    entity_id: EntityId | None = Field(
        default=None, validate_default=True, description="required for enterprise and provider keys, else absent"
    )
    voucher_types: list[VoucherType] | None = Field(
        default=None,
        validate_default=True,
        min_length=1,
        max_length=len(VoucherType),
        description="admin keys only: limit the key to these voucher types (absent: all)",
    )

    @field_validator("entity_id")
    @classmethod
    def _entity_by_role(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role in ENTITY_ROLES and value is None:
            raise ValueError(f"a {role} key acts for one entity: entity_id is required")
        if role is not None and role not in ENTITY_ROLES and value is not None:
            raise ValueError(f"a {role} key acts for no entity: entity_id must be absent")
        return value

    @field_validator("voucher_types")
    @classmethod
    def _types_for_admins(cls, value: list[VoucherType] | None, info: ValidationInfo) -> list[VoucherType] | None:
        role = info.data.get("role")
        if value is not None and role is not None and role is not Role.ADMIN:
            raise ValueError("voucher_types only limits admin keys")
        return sorted(set(value)) if value is not None else None


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of a request."""

    key_id: str
    role: Role
    entity_id: str | None
    # admins: the voucher types the key may administer (None: all); other roles: None
    voucher_types: frozenset[VoucherType] | None

    def administers(self, voucher_type: VoucherType | str) -> bool:
        return self.role is Role.ADMIN and (
            self.voucher_types is None or VoucherType(voucher_type) in self.voucher_types
        )

    @property
    def unrestricted(self) -> bool:
        """An admin limited to no voucher type: the only caller that changes the registry (API keys, entities,
        affiliations, external awards) or settles, since those move money in every program (API.md, "Admin
        scope")."""
        return self.role is Role.ADMIN and self.voucher_types is None


def role_fits_kind(role: Role, kind: EntityKind | str) -> bool:
    """A provider key acts for a provider entity (a compute provider, a data exchange, a model vendor); an
    enterprise key for any other kind: a key that redeems must belong to an entity registered to redeem. No key
    acts for a natural person: a person is a party to relations, never an applicant or a payee (art. 25)."""
    assert role in ENTITY_ROLES
    if EntityKind(kind) is EntityKind.PERSON:
        return False
    return (role is Role.PROVIDER) == (EntityKind(kind) is EntityKind.PROVIDER)


def caller_of(key: ApiKey) -> Caller:
    return Caller(
        key_id=key.id,
        role=Role(key.role),
        entity_id=key.entity_id,
        voucher_types=frozenset(VoucherType(t) for t in key.voucher_types) if key.voucher_types else None,
    )


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _random_string(length: int) -> str:
    return "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(length))


def new_key() -> tuple[str, str]:
    """A fresh key and its prefix."""
    prefix = _random_string(PREFIX_LENGTH)
    key = f"vl_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    assert KEY_PATTERN.fullmatch(key)
    return key, prefix


# --------------------------------------------------------------------------------------------------------
# Repository and commands (they flush; the caller commits)


async def create_api_key(session: AsyncSession, request: ApiKeyCreate) -> tuple[ApiKey, str]:
    """Insert a key; return its row and the key itself, which exists nowhere else from now on. A key acts for
    a registered entity whose kind fits its role only (`422 validation_error` on `entity_id` otherwise).

    The entity row is share-locked until the caller commits, so a concurrent change of its kind (which
    checks the entity's live keys under the row's update lock) sees this key or waits for it."""
    if request.entity_id is not None:
        kind = await session.scalar(
            select(Entity.kind).where(Entity.id == request.entity_id).with_for_update(read=True)
        )
        if kind is None:
            raise ValidationFailed(f"no entity {request.entity_id} is registered", loc=("body", "entity_id"))
        if not role_fits_kind(request.role, kind):
            raise ValidationFailed(
                f"entity {request.entity_id} is of kind {kind}: a provider key binds to a provider entity only, "
                "an enterprise key to an entity of any other kind, and no key to a natural person",
                loc=("body", "entity_id"),
            )
    key, prefix = new_key()
    row = ApiKey(
        id="key_" + _random_string(_ID_LENGTH),
        prefix=prefix,
        secret_hash=hash_key(key),
        role=request.role.value,
        entity_id=request.entity_id,
        voucher_types=[t.value for t in request.voucher_types] if request.voucher_types else None,
        name=request.name,
    )
    session.add(row)
    await session.flush()
    return row, key


async def live_keys_unfit_for(session: AsyncSession, entity_id: str, kind: EntityKind) -> Sequence[str]:
    """The ids of the entity's unrevoked keys whose role would not fit `kind`: a change of kind must wait until
    they are revoked. Call it with the entity row locked for update (see `create_api_key`)."""
    unfit = Role.ENTERPRISE if kind is EntityKind.PROVIDER else Role.PROVIDER
    query = (
        select(ApiKey.id)
        .where(ApiKey.entity_id == entity_id, ApiKey.role == unfit.value, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.id)
    )
    return (await session.scalars(query)).all()


async def list_api_keys(session: AsyncSession, *, after: tuple[datetime, str] | None, limit: int) -> Sequence[ApiKey]:
    """Newest first, `limit` rows after the key `(created_at, id)`."""
    query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id.desc()).limit(limit)
    if after is not None:
        query = query.where(tuple_(ApiKey.created_at, ApiKey.id) < tuple_(*after))
    return (await session.scalars(query)).all()


async def revoke_api_key(session: AsyncSession, key_id: str) -> ApiKey:
    """Revoke a key (revoking a revoked key changes nothing and answers the same record)."""
    query = select(ApiKey).where(ApiKey.id == key_id).with_for_update().execution_options(populate_existing=True)
    row = await session.scalar(query)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=func.now()))
        await session.refresh(row)
    return row


# --------------------------------------------------------------------------------------------------------
# Authentication


@dataclass(slots=True)
class _Verified:
    caller: Caller
    secret_hash: bytes
    expires_at: float


class ApiKeyAuthenticator:
    """Verifies presented keys (with a short in-process cache) and records their use, one per process."""

    def __init__(self, engine: AsyncEngine, *, cache_ttl_s: float) -> None:
        self._engine = engine
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, _Verified] = {}
        self._touched_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def cached(self, presented: str) -> Caller | None:
        """The caller of a key verified within the cache's TTL, with no database access; None when the key
        must be looked up (`authenticate`). A malformed or wrong key is `Unauthorized` either way."""
        match = KEY_PATTERN.fullmatch(presented)
        if match is None:
            raise Unauthorized("the API key is malformed: expected vl_<prefix>_<secret>")
        now = time.monotonic()
        verified = self._cache.get(match[1])
        if verified is None or verified.expires_at <= now:
            return None
        if not hmac.compare_digest(hash_key(presented), verified.secret_hash):
            raise Unauthorized("the API key is not recognized")
        self._touch_soon(verified.caller.key_id, None, now)
        return verified.caller

    async def authenticate(self, session: AsyncSession, presented: str) -> Caller:
        match = KEY_PATTERN.fullmatch(presented)
        if match is None:
            raise Unauthorized("the API key is malformed: expected vl_<prefix>_<secret>")
        prefix = match[1]
        digest = hash_key(presented)
        now = time.monotonic()
        verified = self._cache.get(prefix)
        if verified is None or verified.expires_at <= now:
            row = await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if row is None or not hmac.compare_digest(digest, row.secret_hash):
                raise Unauthorized("the API key is not recognized")
            if row.revoked_at is not None:
                self._cache.pop(prefix, None)
                raise Unauthorized("the API key has been revoked")
            verified = _Verified(caller_of(row), row.secret_hash, now + self._cache_ttl_s)
            if self._cache_ttl_s > 0:
                self._remember(prefix, verified, now)
            self._touch_soon(row.id, row.last_used_at, now)
        else:
            if not hmac.compare_digest(digest, verified.secret_hash):
                raise Unauthorized("the API key is not recognized")
            self._touch_soon(verified.caller.key_id, None, now)
        return verified.caller

    def forget(self, prefix: str) -> None:
        """Drop a key from this process's cache (after revoking it here)."""
        self._cache.pop(prefix, None)

    def _remember(self, prefix: str, verified: _Verified, now: float) -> None:
        if len(self._cache) >= CACHE_SIZE_MAX:
            for stale in [p for p, v in self._cache.items() if v.expires_at <= now]:
                del self._cache[stale]
            while len(self._cache) >= CACHE_SIZE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[prefix] = verified

    def _touch_soon(self, key_id: str, last_used_at: datetime | None, now: float) -> None:
        touched_at = self._touched_at.get(key_id)
        if touched_at is None and last_used_at is not None:
            age_s = (datetime.now(UTC) - last_used_at).total_seconds()
            if 0 <= age_s < TOUCH_INTERVAL_S:
                touched_at = now - age_s
                self._touched_at[key_id] = touched_at
        if touched_at is not None and now - touched_at < TOUCH_INTERVAL_S:
            return
        if len(self._touched_at) >= CACHE_SIZE_MAX:
            self._touched_at.clear()
        self._touched_at[key_id] = now
        task = asyncio.get_running_loop().create_task(self._touch(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, key_id: str) -> None:
        """Record a use in its own short transaction; a failure costs a log line, never the request."""
        stale = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < func.now() - text("interval '1 minute'"))
        try:
            async with asyncio.timeout(_TOUCH_TIMEOUT_S), self._engine.begin() as connection:
                await connection.execute(
                    update(ApiKey).where(ApiKey.id == key_id, stale).values(last_used_at=func.now())
                )
        except Exception as exc:
            log.warning("could not record the use of API key %s: %s", key_id, type(exc).__name__)

    async def aclose(self) -> None:
        """Let pending use records finish (briefly), then drop them."""
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_TOUCH_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._cache.clear()
