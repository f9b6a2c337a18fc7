"""ORM mappings of the voucher domain's tables. The schema itself is the migrations' (constraints and
triggers live there); these classes only name the columns for the repositories."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Identity, LargeBinary, Text, func
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Entity", "EntityEvent"]


class Base(DeclarativeBase):
    pass


class Entity(Base):
    """migrations/versions/2026_11_28_0003_entities.py; persons (no code, a keyed hash): 0017"""

    __tablename__ = "entity"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    uscc: Mapped[str | None] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    division_code: Mapped[str | None] = mapped_column(Text)
    id_document_hmac: Mapped[bytes | None] = mapped_column(LargeBinary, unique=True)
    guangzhou_registered: Mapped[bool] = mapped_column(Boolean)
    eligible: Mapped[bool] = mapped_column(Boolean)
    eligibility_overridden: Mapped[bool] = mapped_column(Boolean, server_default="false")
    eligibility_reason: Mapped[str | None] = mapped_column(Text)
    eligibility_evidence_ref: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class EntityEvent(Base):
    """One change to an entity (append-only): what, before and after, why, on what evidence, by which key."""

    __tablename__ = "entity_event"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    entity_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    change: Mapped[dict[str, Any]] = mapped_column(JSONB)
    reason: Mapped[str | None] = mapped_column(Text)
    evidence_ref: Mapped[str | None] = mapped_column(Text)
    actor_key_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
