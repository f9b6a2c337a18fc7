-- What an entry's postings do to each account's four totals (release postings give back what is pending).
-- A plain SQL function, so the planner inlines it into both statements of ledger_post that use it.
CREATE OR REPLACE FUNCTION ledger_deltas(p_account_ids bigint[], p_directions text[], p_phases text[], p_amounts bigint[])
RETURNS TABLE (account_id bigint, d_posted bigint, c_posted bigint, d_pending bigint, c_pending bigint)
LANGUAGE sql IMMUTABLE AS $$
    SELECT u.account_id,
           (sum(u.amount) FILTER (WHERE u.direction = 'debit' AND u.phase = 'posted'))::bigint,
           (sum(u.amount) FILTER (WHERE u.direction = 'credit' AND u.phase = 'posted'))::bigint,
           (sum(CASE WHEN u.phase = 'pending' THEN u.amount WHEN u.phase = 'release' THEN -u.amount END)
                FILTER (WHERE u.direction = 'debit'))::bigint,
           (sum(CASE WHEN u.phase = 'pending' THEN u.amount WHEN u.phase = 'release' THEN -u.amount END)
                FILTER (WHERE u.direction = 'credit'))::bigint
      FROM unnest(p_account_ids, p_directions, p_phases, p_amounts) AS u(account_id, direction, phase, amount)
     GROUP BY u.account_id
$$;
