"""Each relation keeps the version that last changed it, so a cached graph is brought forward by the rows
changed since its version instead of being loaded whole (issue 14).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-08

The first check after any relation was recorded reloaded all of them: 1.71 s at 300,000 relations, in every
worker, with redemptions waiting behind it. A graph at version V now reads only the rows whose
`changed_version` is above V (vouchers/affiliations.py says why that is exact), through the index on it.

`affiliation_bump_version` now runs BEFORE the statement (it ran after): it takes the registry's row lock
before any relation is written, and the new version, which `affiliation_stamp_version` writes into each
row the statement inserts or ends. It also records the version in `affiliation_version_log`, committed with
the statement: a reader brings its graph forward only from a version in the log as its snapshot sees it,
so never from a graph built inside a transaction that rolled back.

Rows recorded before this revision read version 0 (a constant default, so adding the column rewrites
nothing), and the registry's current version goes into the log: every graph loaded from now on is at that
version or later, and has them.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import apply_sql, execute_script

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE TABLE affiliation_version_log (version bigint PRIMARY KEY);
INSERT INTO affiliation_version_log (version) SELECT version FROM affiliation_registry;
ALTER TABLE affiliation ADD COLUMN changed_version bigint NOT NULL DEFAULT 0;
ALTER TABLE affiliation ALTER COLUMN changed_version DROP DEFAULT;
CREATE INDEX affiliation_changed_version ON affiliation (changed_version);
"""

DOWNGRADE = r"""
DROP TRIGGER affiliation_stamp_version ON affiliation;
DROP FUNCTION affiliation_stamp_version();
ALTER TABLE affiliation DROP COLUMN changed_version;
DROP TABLE affiliation_version_log;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)
    apply_sql("0021", "affiliation_bump_version", "affiliation_stamp_version", "affiliation.triggers")


def downgrade() -> None:
    apply_sql("0020", "affiliation.triggers", "affiliation_bump_version")
    execute_script(op.get_bind(), DOWNGRADE)
