"""Signing keys (Ed25519, private halves encrypted at rest) and the voucher tokens they sign.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28

A key is never deleted: retired keys sign nothing new but stay published in the JWKS while a token or an
export they signed may still need checking. A token row records what the token may do (its audience and
spending limit) and how much has been spent with it, so that the limit holds across every redemption.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE signing_key (
    kid text PRIMARY KEY,
    public_jwk jsonb NOT NULL,
    private_key_encrypted bytea NOT NULL,
    kek_id text NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz,
    CONSTRAINT signing_key_status CHECK (status IN ('active', 'retired')),
    CONSTRAINT signing_key_retired CHECK ((status = 'retired') = (retired_at IS NOT NULL)),
    CONSTRAINT signing_key_public_only CHECK (NOT (public_jwk ? 'd'))
);
-- exactly one key signs at a time
CREATE UNIQUE INDEX signing_key_one_active ON signing_key (status) WHERE status = 'active';

CREATE FUNCTION signing_key_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'signing keys are retired, never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.kid <> OLD.kid OR NEW.public_jwk <> OLD.public_jwk OR NEW.created_at <> OLD.created_at
       OR (OLD.status = 'retired' AND NEW.status <> 'retired') THEN
        RAISE EXCEPTION 'a signing key only ever changes from active to retired' USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER signing_key_guard BEFORE UPDATE OR DELETE ON signing_key
    FOR EACH ROW EXECUTE FUNCTION signing_key_guard();

CREATE TABLE voucher_token (
    jti text PRIMARY KEY,
    voucher_id text NOT NULL REFERENCES voucher (id),
    kid text NOT NULL REFERENCES signing_key (kid),
    audience_entity_id text REFERENCES entity (id),
    max_amount_fen bigint,
    spent_fen bigint NOT NULL DEFAULT 0,
    issued_by text,
    issued_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    revoked_by text,
    CONSTRAINT voucher_token_jti_format CHECK (jti ~ '^tok_[a-z0-9]{24}$'),
    CONSTRAINT voucher_token_limit CHECK (
        max_amount_fen IS NULL OR (max_amount_fen > 0 AND spent_fen <= max_amount_fen)),
    CONSTRAINT voucher_token_spent CHECK (spent_fen >= 0),
    CONSTRAINT voucher_token_window CHECK (expires_at > issued_at),
    CONSTRAINT voucher_token_revoked CHECK (revoked_by IS NULL OR revoked_at IS NOT NULL)
);
CREATE INDEX voucher_token_voucher ON voucher_token (voucher_id);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS voucher_token;
DROP TABLE IF EXISTS signing_key;
DROP FUNCTION IF EXISTS signing_key_guard();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
