-- A redemption in one round trip (POST /v1/redemptions, vouchers/redemption.py). Python checks the token's
-- signature and the program's rules and passes their outcome in; this checks, under its locks, what can
-- change meanwhile, then writes the transfer, the redemption and the stored answer. Every row it reads it
-- finds by a unique key, hence enable_seqscan = off; jit = off because that setting lifts its plans' cost
-- above jit_above_cost. Migrations 0011, 0013 and 0019 say why each step is as it is.
CREATE OR REPLACE FUNCTION voucher_redeem(
    p_caller text,
    p_key text,
    p_route text,
    p_request_hash bytea,
    p_jti text,
    p_limited boolean,
    p_voucher_id text,
    p_voucher_account text,
    p_payable_account text,
    p_provider text,
    p_invoice_no text,
    p_refused boolean,
    p_affiliation_version bigint,
    p_owed_fen bigint,
    p_total_fen bigint,
    p_eligible_fen bigint,
    p_redemption_id text,
    p_lines jsonb,
    p_excluded jsonb,
    p_memo text,
    p_metadata jsonb,
    p_response jsonb
)
RETURNS TABLE (outcome text, status_code integer, body text, detail text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off AS $$
DECLARE
    v_lock bigint := hashtextextended('idempotency:' || p_caller || ':' || p_key, 0);
    v_saved_timeout text;
    v_found record;
    v record;
    v_room bigint;
    v_payable_id bigint;
    v_subsidy bigint;
    v_entry_key text := 'redeem:' || p_redemption_id;
    v_entry_hash bytea;
    v_entry record;
    v_entry_id bigint;
    v_created_at timestamptz;
    v_response jsonb;
BEGIN
    -- 1. one request per key at a time, and the answer stored under it
    SELECT pg_try_advisory_xact_lock(v_lock) AS locked, r.route, r.request_hash, r.status_code, r.response
      INTO v_found
      FROM (SELECT 1) one
      LEFT JOIN idempotency_record r ON r.caller_key_id = p_caller AND r.idempotency_key = p_key;
    IF NOT v_found.locked THEN
        -- a twin holds the key: wait for it (at most 10 s, as app.idempotency), then look again
        v_saved_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', '10s', true);
        BEGIN
            PERFORM pg_advisory_xact_lock(v_lock);
        EXCEPTION WHEN lock_not_available THEN
            RETURN QUERY SELECT 'in_progress'::text, 409, NULL::text, NULL::text;
            RETURN;
        END;
        PERFORM set_config('lock_timeout', v_saved_timeout, true);
        SELECT true AS locked, r.route, r.request_hash, r.status_code, r.response INTO v_found
          FROM idempotency_record r WHERE r.caller_key_id = p_caller AND r.idempotency_key = p_key;
    END IF;
    IF v_found.route IS NOT NULL THEN
        IF v_found.route <> p_route OR v_found.request_hash <> p_request_hash THEN
            RETURN QUERY SELECT 'key_reused'::text, 422, NULL::text, NULL::text;
        ELSE
            RETURN QUERY SELECT 'replayed'::text, v_found.status_code, v_found.response::text, NULL::text;
        END IF;
        RETURN;
    END IF;

    -- 2. the token, the voucher and its account (both locked), and what the checks below need
    SELECT (SELECT t.revoked_at IS NULL FROM voucher_token t WHERE t.jti = p_jti) AS token_live,
           vo.status, vo.expires_at,
           a.id AS account_id,
           a.credits_posted - a.debits_posted - a.debits_pending AS available,
           a.debits_must_not_exceed_credits AND NOT a.credits_must_not_exceed_debits AS debit_limited,
           pa.id AS payable_id,
           pa.debits_must_not_exceed_credits OR pa.credits_must_not_exceed_debits AS payable_limited,
           (SELECT g.version FROM affiliation_registry g) AS registry_version,
           EXISTS (SELECT 1 FROM redemption_invoice ri
                    WHERE ri.provider_entity_id = p_provider AND ri.invoice_no = p_invoice_no) AS invoice_used
      INTO v
      FROM voucher vo
      JOIN ledger_account a ON a.code = p_voucher_account
      LEFT JOIN ledger_account pa ON pa.code = p_payable_account
     WHERE vo.id = p_voucher_id
       FOR NO KEY UPDATE OF vo, a;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM voucher_token t WHERE t.jti = p_jti AND t.revoked_at IS NULL) THEN
            RETURN QUERY SELECT 'token_revoked'::text, 401, NULL::text, NULL::text;
        ELSIF NOT EXISTS (SELECT 1 FROM voucher vo WHERE vo.id = p_voucher_id) THEN
            RETURN QUERY SELECT 'voucher_not_found'::text, 404, NULL::text, NULL::text;
        ELSE
            RAISE EXCEPTION 'voucher % has no ledger account %', p_voucher_id, p_voucher_account
                USING ERRCODE = 'VL404';
        END IF;
        RETURN;
    END IF;
    IF v.token_live IS NOT TRUE THEN
        RETURN QUERY SELECT 'token_revoked'::text, 401, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v.status = 'revoked' THEN
        RETURN QUERY SELECT 'voucher_revoked'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v.status = 'expired' OR v.expires_at <= now() THEN
        RETURN QUERY SELECT 'voucher_expired'::text, 409, NULL::text, vl_json_time(v.expires_at);
        RETURN;
    END IF;

    -- 3. the program's rules, as the caller found them, and whether its affiliation graph is current
    IF p_refused THEN
        RETURN QUERY SELECT 'refused'::text, 0, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF p_affiliation_version IS NOT NULL AND v.registry_version IS DISTINCT FROM p_affiliation_version THEN
        RETURN QUERY SELECT 'stale_affiliations'::text, 0, NULL::text, NULL::text;
        RETURN;
    END IF;

    -- 4. what may be paid: the token's room, the voucher's balance; the invoice not yet redeemed here
    IF p_limited THEN
        SELECT t.max_amount_fen - t.spent_fen INTO v_room FROM voucher_token t WHERE t.jti = p_jti FOR UPDATE;
        IF v_room <= 0 THEN
            RETURN QUERY SELECT 'token_limit_reached'::text, 409, NULL::text, NULL::text;
            RETURN;
        END IF;
    END IF;
    IF v.available <= 0 THEN
        RETURN QUERY SELECT 'voucher_exhausted'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v.invoice_used THEN
        RETURN QUERY SELECT 'invoice_redeemed'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    v_subsidy := least(p_owed_fen, v.available, coalesce(v_room, p_owed_fen));

    -- 5. the transfer: voucher account -> the provider's payable account, opened on first use
    v_payable_id := v.payable_id;
    IF v_payable_id IS NULL THEN
        INSERT INTO ledger_account (code) VALUES (p_payable_account) ON CONFLICT (code) DO NOTHING
        RETURNING id INTO v_payable_id;
        IF v_payable_id IS NULL THEN  -- opened meanwhile by a concurrent first redemption at this provider
            SELECT a.id INTO STRICT v_payable_id FROM ledger_account a WHERE a.code = p_payable_account;
        END IF;
    END IF;
    v_entry_hash := sha256(convert_to(jsonb_build_object(
        'kind', 'transfer', 'redemption', p_redemption_id, 'memo', p_memo, 'metadata', p_metadata,
        'postings', jsonb_build_array(jsonb_build_array(p_voucher_account, 'debit', 'posted', v_subsidy),
                                      jsonb_build_array(p_payable_account, 'credit', 'posted', v_subsidy))
    )::text, 'UTF8'));
    IF v.debit_limited AND v.payable_limited IS NOT TRUE THEN
        -- the common case, in one statement: only the voucher account carries a limit, and it is locked
        WITH entry AS (
            INSERT INTO ledger_entry (idempotency_key, request_hash, kind, memo, metadata)
            VALUES (v_entry_key, v_entry_hash, 'transfer', coalesce(p_memo, ''), coalesce(p_metadata, '{}'::jsonb))
            RETURNING id
        ), postings AS (
            INSERT INTO ledger_posting (entry_id, seq, account_id, direction, phase, amount)
            SELECT entry.id, leg.seq, leg.account_id, leg.direction, 'posted', v_subsidy
              FROM entry, (VALUES (0::smallint, v.account_id, 'debit'), (1::smallint, v_payable_id, 'credit'))
                          AS leg(seq, account_id, direction)
        ), unsealed AS (
            INSERT INTO ledger_unsealed (entry_id) SELECT entry.id FROM entry
        ), balance AS (
            UPDATE ledger_account a SET debits_posted = a.debits_posted + v_subsidy WHERE a.id = v.account_id
        )
        SELECT entry.id INTO v_entry_id FROM entry;
    ELSE
        -- an account set up otherwise than redemption sets it up: the ledger's own, general posting
        SELECT * INTO v_entry FROM ledger_post(
            v_entry_key, v_entry_hash, 'transfer', NULL, NULL, NULL, p_memo, p_metadata,
            ARRAY[v.account_id, v_payable_id], ARRAY['debit', 'credit'], ARRAY['posted', 'posted'],
            ARRAY[v_subsidy, v_subsidy]);
        IF v_entry.outcome <> 'created' THEN
            -- cannot happen under the locks held; never answer as if it had been paid
            RAISE EXCEPTION 'redemption % was not posted: % %', p_redemption_id, v_entry.code, v_entry.detail
                USING ERRCODE = 'VL422';
        END IF;
        v_entry_id := v_entry.entry_id;
    END IF;

    -- 6. the token's spending, the redemption, the stored answer
    IF p_limited THEN
        UPDATE voucher_token SET spent_fen = spent_fen + v_subsidy WHERE jti = p_jti;
    END IF;
    v_created_at := now();  -- the transaction's time: the entry's, and the redemption's default
    v_response := p_response || jsonb_build_object(
        'subsidy_fen', v_subsidy, 'holder_pays_fen', p_total_fen - v_subsidy, 'created_at', vl_json_time(v_created_at));
    WITH redeemed AS (
        INSERT INTO redemption (id, voucher_id, provider_entity_id, jti, invoice_no, lines, excluded, eligible_fen,
                                subsidy_fen, holder_pays_fen, entry_id, created_at)
        VALUES (p_redemption_id, p_voucher_id, p_provider, p_jti, p_invoice_no, p_lines, p_excluded, p_eligible_fen,
                v_subsidy, p_total_fen - v_subsidy, v_entry_id, v_created_at)
    ), invoiced AS (
        INSERT INTO redemption_invoice (provider_entity_id, invoice_no, redemption_id)
        VALUES (p_provider, p_invoice_no, p_redemption_id)
    )
    INSERT INTO idempotency_record (caller_key_id, idempotency_key, route, request_hash, status_code, response)
    VALUES (p_caller, p_key, p_route, p_request_hash, 201, v_response);
    RETURN QUERY SELECT 'created'::text, 201, v_response::text, NULL::text;
END $$;
