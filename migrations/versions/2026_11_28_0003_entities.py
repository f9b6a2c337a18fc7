"""Entities (the registry of who may receive or redeem money) and their history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

An entity is identified by its unified social credit code (统一社会信用代码, GB 32100-2015), stored normalised
(upper case, 18 characters). `division_code` (characters 3-8) and `guangzhou_registered` (division 4401xx)
are derived from it; `eligible` (art. 25) is presumed from the division code and an administrator may
override it either way, with a reason and an evidence reference: every change lands in entity_event.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE entity (
    id text PRIMARY KEY,
    uscc text NOT NULL,
    name text NOT NULL,
    kind text NOT NULL,
    division_code text NOT NULL,
    guangzhou_registered boolean NOT NULL,
    eligible boolean NOT NULL,
    eligibility_overridden boolean NOT NULL DEFAULT false,
    eligibility_reason text,
    eligibility_evidence_ref text,
    tags text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT entity_uscc_unique UNIQUE (uscc),
    CONSTRAINT entity_id_format CHECK (id ~ '^ent_[a-z0-9]{24}$'),
    CONSTRAINT entity_uscc_format CHECK (uscc ~ '^[0-9A-HJ-NPQRTUWXY]{18}$'),
    CONSTRAINT entity_division_from_uscc CHECK (division_code = substr(uscc, 3, 6)),
    CONSTRAINT entity_guangzhou_from_division CHECK (guangzhou_registered = (division_code LIKE '4401%')),
    CONSTRAINT entity_kind CHECK (kind IN ('enterprise', 'provider', 'institution', 'association', 'department')),
    CONSTRAINT entity_name_length CHECK (length(name) BETWEEN 1 AND 200),
    -- an override always says why and on what evidence
    CONSTRAINT entity_override_explained CHECK (
        NOT eligibility_overridden
        OR (eligibility_reason IS NOT NULL AND length(eligibility_reason) BETWEEN 1 AND 1000
            AND eligibility_evidence_ref IS NOT NULL AND length(eligibility_evidence_ref) BETWEEN 1 AND 500)),
    CONSTRAINT entity_presumed_eligibility CHECK (eligibility_overridden OR eligible = guangzhou_registered),
    CONSTRAINT entity_tags_bounded CHECK (cardinality(tags) <= 32 AND coalesce(array_ndims(tags), 1) = 1)
);
CREATE INDEX entity_created_at_id ON entity (created_at, id);
CREATE INDEX entity_tags ON entity USING gin (tags);

-- What changed, when, by which key, and why: the history of eligibility overrides, tags and names.
CREATE TABLE entity_event (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_id text NOT NULL REFERENCES entity (id),
    kind text NOT NULL,
    change jsonb NOT NULL,
    reason text,
    evidence_ref text,
    actor_key_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT entity_event_kind CHECK (kind IN ('created', 'renamed', 'tags', 'eligibility', 'kind'))
);
CREATE INDEX entity_event_entity ON entity_event (entity_id, id);

CREATE FUNCTION entity_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'entity_event is append-only: % refused', TG_OP USING ERRCODE = 'VL001';
END $$;
CREATE TRIGGER entity_event_append_only BEFORE UPDATE OR DELETE ON entity_event
    FOR EACH ROW EXECUTE FUNCTION entity_event_append_only();
CREATE TRIGGER entity_event_no_truncate BEFORE TRUNCATE ON entity_event
    FOR EACH STATEMENT EXECUTE FUNCTION entity_event_append_only();

-- An entity is never deleted (the journal and the history name it); its code never changes.
CREATE FUNCTION entity_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'entities are never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.uscc <> OLD.uscc OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'an entity''s id and unified social credit code never change' USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER entity_guard BEFORE UPDATE OR DELETE ON entity
    FOR EACH ROW EXECUTE FUNCTION entity_guard();
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS entity_event;
DROP TABLE IF EXISTS entity;
DROP FUNCTION IF EXISTS entity_event_append_only();
DROP FUNCTION IF EXISTS entity_guard();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
