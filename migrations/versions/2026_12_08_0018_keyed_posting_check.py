"""The posting trigger reads the journal by key: one primary-key look-up per entry a statement posted to.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08

`ledger_posting_same_transaction` (migration 0001) joined the statement's new postings to `ledger_entry`.
PL/pgSQL keeps a statement's plan for its connection's life, and a plan made while the journal was empty
(a fresh deploy, before autovacuum's first analyze) hashed the whole journal by a sequential scan: every
posting statement then read every entry ever written, 100-250 times a second under redemptions (issue 14).
Now the check loops over the distinct entries of the statement's postings (one, nearly always) and looks
each up by `id = $1`, which only the primary key can answer: no statistics, no journal-sized read.
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

from app.migrate import execute_script, function_of

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
CREATE OR REPLACE FUNCTION ledger_posting_same_transaction() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_entry bigint;
BEGIN
    -- each entry by its primary key: a plan that cannot become a scan of the journal, however it was made
    FOR v_entry IN SELECT DISTINCT p.entry_id FROM new_postings p LOOP
        IF NOT EXISTS (SELECT 1 FROM ledger_entry e WHERE e.id = v_entry AND e.tx_id = pg_current_xact_id()) THEN
            RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
                USING ERRCODE = 'VL001';
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(
        op.get_bind(),
        function_of(Path(__file__).with_name("2026_11_28_0001_ledger_core.py"), "ledger_posting_same_transaction"),
    )
