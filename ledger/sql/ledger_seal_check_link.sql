-- Each seal links to the previous one (or to 32 zero bytes for the first).
CREATE OR REPLACE FUNCTION ledger_seal_check_link() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    expected bytea;
BEGIN
    IF NEW.chain_seq = 1 THEN
        expected := decode(repeat('00', 32), 'hex');
    ELSE
        SELECT hash INTO expected FROM ledger_seal WHERE chain_seq = NEW.chain_seq - 1;
    END IF;
    IF expected IS NULL OR expected <> NEW.prev_hash THEN
        RAISE EXCEPTION 'seal % does not link to seal %', NEW.chain_seq, NEW.chain_seq - 1
            USING ERRCODE = 'VL002';
    END IF;
    RETURN NEW;
END $$;
