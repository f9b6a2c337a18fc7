"""Each PL/pgSQL function and trigger has one source file; this revision applies dated copies of them all.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-08

A function's text was spread over the migrations that wrote and edited it (`voucher_redeem` is 0013's body
with 0019's edits applied to it), and changing one meant restating up to 200 lines. Now each function, and
each table's triggers, live in one file beside the code that owns them (ledger/sql/, vouchers/sql/,
app/sql/), and a migration applies a dated copy from migrations/sql/<revision>/ (migrations/sql/README.md).

migrations/sql/0020/ is the baseline: the definitions 0019 left, every function body word for word, so
applying them changes nothing, and a later migration's downgrade can apply them back. The one visible
effect is that `ledger_entry_balanced`, a constraint trigger, which cannot be replaced in place, is dropped
and created again, under a brief exclusive lock of `ledger_entry`. tests/test_sql_sources.py holds the
database at head to the source files.
"""

from collections.abc import Sequence

from app.migrate import apply_sql

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    # ledger/sql
    "ledger_refuse_change",
    "ledger_account_guard",
    "ledger_posting_same_transaction",
    "ledger_entry_check_balanced",
    "ledger_seal_check_link",
    "ledger_deltas",
    "ledger_post",
    "ledger_expire_pending",
    "vl_json_time",
    # app/sql
    "api_key_guard",
    # vouchers/sql
    "entity_event_append_only",
    "entity_guard",
    "affiliation_guard",
    "affiliation_no_truncate",
    "affiliation_bump_version",
    "program_definition_immutable",
    "signing_key_guard",
    "voucher_redeem",
)
TABLES_WITH_TRIGGERS = (
    "ledger_account",
    "ledger_entry",
    "ledger_posting",
    "ledger_refusal",
    "ledger_seal",
    "api_key",
    "entity",
    "entity_event",
    "affiliation",
    "affiliation_registry",
    "program_definition",
    "signing_key",
    "redemption_invoice",
)


def upgrade() -> None:
    apply_sql("0020", *FUNCTIONS, *(f"{table}.triggers" for table in TABLES_WITH_TRIGGERS))


def downgrade() -> None:
    """Nothing to undo: 0020 applied the definitions 0019 had."""
