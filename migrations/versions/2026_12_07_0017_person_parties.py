"""Natural persons as parties: entities of kind `person`, identified by a keyed hash of their document number.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

(to be written: issue 13, persons)
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0017"
down_revision: str | None = "0016"
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
