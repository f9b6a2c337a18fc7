-- The hash chain is append-only, and each seal links to the one before it.
CREATE OR REPLACE TRIGGER ledger_seal_append_only BEFORE UPDATE OR DELETE ON ledger_seal
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE OR REPLACE TRIGGER ledger_seal_no_truncate BEFORE TRUNCATE ON ledger_seal
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE OR REPLACE TRIGGER ledger_seal_links BEFORE INSERT ON ledger_seal
    FOR EACH ROW EXECUTE FUNCTION ledger_seal_check_link();
