-- At commit: at least two postings, every account known, one currency, and debits equal credits in
-- each phase (posted, pending, release). It runs once per entry, so every read is by key whatever the
-- statistics (migration 0022): each account by its primary key in a sub-select of its own, and sequential
-- scans off, so that a plan made while the tables were empty is never a scan of every account.
CREATE OR REPLACE FUNCTION ledger_entry_check_balanced() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off SET jit = off AS $$
DECLARE
    n_postings int;
    n_accounts int;
    n_currencies int;
    n_unbalanced int;
BEGIN
    SELECT count(*), count(a.id), count(DISTINCT a.currency)
      INTO n_postings, n_accounts, n_currencies
      FROM ledger_posting p
      LEFT JOIN LATERAL (SELECT a.id, a.currency FROM ledger_account a WHERE a.id = p.account_id OFFSET 0) a
        ON true
     WHERE p.entry_id = NEW.id;
    IF n_postings < 2 THEN
        RAISE EXCEPTION 'ledger entry % has % posting(s); an entry needs at least two', NEW.id, n_postings
            USING ERRCODE = 'VL002';
    END IF;
    IF n_accounts <> n_postings THEN
        RAISE EXCEPTION 'ledger entry % posts to an unknown account', NEW.id USING ERRCODE = 'VL002';
    END IF;
    IF n_currencies <> 1 THEN
        RAISE EXCEPTION 'ledger entry % mixes currencies', NEW.id USING ERRCODE = 'VL002';
    END IF;
    SELECT count(*) INTO n_unbalanced FROM (
        SELECT phase FROM ledger_posting WHERE entry_id = NEW.id GROUP BY phase
        HAVING sum(CASE WHEN direction = 'debit' THEN amount ELSE -amount END) <> 0) s;
    IF n_unbalanced <> 0 THEN
        RAISE EXCEPTION 'ledger entry % does not balance: debits and credits differ', NEW.id
            USING ERRCODE = 'VL002';
    END IF;
    RETURN NULL;
END $$;
