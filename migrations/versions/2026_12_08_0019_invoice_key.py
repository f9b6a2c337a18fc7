"""One row per redeemed invoice, keyed by provider and number: the invoice check reads one row by construction.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08

`voucher_redeem` refused an invoice already redeemed at the provider with `EXISTS (SELECT 1 FROM redemption
WHERE provider_entity_id = $1 AND invoice_no = $2)`. Two indexes can answer that: the unique
`redemption_invoice_once (provider_entity_id, invoice_no)` and the listing index `redemption_provider
(provider_entity_id, created_at, id)`, and the generic plan the function keeps for a connection's life, made
while the table was empty, chose the listing index: every redemption then read every earlier redemption of
its provider (issue 14, cause 1). No rewording of the query changes that choice.

Now `redemption_invoice` holds the rule: its primary key (provider, number) is its only index, so the check
is a primary-key look-up whatever the statistics say, and the key's uniqueness is what refuses a twin
invoice committed meanwhile (`redemption_invoice_pkey`). The unique constraint on `redemption` goes: one
home for the rule, and one index fewer to write per redemption. `voucher_redeem` is 0013's, with the check
and the insert moved to the new table (the two edits below, each asserted to apply exactly once).
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

from app.migrate import execute_script, function_of

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEAN = Path(__file__).with_name("2026_11_28_0013_lean_redeem.py")

_CHECK_BEFORE = """EXISTS (SELECT 1 FROM redemption r
                    WHERE r.provider_entity_id = p_provider AND r.invoice_no = p_invoice_no) AS invoice_used"""
_CHECK_AFTER = """EXISTS (SELECT 1 FROM redemption_invoice ri
                    WHERE ri.provider_entity_id = p_provider AND ri.invoice_no = p_invoice_no) AS invoice_used"""
# enable_seqscan = off puts disable_cost (1e10) on any plan that still holds a scan the planner could not
# avoid, which is far above jit_above_cost: where the server has JIT (Debian's PostgreSQL does), every call
# compiled its plans anew, about 190 ms a redemption on these machines
_SETTINGS_BEFORE = "SET enable_seqscan = off AS $$"
_SETTINGS_AFTER = "SET enable_seqscan = off\nSET jit = off AS $$"
_INSERT_BEFORE = """                v_subsidy, p_total_fen - v_subsidy, v_entry_id, v_created_at)
    )
"""
_INSERT_AFTER = """                v_subsidy, p_total_fen - v_subsidy, v_entry_id, v_created_at)
    ), invoiced AS (
        INSERT INTO redemption_invoice (provider_entity_id, invoice_no, redemption_id)
        VALUES (p_provider, p_invoice_no, p_redemption_id)
    )
"""


def _edited(function: str) -> str:
    for before, after in (
        (_CHECK_BEFORE, _CHECK_AFTER),
        (_INSERT_BEFORE, _INSERT_AFTER),
        (_SETTINGS_BEFORE, _SETTINGS_AFTER),
    ):
        assert function.count(before) == 1, f"voucher_redeem of 0013 no longer reads {before!r}"
        function = function.replace(before, after)
    return function


TABLE = r"""
CREATE TABLE redemption_invoice (
    provider_entity_id text NOT NULL,
    invoice_no text NOT NULL,
    redemption_id text NOT NULL REFERENCES redemption (id),
    CONSTRAINT redemption_invoice_pkey PRIMARY KEY (provider_entity_id, invoice_no)
);
CREATE TRIGGER redemption_invoice_append_only BEFORE UPDATE OR DELETE ON redemption_invoice
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
INSERT INTO redemption_invoice (provider_entity_id, invoice_no, redemption_id)
    SELECT provider_entity_id, invoice_no, id FROM redemption;
ALTER TABLE redemption DROP CONSTRAINT redemption_invoice_once;
"""

DOWNGRADE_TABLE = r"""
ALTER TABLE redemption ADD CONSTRAINT redemption_invoice_once UNIQUE (provider_entity_id, invoice_no);
DROP TABLE redemption_invoice;
"""


def upgrade() -> None:
    execute_script(op.get_bind(), TABLE)
    execute_script(op.get_bind(), _edited(function_of(_LEAN, "voucher_redeem")))


def downgrade() -> None:
    execute_script(op.get_bind(), function_of(_LEAN, "voucher_redeem"))
    execute_script(op.get_bind(), DOWNGRADE_TABLE)
