"""The balance check at commit reads each posting's account by its primary key (issue 14).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-08

`ledger_entry_check_balanced` runs once per entry, at commit: once per redemption. It joined the entry's
postings to `ledger_account`, and a plan made while the tables were empty (PL/pgSQL keeps it for the
connection's life) was a hash join over a sequential scan of every account: bench/journal_size.py counted
1,406 account rows read per redemption at 1,000 vouchers before autovacuum's first analyze, 8 after it. Each
account is now looked up by its key in a sub-select the planner cannot fold into a join, with sequential scans
off for the function.
"""

from collections.abc import Sequence

from app.migrate import apply_sql

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    apply_sql("0022", "ledger_entry_check_balanced")


def downgrade() -> None:
    apply_sql("0020", "ledger_entry_check_balanced")
