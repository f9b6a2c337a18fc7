"""Affiliations between entities (关联方, POLICY.md "Affiliated parties"), and a registry version that tells
each process cheaply whether its cached graph is stale.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

A relation is recorded once and never deleted: the only change it ever takes is an end (`valid_to` set
once, from NULL, with `ended_at`), so an old refusal can always be explained with the relations it saw.

Every statement that inserts or ends relations sets `affiliation_registry.version` to a fresh value of a
sequence, in the writer's transaction. Readers compare it with the version of their cached graph. Two
properties make this exact: the row is transactional (a process sees the new version exactly when it can
see the new relations), and a sequence value is never handed out twice (a transaction that rolls back
leaves a version nobody else will ever see, so no cache can confuse it with a committed state).
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE affiliation (
    id text PRIMARY KEY,
    from_entity_id text NOT NULL REFERENCES entity (id),
    to_entity_id text NOT NULL REFERENCES entity (id),
    kind text NOT NULL,
    equity_pct numeric(5, 2),
    valid_from date NOT NULL,
    valid_to date,
    source text,
    created_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    CONSTRAINT affiliation_id_format CHECK (id ~ '^aff_[a-z0-9]{24}$'),
    CONSTRAINT affiliation_kind CHECK (kind IN ('equity', 'control', 'personnel')),
    CONSTRAINT affiliation_not_self CHECK (from_entity_id <> to_entity_id),
    -- a percentage belongs to equity, and equity always has one
    CONSTRAINT affiliation_equity_pct CHECK (
        (kind = 'equity') = (equity_pct IS NOT NULL)
        AND (equity_pct IS NULL OR (equity_pct > 0 AND equity_pct <= 100))),
    CONSTRAINT affiliation_dates CHECK (valid_to IS NULL OR valid_to >= valid_from),
    CONSTRAINT affiliation_source_length CHECK (source IS NULL OR length(source) <= 500),
    CONSTRAINT affiliation_ended CHECK (ended_at IS NULL OR valid_to IS NOT NULL)
);
CREATE INDEX affiliation_from ON affiliation (from_entity_id, created_at, id);
CREATE INDEX affiliation_to ON affiliation (to_entity_id, created_at, id);
CREATE INDEX affiliation_created_at_id ON affiliation (created_at, id);

CREATE SEQUENCE affiliation_version;
CREATE TABLE affiliation_registry (
    singleton boolean PRIMARY KEY DEFAULT true,
    version bigint NOT NULL,
    CONSTRAINT affiliation_registry_singleton CHECK (singleton)
);
INSERT INTO affiliation_registry (version) VALUES (nextval('affiliation_version'));

-- Rows are never deleted; the one change allowed is an end: valid_to set once, from NULL, with ended_at.
CREATE FUNCTION affiliation_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'affiliations are never deleted: end one with valid_to' USING ERRCODE = 'VL001';
    END IF;
    IF OLD.valid_to IS NOT NULL OR NEW.valid_to IS NULL OR NEW.ended_at IS NULL
       OR (NEW.id, NEW.from_entity_id, NEW.to_entity_id, NEW.kind, NEW.valid_from, NEW.created_at)
          IS DISTINCT FROM (OLD.id, OLD.from_entity_id, OLD.to_entity_id, OLD.kind, OLD.valid_from, OLD.created_at)
       OR NEW.equity_pct IS DISTINCT FROM OLD.equity_pct OR NEW.source IS DISTINCT FROM OLD.source THEN
        RAISE EXCEPTION 'an affiliation only changes by being ended once (valid_to and ended_at set from NULL)'
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER affiliation_guard BEFORE UPDATE OR DELETE ON affiliation
    FOR EACH ROW EXECUTE FUNCTION affiliation_guard();

CREATE FUNCTION affiliation_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% refused: affiliations are never deleted', TG_OP USING ERRCODE = 'VL001';
END $$;
CREATE TRIGGER affiliation_no_truncate BEFORE TRUNCATE ON affiliation
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_no_truncate();
CREATE TRIGGER affiliation_registry_no_truncate BEFORE TRUNCATE ON affiliation_registry
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_no_truncate();

-- One bump per statement: a bulk load moves the version once.
CREATE FUNCTION affiliation_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE affiliation_registry SET version = nextval('affiliation_version');
    RETURN NULL;
END $$;
CREATE TRIGGER affiliation_bump_version AFTER INSERT OR UPDATE ON affiliation
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_bump_version();
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS affiliation;
DROP TABLE IF EXISTS affiliation_registry;
DROP SEQUENCE IF EXISTS affiliation_version;
DROP FUNCTION IF EXISTS affiliation_guard();
DROP FUNCTION IF EXISTS affiliation_no_truncate();
DROP FUNCTION IF EXISTS affiliation_bump_version();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
