-- An account's identity and limits never change; only its cached totals and metadata do.
CREATE OR REPLACE FUNCTION ledger_account_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id <> OLD.id OR NEW.code <> OLD.code OR NEW.currency <> OLD.currency
       OR NEW.debits_must_not_exceed_credits <> OLD.debits_must_not_exceed_credits
       OR NEW.credits_must_not_exceed_debits <> OLD.credits_must_not_exceed_debits
       OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'ledger account %: code, currency and limits are fixed at opening', OLD.code
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
