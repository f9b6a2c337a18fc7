"""Basis documents: one identity per document (its counterparty plus its number), claimed whole.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

(to be written: issue 13, documents)
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
SELECT 1;
"""

DOWNGRADE = r"""
SELECT 1;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
