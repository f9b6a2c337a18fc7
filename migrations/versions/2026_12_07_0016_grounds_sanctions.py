"""Grounds of revocations and reversals, sanctions, reversible external awards drawing the appropriation.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

A revocation or reversal used to have one effect, whatever its cause: the cap room came back and the basis
documents were freed, so a voucher revoked for misuse was re-issued by the next application and an award
clawed back for fraud was re-earned on the same invoices (POLICY.md, "Grounds of a revocation or
reversal", art. 25). Now:

- `voucher.revocation_grounds`, `application.reversal_grounds`, `redemption.reversal_grounds` record
  `administrative` or `misconduct`; what was revoked or reversed before this revision was administrative
  (it had exactly those effects), and is recorded so;
- `sanction` is a misconduct decision against an entity: no new award under any program from `decided_on`
  up to the day before `until` (the first day it is free again), unless lifted with a reason;
- `voucher.misconduct_sanction_id` marks a voucher on which misconduct was found: its whole face value
  counts against the entity-year cap for good, and value clawed back from it goes to the program budget;
- `external_award` can be reversed (`reversed_at`, `reversal_grounds`, ...), and may draw its amount from
  the appropriation of its year (`draws_appropriation`, `draw_entry_id`, `return_entry_id`: art. 27 covers
  every article the city pays under, so program budgets plus these draws never exceed it);
- the entity's history takes `sanctioned` and `sanction_lifted` events.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE sanction (
    id text PRIMARY KEY,
    entity_id text NOT NULL REFERENCES entity (id),
    decided_on date NOT NULL,
    until date NOT NULL,
    reason text NOT NULL,
    source_kind text NOT NULL,
    source_id text NOT NULL,
    decided_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    lifted_at timestamptz,
    lifted_by text,
    lift_reason text,
    CONSTRAINT sanction_id_format CHECK (id ~ '^san_[a-z0-9]{24}$'),
    CONSTRAINT sanction_period CHECK (until > decided_on),
    CONSTRAINT sanction_reason CHECK (length(reason) BETWEEN 1 AND 1000),
    CONSTRAINT sanction_source CHECK (source_kind IN ('voucher', 'application', 'redemption', 'external_award')),
    CONSTRAINT sanction_lift CHECK ((lifted_at IS NULL) = (lift_reason IS NULL)
                                    AND (lift_reason IS NULL OR length(lift_reason) BETWEEN 1 AND 1000))
);
CREATE INDEX sanction_entity ON sanction (entity_id, decided_on, id);

ALTER TABLE voucher ADD COLUMN revocation_grounds text;
ALTER TABLE voucher ADD COLUMN misconduct_sanction_id text REFERENCES sanction (id);
UPDATE voucher SET revocation_grounds = 'administrative' WHERE status = 'revoked';
ALTER TABLE voucher ADD CONSTRAINT voucher_revocation_grounds
    CHECK (revocation_grounds IN ('administrative', 'misconduct')
           AND status = 'revoked' OR revocation_grounds IS NULL);

ALTER TABLE application ADD COLUMN reversal_grounds text;
ALTER TABLE application ADD COLUMN sanction_id text REFERENCES sanction (id);
UPDATE application SET reversal_grounds = 'administrative' WHERE status = 'reversed';
ALTER TABLE application ADD CONSTRAINT application_reversal_grounds
    CHECK ((status = 'reversed') = (reversal_grounds IS NOT NULL)
           AND (reversal_grounds IS NULL OR reversal_grounds IN ('administrative', 'misconduct'))
           AND (sanction_id IS NULL OR reversal_grounds = 'misconduct'));

ALTER TABLE redemption ADD COLUMN reversal_grounds text;
ALTER TABLE redemption ADD COLUMN sanction_id text REFERENCES sanction (id);
UPDATE redemption SET reversal_grounds = 'administrative' WHERE reversed_at IS NOT NULL;
ALTER TABLE redemption ADD CONSTRAINT redemption_reversal_grounds
    CHECK ((reversed_at IS NOT NULL) = (reversal_grounds IS NOT NULL)
           AND (reversal_grounds IS NULL OR reversal_grounds IN ('administrative', 'misconduct'))
           AND (sanction_id IS NULL OR reversal_grounds = 'misconduct'));

ALTER TABLE external_award ADD COLUMN draws_appropriation boolean NOT NULL DEFAULT false;
ALTER TABLE external_award ADD COLUMN draw_entry_id bigint REFERENCES ledger_entry (id);
ALTER TABLE external_award ADD COLUMN reversed_at timestamptz;
ALTER TABLE external_award ADD COLUMN reversed_by text;
ALTER TABLE external_award ADD COLUMN reversal_reason text;
ALTER TABLE external_award ADD COLUMN reversal_grounds text;
ALTER TABLE external_award ADD COLUMN return_entry_id bigint REFERENCES ledger_entry (id);
ALTER TABLE external_award ADD COLUMN sanction_id text REFERENCES sanction (id);
ALTER TABLE external_award ADD CONSTRAINT external_award_draw
    CHECK (draws_appropriation = (draw_entry_id IS NOT NULL)
           AND (return_entry_id IS NULL OR (draw_entry_id IS NOT NULL AND reversed_at IS NOT NULL)));
ALTER TABLE external_award ADD CONSTRAINT external_award_reversal
    CHECK ((reversed_at IS NULL) = (reversal_grounds IS NULL)
           AND (reversed_at IS NULL) = (reversal_reason IS NULL)
           AND (reversal_grounds IS NULL OR reversal_grounds IN ('administrative', 'misconduct'))
           AND (sanction_id IS NULL OR reversal_grounds = 'misconduct'));
CREATE INDEX external_award_entity ON external_award (entity_id, awarded_on);

ALTER TABLE entity_event DROP CONSTRAINT entity_event_kind;
ALTER TABLE entity_event ADD CONSTRAINT entity_event_kind
    CHECK (kind IN ('created', 'renamed', 'tags', 'eligibility', 'kind', 'sanctioned', 'sanction_lifted'));
"""

