-- Postings can only join an entry inside the transaction that wrote it. Each entry is read by its
-- primary key: a plan that cannot become a scan of the journal, however it was made (migration 0018).
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
