"""Redemptions, subsidy holds, refunds, and idempotency records for the POSTs that move money.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28

An idempotency record is written in the same transaction as the postings it answers for: the same key and
body gets the first answer again, forever (keys never expire), and a refused request stays refused.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE idempotency_record (
    caller_key_id text NOT NULL,
    idempotency_key text NOT NULL,
    route text NOT NULL,
    request_hash bytea NOT NULL,
    status_code integer NOT NULL,
    response jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller_key_id, idempotency_key),
    CONSTRAINT idempotency_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT idempotency_hash_length CHECK (length(request_hash) = 32)
);

CREATE TABLE subsidy_hold (
    id text PRIMARY KEY,
    voucher_id text NOT NULL REFERENCES voucher (id),
    provider_entity_id text NOT NULL REFERENCES entity (id),
    jti text NOT NULL REFERENCES voucher_token (jti),
    amount_fen bigint NOT NULL,
    pending_entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    status text NOT NULL DEFAULT 'pending',
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CONSTRAINT subsidy_hold_id_format CHECK (id ~ '^hld_[a-z0-9]{24}$'),
    CONSTRAINT subsidy_hold_amount CHECK (amount_fen > 0),
    CONSTRAINT subsidy_hold_status CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    CONSTRAINT subsidy_hold_resolved CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX subsidy_hold_voucher ON subsidy_hold (voucher_id);
CREATE INDEX subsidy_hold_provider ON subsidy_hold (provider_entity_id, created_at);

CREATE TABLE redemption (
    id text PRIMARY KEY,
    voucher_id text NOT NULL REFERENCES voucher (id),
    provider_entity_id text NOT NULL REFERENCES entity (id),
    jti text NOT NULL REFERENCES voucher_token (jti),
    hold_id text REFERENCES subsidy_hold (id),
    invoice_no text NOT NULL,
    lines jsonb NOT NULL,
    excluded jsonb NOT NULL,
    eligible_fen bigint NOT NULL,
    subsidy_fen bigint NOT NULL,
    holder_pays_fen bigint NOT NULL,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    refunded_fen bigint NOT NULL DEFAULT 0,
    reversed_at timestamptz,
    reversal_entry_id bigint REFERENCES ledger_entry (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT redemption_id_format CHECK (id ~ '^rdm_[a-z0-9]{24}$'),
    -- one invoice is redeemed once at a provider (a retry is the idempotency record's job)
    CONSTRAINT redemption_invoice_once UNIQUE (provider_entity_id, invoice_no),
    CONSTRAINT redemption_amounts CHECK (
        eligible_fen >= 0 AND subsidy_fen > 0 AND holder_pays_fen >= 0
        AND refunded_fen >= 0 AND refunded_fen <= subsidy_fen),
    CONSTRAINT redemption_reversal CHECK ((reversed_at IS NULL) = (reversal_entry_id IS NULL))
);
CREATE INDEX redemption_voucher ON redemption (voucher_id, created_at);
CREATE INDEX redemption_provider ON redemption (provider_entity_id, created_at, id);

CREATE TABLE redemption_refund (
    id text PRIMARY KEY,
    redemption_id text NOT NULL REFERENCES redemption (id),
    amount_fen bigint NOT NULL,
    reason text NOT NULL,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT redemption_refund_id_format CHECK (id ~ '^rfd_[a-z0-9]{24}$'),
    CONSTRAINT redemption_refund_amount CHECK (amount_fen > 0),
    CONSTRAINT redemption_refund_reason CHECK (length(reason) BETWEEN 1 AND 1000)
);
CREATE INDEX redemption_refund_redemption ON redemption_refund (redemption_id);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS redemption_refund;
DROP TABLE IF EXISTS redemption;
DROP TABLE IF EXISTS subsidy_hold;
DROP TABLE IF EXISTS idempotency_record;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
