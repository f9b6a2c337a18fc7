-- A redeemed invoice stays redeemed: the ledger's append-only refusal, on a table of the voucher service.
CREATE OR REPLACE TRIGGER redemption_invoice_append_only BEFORE UPDATE OR DELETE ON redemption_invoice
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
