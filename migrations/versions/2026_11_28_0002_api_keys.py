"""API keys: who calls, in which role, for which entity.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

The rules app/apikeys.py checks are checked here again: the role's shape (an entity for enterprise and
provider keys, none for the others; voucher types for admin keys only, from the known four), the key's
format, and the row's history: the key material, role and entity never change, a revocation is final,
and a key row is never deleted (the journal's metadata may name the key that asked for an entry).
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE api_key (
    id text PRIMARY KEY,
    prefix text NOT NULL,
    secret_hash bytea NOT NULL,
    role text NOT NULL,
    entity_id text,
    voucher_types text[],
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT api_key_prefix_unique UNIQUE (prefix),
    CONSTRAINT api_key_id_format CHECK (id ~ '^key_[a-z0-9]{24}$'),
    CONSTRAINT api_key_prefix_format CHECK (prefix ~ '^[a-z0-9]{12}$'),
    CONSTRAINT api_key_secret_hash_length CHECK (length(secret_hash) = 32),
    CONSTRAINT api_key_role CHECK (role IN ('admin', 'enterprise', 'provider', 'auditor')),
    CONSTRAINT api_key_entity_by_role CHECK ((role IN ('enterprise', 'provider')) = (entity_id IS NOT NULL)),
    CONSTRAINT api_key_entity_id_format CHECK (entity_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    CONSTRAINT api_key_voucher_types_admin_only CHECK (voucher_types IS NULL OR role = 'admin'),
    CONSTRAINT api_key_voucher_types_known CHECK (
        voucher_types IS NULL
        OR (array_ndims(voucher_types) = 1 AND cardinality(voucher_types) BETWEEN 1 AND 4
            AND voucher_types <@ ARRAY['compute', 'data', 'scenario', 'model']::text[])),
    CONSTRAINT api_key_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT api_key_revoked_after_created CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);
-- the listing's order: newest first, keyset-paginated on (created_at, id)
CREATE INDEX api_key_created_at_id ON api_key (created_at DESC, id DESC);

CREATE FUNCTION api_key_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'api keys are revoked, never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.prefix <> OLD.prefix OR NEW.secret_hash <> OLD.secret_hash
       OR NEW.role <> OLD.role OR NEW.entity_id IS DISTINCT FROM OLD.entity_id
       OR NEW.voucher_types IS DISTINCT FROM OLD.voucher_types OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'api key %: key material, role, entity and voucher types are fixed at creation', OLD.id
            USING ERRCODE = 'VL001';
    END IF;
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'api key % is revoked; a revocation is final', OLD.id USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER api_key_guard BEFORE UPDATE OR DELETE ON api_key
    FOR EACH ROW EXECUTE FUNCTION api_key_guard();
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS api_key;
DROP FUNCTION IF EXISTS api_key_guard();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