DOWNGRADE = r"""
-- the history keeps its sanction events only while this revision stands
DELETE FROM entity_event WHERE kind IN ('sanctioned', 'sanction_lifted');
ALTER TABLE entity_event DROP CONSTRAINT entity_event_kind;
ALTER TABLE entity_event ADD CONSTRAINT entity_event_kind
    CHECK (kind IN ('created', 'renamed', 'tags', 'eligibility', 'kind'));

DROP INDEX IF EXISTS external_award_entity;
ALTER TABLE external_award DROP CONSTRAINT IF EXISTS external_award_reversal;
ALTER TABLE external_award DROP CONSTRAINT IF EXISTS external_award_draw;
ALTER TABLE external_award DROP COLUMN IF EXISTS sanction_id;
ALTER TABLE external_award DROP COLUMN IF EXISTS return_entry_id;
ALTER TABLE external_award DROP COLUMN IF EXISTS reversal_grounds;
ALTER TABLE external_award DROP COLUMN IF EXISTS reversal_reason;
ALTER TABLE external_award DROP COLUMN IF EXISTS reversed_by;
ALTER TABLE external_award DROP COLUMN IF EXISTS reversed_at;
ALTER TABLE external_award DROP COLUMN IF EXISTS draw_entry_id;
ALTER TABLE external_award DROP COLUMN IF EXISTS draws_appropriation;

ALTER TABLE redemption DROP CONSTRAINT IF EXISTS redemption_reversal_grounds;
ALTER TABLE redemption DROP COLUMN IF EXISTS sanction_id;
ALTER TABLE redemption DROP COLUMN IF EXISTS reversal_grounds;
ALTER TABLE application DROP CONSTRAINT IF EXISTS application_reversal_grounds;
ALTER TABLE application DROP COLUMN IF EXISTS sanction_id;
ALTER TABLE application DROP COLUMN IF EXISTS reversal_grounds;
ALTER TABLE voucher DROP CONSTRAINT IF EXISTS voucher_revocation_grounds;
ALTER TABLE voucher DROP COLUMN IF EXISTS misconduct_sanction_id;
ALTER TABLE voucher DROP COLUMN IF EXISTS revocation_grounds;

DROP TABLE IF EXISTS sanction;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
