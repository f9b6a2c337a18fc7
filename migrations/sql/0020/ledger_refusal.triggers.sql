-- A refusal is an outcome too: append-only, like the journal.
CREATE OR REPLACE TRIGGER ledger_refusal_append_only BEFORE UPDATE OR DELETE ON ledger_refusal
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE OR REPLACE TRIGGER ledger_refusal_no_truncate BEFORE TRUNCATE ON ledger_refusal
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
