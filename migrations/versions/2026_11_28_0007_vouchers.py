"""Vouchers after issue: how they end (revoked, expired), and awards reversed (clawback, 就高不重复).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28

A voucher ends once: `ended_at` is set exactly when it stops being active. A hold in flight when it ends
stays reserved (the provider may still capture or void it); `awaiting_holds` marks such a voucher until the
sweeper has returned whatever those holds give back. A reversed award keeps who reversed it, when and why,
beside its approval; its application row is never otherwise changed.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE voucher
    ADD COLUMN awaiting_holds boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT voucher_ended CHECK ((status = 'active') = (ended_at IS NULL)),
    ADD CONSTRAINT voucher_awaiting_when_ended CHECK (NOT awaiting_holds OR status <> 'active');
CREATE INDEX voucher_created ON voucher (created_at, id);
CREATE INDEX voucher_awaiting_holds ON voucher (id) WHERE awaiting_holds;

ALTER TABLE application
    ADD COLUMN reversed_at timestamptz,
    ADD COLUMN reversed_by text,
    ADD COLUMN reversal_reason text,
    ADD CONSTRAINT application_reversal CHECK ((status = 'reversed') = (reversed_at IS NOT NULL)
                                               AND (reversed_at IS NULL OR reversal_reason IS NOT NULL));
"""

DOWNGRADE = r"""
ALTER TABLE application
    DROP CONSTRAINT IF EXISTS application_reversal,
    DROP COLUMN IF EXISTS reversal_reason,
    DROP COLUMN IF EXISTS reversed_by,
    DROP COLUMN IF EXISTS reversed_at;
DROP INDEX IF EXISTS voucher_awaiting_holds;
DROP INDEX IF EXISTS voucher_created;
ALTER TABLE voucher
    DROP CONSTRAINT IF EXISTS voucher_awaiting_when_ended,
    DROP CONSTRAINT IF EXISTS voucher_ended,
    DROP COLUMN IF EXISTS awaiting_holds;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
