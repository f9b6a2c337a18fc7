"""Money after settlement: each redemption and payout knows the settlement that paid it, and what a payee
owes back after a clawback is a receivable recovered from its next settlement.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

Settlement used to pay a payable account's balance with no record of which redemptions it covered, so a
refund after settlement gave the voucher its value back while the provider kept the money (API.md, "Money
after settlement"). Now:

- `redemption.settlement_id` / `settled_fen` and `payout.settlement_id` name the settlement that paid them;
  the CHECK `redemption_settled` makes `refunded_fen + settled_fen <= subsidy_fen` a database fact, so no
  refund can follow a settlement of the same fen;
- `payout.reversed_at` marks a reversed payout on the row a settlement locks;
- `recovery` is what a payee owes back: one row per clawback of a settled redemption or reversal of a
  settled payout, with what has been recovered so far (`recovered_fen`, at most `amount_fen`);
- a settlement item may recover part or all of what is payable (`recovered_fen`), paying the rest.

Rows written before this revision: a redemption or a payout is taken as settled by the first settlement of
its payee made after it was created (the conservative reading: a refund of it is refused and a clawback books
a receivable, so nothing is paid twice). What an earlier refund after settlement took below zero on a payable
account is netted: a settlement never pays more than the payable account holds.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE settlement DROP CONSTRAINT settlement_total;
ALTER TABLE settlement ADD COLUMN recovered_fen bigint NOT NULL DEFAULT 0;
ALTER TABLE settlement ADD CONSTRAINT settlement_total
    CHECK (total_fen >= 0 AND recovered_fen >= 0 AND total_fen + recovered_fen > 0 AND items_count > 0);

ALTER TABLE settlement_item DROP CONSTRAINT settlement_item_amount;
ALTER TABLE settlement_item ADD COLUMN recovered_fen bigint NOT NULL DEFAULT 0;
ALTER TABLE settlement_item ADD CONSTRAINT settlement_item_amount
    CHECK (amount_fen >= 0 AND recovered_fen >= 0 AND amount_fen + recovered_fen > 0);

ALTER TABLE redemption ADD COLUMN settlement_id text REFERENCES settlement (id);
ALTER TABLE redemption ADD COLUMN settled_fen bigint NOT NULL DEFAULT 0;
UPDATE redemption r SET settlement_id = m.settlement_id, settled_fen = r.subsidy_fen - r.refunded_fen
FROM (
    SELECT r2.id, (
        SELECT s.id FROM settlement s JOIN settlement_item i ON i.settlement_id = s.id
        WHERE i.entity_id = r2.provider_entity_id AND s.created_at >= r2.created_at
        ORDER BY s.created_at, s.id LIMIT 1
    ) AS settlement_id
    FROM redemption r2 WHERE r2.subsidy_fen > r2.refunded_fen
) m
WHERE m.id = r.id AND m.settlement_id IS NOT NULL;
ALTER TABLE redemption ADD CONSTRAINT redemption_settled CHECK (
    (settlement_id IS NULL AND settled_fen = 0)
    OR (settlement_id IS NOT NULL AND settled_fen > 0 AND refunded_fen + settled_fen <= subsidy_fen));
CREATE INDEX redemption_unsettled ON redemption (provider_entity_id, id) WHERE settlement_id IS NULL;

ALTER TABLE payout ADD COLUMN settlement_id text REFERENCES settlement (id);
ALTER TABLE payout ADD COLUMN reversed_at timestamptz;
UPDATE payout p SET reversed_at = a.reversed_at FROM application a
WHERE a.id = p.application_id AND a.status = 'reversed';
UPDATE payout p SET settlement_id = m.settlement_id
FROM (
    SELECT p2.id, (
        SELECT s.id FROM settlement s JOIN settlement_item i ON i.settlement_id = s.id
        WHERE i.entity_id = p2.beneficiary_entity_id AND s.created_at >= p2.created_at
        ORDER BY s.created_at, s.id LIMIT 1
    ) AS settlement_id
    FROM payout p2 WHERE p2.reversed_at IS NULL
) m
WHERE m.id = p.id AND m.settlement_id IS NOT NULL;
CREATE INDEX payout_unsettled ON payout (beneficiary_entity_id, id)
    WHERE settlement_id IS NULL AND reversed_at IS NULL;

CREATE TABLE recovery (
    id text PRIMARY KEY,
    debtor_entity_id text NOT NULL REFERENCES entity (id),
    redemption_id text UNIQUE REFERENCES redemption (id),
    payout_id text UNIQUE REFERENCES payout (id),
    voucher_id text REFERENCES voucher (id),
    program text NOT NULL,
    year integer NOT NULL,
    amount_fen bigint NOT NULL,
    recovered_fen bigint NOT NULL DEFAULT 0,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    reason text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recovery_id_format CHECK (id ~ '^rcv_[a-z0-9]{24}$'),
    CONSTRAINT recovery_amounts CHECK (amount_fen > 0 AND recovered_fen >= 0 AND recovered_fen <= amount_fen),
    CONSTRAINT recovery_source CHECK ((redemption_id IS NULL) <> (payout_id IS NULL)),
    CONSTRAINT recovery_voucher CHECK ((redemption_id IS NULL) = (voucher_id IS NULL)),
    CONSTRAINT recovery_reason CHECK (length(reason) BETWEEN 1 AND 1000)
);
CREATE INDEX recovery_outstanding ON recovery (debtor_entity_id, created_at, id) WHERE recovered_fen < amount_fen;
CREATE INDEX recovery_voucher ON recovery (voucher_id) WHERE voucher_id IS NOT NULL;
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS recovery;
DROP INDEX IF EXISTS payout_unsettled;
ALTER TABLE payout DROP COLUMN IF EXISTS reversed_at;
ALTER TABLE payout DROP COLUMN IF EXISTS settlement_id;
DROP INDEX IF EXISTS redemption_unsettled;
ALTER TABLE redemption DROP CONSTRAINT IF EXISTS redemption_settled;
ALTER TABLE redemption DROP COLUMN IF EXISTS settled_fen;
ALTER TABLE redemption DROP COLUMN IF EXISTS settlement_id;
ALTER TABLE settlement_item DROP CONSTRAINT settlement_item_amount;
ALTER TABLE settlement_item DROP COLUMN recovered_fen;
ALTER TABLE settlement_item ADD CONSTRAINT settlement_item_amount CHECK (amount_fen > 0);
ALTER TABLE settlement DROP CONSTRAINT settlement_total;
ALTER TABLE settlement DROP COLUMN recovered_fen;
ALTER TABLE settlement ADD CONSTRAINT settlement_total CHECK (total_fen > 0 AND items_count > 0);
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
