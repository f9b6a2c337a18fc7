"""Applications, the basis documents they claim, purchases on record, external awards, vouchers, payouts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

No double support (就高不重复, art. 25) is a unique index: a basis document (`kind:reference`) has at most one
active claim, by an issued application or by an award recorded from another city policy. Reversing an
award releases its claims (the row stays, with `released_at`), so the document can support a higher one.
The same index gives one first purchaser per (model, industry) and one award per filing number and model.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE application (
    id text PRIMARY KEY,
    program text NOT NULL,
    definition_version integer NOT NULL,
    applicant_entity_id text NOT NULL REFERENCES entity (id),
    year integer NOT NULL,
    basis jsonb NOT NULL,
    status text NOT NULL DEFAULT 'submitted',
    computed jsonb NOT NULL,
    eligible_fen bigint NOT NULL,
    computed_award_fen bigint NOT NULL,
    award_fen bigint,
    automatic boolean NOT NULL DEFAULT false,
    submitted_by text,
    decided_by text,
    decided_at timestamptz,
    decision_reason text,
    issued_at timestamptz,
    -- public notice (公示): approved, waiting for the period to end; the budget is held meanwhile
    notice_ends_at timestamptz,
    notice_hold_entry_id bigint REFERENCES ledger_entry (id),
    -- the voucher or payout an approval in notice will issue (its ledger account is opened at approval)
    issue_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT application_id_format CHECK (id ~ '^app_[a-z0-9]{24}$'),
    CONSTRAINT application_status CHECK (
        status IN ('submitted', 'rejected', 'in_notice', 'held', 'issued', 'reversed')),
    CONSTRAINT application_notice CHECK ((status IN ('in_notice', 'held')) <= (notice_ends_at IS NOT NULL)),
    CONSTRAINT application_year CHECK (year BETWEEN 2000 AND 2100),
    CONSTRAINT application_amounts CHECK (eligible_fen >= 0 AND computed_award_fen >= 0
                                          AND (award_fen IS NULL OR award_fen > 0)),
    CONSTRAINT application_award_when_decided CHECK (
        (status IN ('in_notice', 'held', 'issued', 'reversed')) = (award_fen IS NOT NULL)),
    CONSTRAINT application_program FOREIGN KEY (program, definition_version)
        REFERENCES program_definition (code, version)
);
CREATE INDEX application_holder ON application (applicant_entity_id, program, year);
CREATE INDEX application_program_year ON application (program, year, status);
CREATE INDEX application_created ON application (created_at, id);
CREATE INDEX application_notice_due ON application (notice_ends_at) WHERE status = 'in_notice';

-- 公示 objections: any authenticated caller raises one; an administrator resolves it
CREATE TABLE objection (
    id text PRIMARY KEY,
    application_id text NOT NULL REFERENCES application (id),
    reason text NOT NULL,
    raised_by text,
    status text NOT NULL DEFAULT 'open',
    note text,
    resolved_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CONSTRAINT objection_id_format CHECK (id ~ '^obj_[a-z0-9]{24}$'),
    CONSTRAINT objection_status CHECK (status IN ('open', 'upheld', 'dismissed')),
    CONSTRAINT objection_reason_length CHECK (length(reason) BETWEEN 1 AND 2000),
    CONSTRAINT objection_resolved CHECK ((status = 'open') = (resolved_at IS NULL))
);
CREATE INDEX objection_application ON objection (application_id, status);

CREATE TABLE external_award (
    id text PRIMARY KEY,
    entity_id text NOT NULL REFERENCES entity (id),
    basis_ref text NOT NULL,
    policy text NOT NULL,
    amount_fen bigint NOT NULL,
    awarded_on date NOT NULL,
    recorded_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT external_award_id_format CHECK (id ~ '^ext_[a-z0-9]{24}$'),
    CONSTRAINT external_award_amount CHECK (amount_fen > 0),
    CONSTRAINT external_award_policy_length CHECK (length(policy) BETWEEN 1 AND 200)
);

CREATE TABLE basis_claim (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document text NOT NULL,
    application_id text REFERENCES application (id),
    external_award_id text REFERENCES external_award (id),
    claimed_at timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz,
    CONSTRAINT basis_claim_one_holder CHECK ((application_id IS NULL) <> (external_award_id IS NULL)),
    CONSTRAINT basis_claim_document_format CHECK (
        document ~ '^(invoice|contract|project|dataset|scenario|filing|model|first_purchase):.+$'
        AND length(document) <= 300)
);
CREATE UNIQUE INDEX basis_claim_active ON basis_claim (document) WHERE released_at IS NULL;
CREATE INDEX basis_claim_application ON basis_claim (application_id);

-- compute sales the providers report (art. 8 corroboration, art. 19 免申即享)
CREATE TABLE purchase (
    id text PRIMARY KEY,
    provider_entity_id text NOT NULL REFERENCES entity (id),
    buyer_entity_id text NOT NULL REFERENCES entity (id),
    invoice_no text NOT NULL,
    category text NOT NULL,
    amount_fen bigint NOT NULL,
    purchased_on date NOT NULL,
    reported_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT purchase_id_format CHECK (id ~ '^pur_[a-z0-9]{24}$'),
    CONSTRAINT purchase_invoice_once UNIQUE (provider_entity_id, invoice_no),
    CONSTRAINT purchase_amount CHECK (amount_fen > 0),
    CONSTRAINT purchase_category CHECK (category IN ('compute', 'storage', 'network', 'security', 'other'))
);
CREATE INDEX purchase_buyer ON purchase (buyer_entity_id, purchased_on);

CREATE TABLE voucher (
    id text PRIMARY KEY,
    application_id text NOT NULL REFERENCES application (id),
    program text NOT NULL,
    holder_entity_id text NOT NULL REFERENCES entity (id),
    year integer NOT NULL,
    face_value_fen bigint NOT NULL,
    vendor_entity_id text REFERENCES entity (id),
    redemption_rate_bp integer NOT NULL,
    status text NOT NULL DEFAULT 'active',
    expires_at timestamptz NOT NULL,
    released_fen bigint NOT NULL DEFAULT 0,
    ended_at timestamptz,
    end_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT voucher_id_format CHECK (id ~ '^vch_[a-z0-9]{24}$'),
    CONSTRAINT voucher_application_once UNIQUE (application_id),
    CONSTRAINT voucher_status CHECK (status IN ('active', 'expired', 'revoked')),
    CONSTRAINT voucher_amounts CHECK (face_value_fen > 0 AND released_fen >= 0 AND released_fen <= face_value_fen),
    CONSTRAINT voucher_rate CHECK (redemption_rate_bp BETWEEN 1 AND 10000)
);
CREATE INDEX voucher_holder ON voucher (holder_entity_id, program, year);
CREATE INDEX voucher_expiry ON voucher (expires_at) WHERE status = 'active';

CREATE TABLE payout (
    id text PRIMARY KEY,
    application_id text NOT NULL REFERENCES application (id),
    program text NOT NULL,
    beneficiary_entity_id text NOT NULL REFERENCES entity (id),
    year integer NOT NULL,
    amount_fen bigint NOT NULL,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payout_id_format CHECK (id ~ '^pay_[a-z0-9]{24}$'),
    CONSTRAINT payout_application_once UNIQUE (application_id),
    CONSTRAINT payout_amount CHECK (amount_fen > 0)
);
CREATE INDEX payout_beneficiary ON payout (beneficiary_entity_id, program, year);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS payout;
DROP TABLE IF EXISTS voucher;
DROP TABLE IF EXISTS purchase;
DROP TABLE IF EXISTS basis_claim;
DROP TABLE IF EXISTS external_award;
DROP TABLE IF EXISTS objection;
DROP TABLE IF EXISTS application;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
