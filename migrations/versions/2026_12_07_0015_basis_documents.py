"""Basis documents: one identity per document (its counterparty plus its number), claimed whole.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

Documents were keyed `invoice:<provider>:<no>` but `contract:<no>`, so an invoice behind a compute award was
accepted again as a model contract with the same vendor, and two vendors' contracts numbered alike blocked
each other (POLICY.md, "A document is its counterparty plus its number"; art. 25). A document with a
counterparty is now `doc:<counterparty entity>:<number>` (vouchers/bases.py `document_id`). Every claim on
record, active or released, is re-keyed, and none is lost or merged:

- `invoice:<P>:<X>` (and an external award's `contract:<P>:<X>`) becomes `doc:<P>:<X>`;
- `contract:<X>` held by an application becomes `doc:<vendor>:<X>`, the vendor read from the application's
  basis (`model.first_purchase` was the only program that claimed contracts);
- a `contract:<X>` or `invoice:<X>` with no counterparty (an external award's `basis_ref`) becomes
  `number:<X>`: its counterparty is unknown, so it blocks every counterparty's document numbered X (never
  pay twice); the service never writes one again;
- the key a row had is kept in `original_document`;
- where two ACTIVE claims now have one key — the very double award the issue found — both rows stay: the
  earliest keeps the key, each later one is marked `duplicate_of` it (outside the unique index), so an
  auditor finds them with `SELECT * FROM basis_claim WHERE duplicate_of IS NOT NULL` and reverses the award
  it names; while it is active, a duplicate still blocks its document.

The unique index `basis_claim_active` now covers active claims that are not duplicates, and the format
CHECK allows the new keys and no longer the old counterparty forms.

Downgrade: every row takes back its `original_document`; a claim made since (`doc:<P>:<X>`) becomes
`invoice:<P>:<X>`, the old form with a counterparty (or `contract:<P>:<X>` where that would collide), so it
keeps blocking what the old code checks.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE basis_claim DROP CONSTRAINT basis_claim_document_format;
DROP INDEX basis_claim_active;
ALTER TABLE basis_claim ADD COLUMN original_document text;
ALTER TABLE basis_claim ADD COLUMN duplicate_of bigint REFERENCES basis_claim (id);

UPDATE basis_claim c
   SET original_document = c.document,
       document = CASE
           WHEN c.document ~ '^(invoice|contract):ent_[a-z0-9]{24}:.'
               THEN regexp_replace(c.document, '^(invoice|contract):', 'doc:')
           WHEN c.document LIKE 'contract:%' AND a.basis ->> 'vendor_entity_id' IS NOT NULL
               THEN 'doc:' || (a.basis ->> 'vendor_entity_id') || ':' || substr(c.document, length('contract:') + 1)
           ELSE 'number:' || regexp_replace(c.document, '^(invoice|contract):', '')
       END
  FROM basis_claim c2 LEFT JOIN application a ON a.id = c2.application_id
 WHERE c2.id = c.id AND c.document ~ '^(invoice|contract):';

UPDATE basis_claim c SET duplicate_of = f.first_id
  FROM (SELECT id, first_value(id) OVER (PARTITION BY document ORDER BY claimed_at, id) AS first_id
          FROM basis_claim WHERE released_at IS NULL) f
 WHERE f.id = c.id AND f.first_id <> c.id;

ALTER TABLE basis_claim ADD CONSTRAINT basis_claim_document_format CHECK (
    document ~ '^(doc:ent_[a-z0-9]{24}:|number:|project:|dataset:|scenario:|filing:|model:|first_purchase:).'
    AND length(document) <= 300);
-- a duplicate arises only from re-keying, and points at the claim that kept the key
ALTER TABLE basis_claim ADD CONSTRAINT basis_claim_duplicate CHECK (
    duplicate_of IS NULL OR (original_document IS NOT NULL AND duplicate_of <> id));
CREATE UNIQUE INDEX basis_claim_active ON basis_claim (document) WHERE released_at IS NULL AND duplicate_of IS NULL;
CREATE INDEX basis_claim_duplicate_of ON basis_claim (duplicate_of) WHERE duplicate_of IS NOT NULL;
"""

DOWNGRADE = r"""
DROP INDEX basis_claim_duplicate_of;
DROP INDEX basis_claim_active;
ALTER TABLE basis_claim DROP CONSTRAINT basis_claim_duplicate;
ALTER TABLE basis_claim DROP CONSTRAINT basis_claim_document_format;
UPDATE basis_claim SET document = original_document WHERE original_document IS NOT NULL;
UPDATE basis_claim c SET document = 'invoice:' || substr(c.document, length('doc:') + 1)
 WHERE c.document LIKE 'doc:%'
   AND (c.released_at IS NOT NULL OR NOT EXISTS (
        SELECT 1 FROM basis_claim o
         WHERE o.released_at IS NULL AND o.document = 'invoice:' || substr(c.document, length('doc:') + 1)));
UPDATE basis_claim SET document = 'contract:' || substr(document, length('doc:') + 1) WHERE document LIKE 'doc:%';
ALTER TABLE basis_claim DROP COLUMN duplicate_of;
ALTER TABLE basis_claim DROP COLUMN original_document;
ALTER TABLE basis_claim ADD CONSTRAINT basis_claim_document_format CHECK (
    document ~ '^(invoice|contract|project|dataset|scenario|filing|model|first_purchase):.+$'
    AND length(document) <= 300);
CREATE UNIQUE INDEX basis_claim_active ON basis_claim (document) WHERE released_at IS NULL;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
