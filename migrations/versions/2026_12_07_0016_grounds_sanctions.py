"""Grounds of revocations and reversals, sanctions, reversible external awards drawing the appropriation.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

(to be written: issue 13, sanctions)
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0016"
down_revision: str | None = "0015"
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
