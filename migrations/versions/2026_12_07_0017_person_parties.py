"""Natural persons as parties: entities of kind `person`, identified by a keyed hash of their document number.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

POLICY.md, "Natural persons are parties": most small companies are controlled by people, so a relation may
start from an individual shareholder, controller or officer. A person is an `entity` row of kind `person`
(so relations, the graph and the history need nothing new) with no unified social credit code:

- `uscc` and `division_code` become nullable, for persons only: the CHECK `entity_identifier` ties the kind
  to the identifier present (a person has `id_document_hmac` and neither code nor division, everything else
  has a code and no hash), so a kind can never be changed across that line;
- `id_document_hmac` is HMAC-SHA256 of the normalised identity-document number under a key derived from
  the service's KEK (vouchers/entities.py); the number itself is never stored. It is unique (one person,
  one entity) and, like the code, never changes (`entity_guard`);
- a person is not registered in Guangzhou and is presumed not eligible (art. 25 supports registered
  enterprises): `entity_person_not_registered`.

The downgrade refuses while a person is on record: the old schema cannot hold one, and entities are never
deleted (relations and the history name them).
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE entity ADD COLUMN id_document_hmac bytea;
ALTER TABLE entity ALTER COLUMN uscc DROP NOT NULL;
ALTER TABLE entity ALTER COLUMN division_code DROP NOT NULL;
ALTER TABLE entity DROP CONSTRAINT entity_kind;
ALTER TABLE entity ADD CONSTRAINT entity_kind
    CHECK (kind IN ('enterprise', 'provider', 'institution', 'association', 'department', 'person'));
ALTER TABLE entity ADD CONSTRAINT entity_identifier CHECK (
    CASE WHEN kind = 'person'
         THEN uscc IS NULL AND division_code IS NULL AND id_document_hmac IS NOT NULL
         ELSE uscc IS NOT NULL AND division_code IS NOT NULL AND id_document_hmac IS NULL
    END);
ALTER TABLE entity ADD CONSTRAINT entity_id_document_hmac_length
    CHECK (id_document_hmac IS NULL OR octet_length(id_document_hmac) = 32);
ALTER TABLE entity ADD CONSTRAINT entity_id_document_hmac_unique UNIQUE (id_document_hmac);
ALTER TABLE entity ADD CONSTRAINT entity_person_not_registered
    CHECK (kind <> 'person' OR NOT guangzhou_registered);

CREATE OR REPLACE FUNCTION entity_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'entities are never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.uscc IS DISTINCT FROM OLD.uscc OR NEW.created_at <> OLD.created_at
       OR NEW.id_document_hmac IS DISTINCT FROM OLD.id_document_hmac THEN
        RAISE EXCEPTION 'an entity''s id, unified social credit code and identity-document hash never change'
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
"""

DOWNGRADE = r"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM entity WHERE kind = 'person') THEN
        RAISE EXCEPTION 'persons are on record: revision 0016 cannot hold them, and entities are never deleted';
    END IF;
END $$;
CREATE OR REPLACE FUNCTION entity_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'entities are never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.uscc <> OLD.uscc OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'an entity''s id and unified social credit code never change' USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
ALTER TABLE entity DROP CONSTRAINT entity_person_not_registered;
ALTER TABLE entity DROP CONSTRAINT entity_id_document_hmac_unique;
ALTER TABLE entity DROP CONSTRAINT entity_id_document_hmac_length;
ALTER TABLE entity DROP CONSTRAINT entity_identifier;
ALTER TABLE entity DROP CONSTRAINT entity_kind;
ALTER TABLE entity ADD CONSTRAINT entity_kind
    CHECK (kind IN ('enterprise', 'provider', 'institution', 'association', 'department'));
ALTER TABLE entity ALTER COLUMN division_code SET NOT NULL;
ALTER TABLE entity ALTER COLUMN uscc SET NOT NULL;
ALTER TABLE entity DROP COLUMN id_document_hmac;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
