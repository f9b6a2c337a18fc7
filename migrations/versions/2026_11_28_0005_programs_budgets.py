"""Program definitions as published data, yearly appropriations and program-year budgets.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

The money itself lives on the ledger (treasury:{year}:appropriation funds program:{code}:{year}:budget);
these tables hold what the ledger cannot: which definition versions were published (never edited), the
appropriation a year was given and the budget figure an administrator set.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE program_definition (
    code text NOT NULL,
    version integer NOT NULL,
    from_year integer NOT NULL,
    definition jsonb NOT NULL,
    content_hash bytea NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, version),
    CONSTRAINT program_definition_version_positive CHECK (version >= 1),
    CONSTRAINT program_definition_year CHECK (from_year BETWEEN 2000 AND 2100),
    CONSTRAINT program_definition_hash_length CHECK (length(content_hash) = 32)
);

CREATE FUNCTION program_definition_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a published program definition never changes: publish a new version' USING ERRCODE = 'VL001';
END $$;
CREATE TRIGGER program_definition_immutable BEFORE UPDATE OR DELETE ON program_definition
    FOR EACH ROW EXECUTE FUNCTION program_definition_immutable();
CREATE TRIGGER program_definition_no_truncate BEFORE TRUNCATE ON program_definition
    FOR EACH STATEMENT EXECUTE FUNCTION program_definition_immutable();

-- art. 27: what a year was given; the ledger's treasury:{year}:appropriation account holds the money
CREATE TABLE appropriation (
    year integer PRIMARY KEY,
    amount_fen bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT appropriation_amount CHECK (amount_fen > 0 AND amount_fen <= 50000000000)
);

-- the figure an administrator set; program:{code}:{year}:budget on the ledger holds the money
CREATE TABLE program_budget (
    code text NOT NULL,
    year integer NOT NULL,
    budget_fen bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, year),
    CONSTRAINT program_budget_amount CHECK (budget_fen >= 0 AND budget_fen <= 50000000000)
);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS program_budget;
DROP TABLE IF EXISTS appropriation;
DROP TABLE IF EXISTS program_definition;
DROP FUNCTION IF EXISTS program_definition_immutable();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
