"""Settlements: what is payable to providers and award beneficiaries, paid out in batches.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28

A settlement is one ledger entry per batch (each payable account debited, the disbursement account
credited) and lists the items it covers.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE settlement (
    id text PRIMARY KEY,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    total_fen bigint NOT NULL,
    items_count integer NOT NULL,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT settlement_id_format CHECK (id ~ '^stl_[a-z0-9]{24}$'),
    CONSTRAINT settlement_total CHECK (total_fen > 0 AND items_count > 0)
);
CREATE INDEX settlement_created ON settlement (created_at, id);

CREATE TABLE settlement_item (
    settlement_id text NOT NULL REFERENCES settlement (id),
    entity_id text NOT NULL REFERENCES entity (id),
    account_code text NOT NULL,
    amount_fen bigint NOT NULL,
    PRIMARY KEY (settlement_id, entity_id),
    CONSTRAINT settlement_item_amount CHECK (amount_fen > 0)
);
CREATE INDEX settlement_item_entity ON settlement_item (entity_id);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS settlement_item;
DROP TABLE IF EXISTS settlement;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
