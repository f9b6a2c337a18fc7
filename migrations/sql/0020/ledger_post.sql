-- The write path: one entry, its postings and the accounts' totals in one round trip, or a refusal stored
-- under the idempotency key. Generic plans: each statement over ledger_account also says
-- `a.id = ANY (p_account_ids)`, so the plan reads the entry's accounts by primary key (migration 0012).
CREATE OR REPLACE FUNCTION ledger_post(
    p_key text,
    p_request_hash bytea,
    p_kind text,
    p_pending_entry_id bigint,
    p_reverses_entry_id bigint,
    p_expires_at timestamptz,
    p_memo text,
    p_metadata jsonb,
    p_account_ids bigint[],
    p_directions text[],
    p_phases text[],
    p_amounts bigint[]
) RETURNS TABLE (outcome text, entry_id bigint, created_at timestamptz, code text, detail text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n_accounts int;
    v_n_currencies int;
    v_found record;
    v_violation record;
    v_entry_id bigint;
    v_created_at timestamptz;
    v_code text;
    v_detail text;
    v_expired int;
    v_n_distinct int;
BEGIN
    IF cardinality(p_account_ids) < 2
       OR cardinality(p_account_ids) <> cardinality(p_directions)
       OR cardinality(p_account_ids) <> cardinality(p_phases)
       OR cardinality(p_account_ids) <> cardinality(p_amounts) THEN
        RAISE EXCEPTION 'an entry needs at least two postings, each with account, direction, phase and amount'
            USING ERRCODE = 'VL002';
    END IF;

    SELECT count(*), count(DISTINCT a.currency), (SELECT count(DISTINCT x) FROM unnest(p_account_ids) x)
      INTO v_n_accounts, v_n_currencies, v_n_distinct
      FROM ledger_account a WHERE a.id = ANY (p_account_ids);
    IF v_n_accounts <> v_n_distinct THEN
        RAISE EXCEPTION 'unknown ledger account' USING ERRCODE = 'VL404';
    END IF;
    IF v_n_currencies <> 1 THEN
        RAISE EXCEPTION 'an entry cannot mix currencies' USING ERRCODE = 'VL002';
    END IF;

    -- Lock the accounts that carry a limit, in id order: every writer locks in the same order, so writers
    -- cannot deadlock one another. Accounts without a limit are not locked at all (see the sealer).
    PERFORM 1 FROM ledger_account a
     WHERE a.id = ANY (p_account_ids)
       AND (a.debits_must_not_exceed_credits OR a.credits_must_not_exceed_debits)
     ORDER BY a.id
       FOR NO KEY UPDATE;

    <<attempt>>
    FOR v_attempt IN 1..2 LOOP
        -- Idempotency, after the locks: two requests with one key on a limited account are serialized,
        -- and the second sees the first one's outcome.
        SELECT e.id, e.request_hash, e.created_at INTO v_found FROM ledger_entry e WHERE e.idempotency_key = p_key;
        IF FOUND THEN
            IF v_found.request_hash <> p_request_hash THEN
                RAISE EXCEPTION 'idempotency key % was already used for a different request', p_key
                    USING ERRCODE = 'VL409';
            END IF;
            RETURN QUERY SELECT 'existing'::text, v_found.id, v_found.created_at, NULL::text, NULL::text;
            RETURN;
        END IF;
        SELECT r.request_hash, r.code, r.detail INTO v_found FROM ledger_refusal r WHERE r.idempotency_key = p_key;
        IF FOUND THEN
            IF v_found.request_hash <> p_request_hash THEN
                RAISE EXCEPTION 'idempotency key % was already used for a different request', p_key
                    USING ERRCODE = 'VL409';
            END IF;
            RETURN QUERY SELECT 'refused'::text, NULL::bigint, NULL::timestamptz, v_found.code, v_found.detail;
            RETURN;
        END IF;

        v_code := NULL;
        IF p_pending_entry_id IS NOT NULL THEN
            SELECT e.kind, e.expires_at INTO v_found FROM ledger_entry e WHERE e.id = p_pending_entry_id;
            IF NOT FOUND OR v_found.kind <> 'pending' THEN
                RAISE EXCEPTION 'entry % is not a pending entry', p_pending_entry_id USING ERRCODE = 'VL404';
            END IF;
            IF EXISTS (SELECT 1 FROM ledger_entry e WHERE e.pending_entry_id = p_pending_entry_id) THEN
                v_code := 'pending_resolved';
                v_detail := format('pending entry %s was already posted, voided or expired', p_pending_entry_id);
            ELSIF p_kind = 'post_pending' AND v_found.expires_at <= now() THEN
                v_code := 'pending_expired';
                v_detail := format('pending entry %s expired at %s', p_pending_entry_id, v_found.expires_at);
            ELSIF p_kind = 'expire_pending' AND v_found.expires_at > now() THEN
                RAISE EXCEPTION 'pending entry % has not expired', p_pending_entry_id USING ERRCODE = 'VL422';
            END IF;
        END IF;
        IF p_reverses_entry_id IS NOT NULL AND v_code IS NULL THEN
            SELECT e.kind INTO v_found FROM ledger_entry e WHERE e.id = p_reverses_entry_id;
            IF NOT FOUND OR v_found.kind NOT IN ('transfer', 'post_pending') THEN
                RAISE EXCEPTION 'entry % cannot be reversed', p_reverses_entry_id USING ERRCODE = 'VL404';
            END IF;
            IF EXISTS (SELECT 1 FROM ledger_entry e WHERE e.reverses_entry_id = p_reverses_entry_id) THEN
                v_code := 'already_reversed';
                v_detail := format('entry %s was already reversed', p_reverses_entry_id);
            END IF;
        END IF;

        IF v_code IS NULL THEN
            SELECT a.id, a.code, n.dp, n.cp, n.dq, n.cq INTO v_violation
              FROM ledger_account a
              JOIN ledger_deltas(p_account_ids, p_directions, p_phases, p_amounts) d ON d.account_id = a.id
              CROSS JOIN LATERAL (SELECT a.debits_posted + coalesce(d.d_posted, 0) AS dp,
                                         a.credits_posted + coalesce(d.c_posted, 0) AS cp,
                                         a.debits_pending + coalesce(d.d_pending, 0) AS dq,
                                         a.credits_pending + coalesce(d.c_pending, 0) AS cq) n
             WHERE a.id = ANY (p_account_ids)
               AND ((a.debits_must_not_exceed_credits AND n.dp + n.dq > n.cp)
                OR (a.credits_must_not_exceed_debits AND n.cp + n.cq > n.dp))
             ORDER BY a.id
             LIMIT 1;
            IF FOUND THEN
                -- Expired holds still weigh on the account until released: release them and look again.
                IF v_attempt = 1 THEN
                    SELECT count(ledger_expire_pending(o.entry_id)) INTO v_expired
                      FROM ledger_pending_open o
                     WHERE o.expires_at <= now()
                       AND EXISTS (SELECT 1 FROM ledger_posting p
                                    WHERE p.entry_id = o.entry_id AND p.account_id = v_violation.id);
                    IF v_expired > 0 THEN
                        CONTINUE attempt;
                    END IF;
                END IF;
                v_code := 'limit_exceeded';
                v_detail := format('account %s would reach debits %s (%s pending) against credits %s (%s pending)',
                                   v_violation.code, v_violation.dp, v_violation.dq, v_violation.cp, v_violation.cq);
            END IF;
        END IF;

        IF v_code IS NOT NULL THEN
            INSERT INTO ledger_refusal (idempotency_key, request_hash, code, detail)
            VALUES (p_key, p_request_hash, v_code, v_detail) ON CONFLICT DO NOTHING;
            RETURN QUERY SELECT 'refused'::text, NULL::bigint, NULL::timestamptz, v_code, v_detail;
            RETURN;
        END IF;

        INSERT INTO ledger_entry (idempotency_key, request_hash, kind, pending_entry_id, reverses_entry_id,
                                  expires_at, memo, metadata)
        VALUES (p_key, p_request_hash, p_kind, p_pending_entry_id, p_reverses_entry_id,
                p_expires_at, coalesce(p_memo, ''), coalesce(p_metadata, '{}'::jsonb))
        ON CONFLICT DO NOTHING
        RETURNING ledger_entry.id, ledger_entry.created_at INTO v_entry_id, v_created_at;
        IF v_entry_id IS NULL THEN
            -- a concurrent request took this key, this hold or this reversal first: look again
            CONTINUE attempt;
        END IF;

        INSERT INTO ledger_posting (entry_id, seq, account_id, direction, phase, amount)
        SELECT v_entry_id, (u.ord - 1)::smallint, u.account_id, u.direction, u.phase, u.amount
          FROM unnest(p_account_ids, p_directions, p_phases, p_amounts)
               WITH ORDINALITY AS u(account_id, direction, phase, amount, ord);

        UPDATE ledger_account a
           SET debits_posted = a.debits_posted + coalesce(d.d_posted, 0),
               credits_posted = a.credits_posted + coalesce(d.c_posted, 0),
               debits_pending = a.debits_pending + coalesce(d.d_pending, 0),
               credits_pending = a.credits_pending + coalesce(d.c_pending, 0)
          FROM ledger_deltas(p_account_ids, p_directions, p_phases, p_amounts) d
         WHERE a.id = d.account_id
           AND a.id = ANY (p_account_ids)
           AND (a.debits_must_not_exceed_credits OR a.credits_must_not_exceed_debits);

        INSERT INTO ledger_unsealed (entry_id) VALUES (v_entry_id);
        IF p_kind = 'pending' THEN
            INSERT INTO ledger_pending_open (entry_id, expires_at) VALUES (v_entry_id, p_expires_at);
        ELSIF p_pending_entry_id IS NOT NULL THEN
            DELETE FROM ledger_pending_open o WHERE o.entry_id = p_pending_entry_id;
        END IF;

        RETURN QUERY SELECT 'created'::text, v_entry_id, v_created_at, NULL::text, NULL::text;
        RETURN;
    END LOOP;
    -- Second pass still lost a race: a concurrent request resolved the same hold or reversal.
    v_code := CASE WHEN p_pending_entry_id IS NOT NULL THEN 'pending_resolved' ELSE 'already_reversed' END;
    v_detail := 'a concurrent request resolved the same entry first';
    INSERT INTO ledger_refusal (idempotency_key, request_hash, code, detail)
    VALUES (p_key, p_request_hash, v_code, v_detail) ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT 'refused'::text, NULL::bigint, NULL::timestamptz, v_code, v_detail;
END $$;
