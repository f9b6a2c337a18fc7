"""A redemption in one round trip: `voucher_redeem`, the whole command as one database function.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28

`POST /v1/redemptions` did about twenty statements per request (idempotency lock and look-up, savepoint,
token row, voucher lock, balance, account, posting, redemption row, answer), and their round trips, not the
database's work, set its rate (PERFORMANCE.md: 0.03 of pgbench). This function does the same steps, in the
same order and under the same locks, in one statement. Python keeps what needs no database: the token's
signature, the program's rules (named vendor, affiliation, eligible lines, the rate) and the answer's
shape; it passes their outcome in, and the function checks what can change under it:

1. the request's idempotency lock (the advisory lock `app.idempotency` takes, same name, 10 s), then the
   stored answer: `replayed` (or `key_reused` for another body) without doing anything else;
2. the token row: `token_revoked`;
3. the voucher row, locked FOR NO KEY UPDATE (revocation and expiry lock it FOR UPDATE, so a redemption and
   a revocation never spend the same fen; a busy voucher's redemptions queue here, on one lock, before any
   other): `voucher_revoked`, `voucher_expired`;
4. only now the refusal Python found from the program's rules (`refused`), so that a revoked voucher is
   said to be revoked whatever else is wrong; and the affiliation registry's version against the one the
   caller's cached graph was built from (`stale_affiliations`: the caller reloads and calls again);
5. a narrowed token's remaining room, its row locked (`token_limit_reached`), the voucher account's balance
   under its lock (`voucher_exhausted`), the invoice not yet redeemed at this provider
   (`invoice_redeemed`; a concurrent twin with another key fails on the unique index and the caller calls
   again, to be told `invoice_redeemed`);
6. the transfer through `ledger_post` (voucher account -> provider's payable account, opened on first use),
   the token's spending, the redemption row, and the answer stored under the idempotency key: `created`.

A refusal writes nothing: the caller stores its problem document under the key itself (insert-if-absent,
so a concurrent twin's answer, if stored first, is the one both get).
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
-- A timestamp as pydantic writes one in JSON (the rest of the API's answers): UTC, 'Z', microseconds only
-- when there are some.
CREATE FUNCTION vl_json_time(p_at timestamptz) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN extract(microseconds FROM p_at)::bigint % 1000000 = 0 THEN ''
                   ELSE '.' || to_char(p_at AT TIME ZONE 'UTC', 'US') END
           || 'Z'
$$;

CREATE FUNCTION voucher_redeem(
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
) RETURNS TABLE (outcome text, status_code integer, body text, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    v_lock bigint := hashtextextended('idempotency:' || p_caller || ':' || p_key, 0);
    v_saved_timeout text;
    v_found record;
    v_room bigint;
    v_account_id bigint;
    v_available bigint;
    v_payable_id bigint;
    v_subsidy bigint;
    v_entry record;
    v_created_at timestamptz;
    v_response jsonb;
BEGIN
    -- 1. one request per key at a time; a duplicate waits for the first (at most 10 s, as app.idempotency)
    IF NOT pg_try_advisory_xact_lock(v_lock) THEN
        v_saved_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', '10s', true);
        BEGIN
            PERFORM pg_advisory_xact_lock(v_lock);
        EXCEPTION WHEN lock_not_available THEN
            RETURN QUERY SELECT 'in_progress'::text, 409, NULL::text, NULL::text;
            RETURN;
        END;
        PERFORM set_config('lock_timeout', v_saved_timeout, true);
    END IF;
    SELECT r.route, r.request_hash, r.status_code, r.response INTO v_found
      FROM idempotency_record r WHERE r.caller_key_id = p_caller AND r.idempotency_key = p_key;
    IF FOUND THEN
        IF v_found.route <> p_route OR v_found.request_hash <> p_request_hash THEN
            RETURN QUERY SELECT 'key_reused'::text, 422, NULL::text, NULL::text;
        ELSE
            RETURN QUERY SELECT 'replayed'::text, v_found.status_code, v_found.response::text, NULL::text;
        END IF;
        RETURN;
    END IF;

    -- 2. the token
    SELECT t.revoked_at INTO v_found FROM voucher_token t WHERE t.jti = p_jti;
    IF NOT FOUND OR v_found.revoked_at IS NOT NULL THEN
        RETURN QUERY SELECT 'token_revoked'::text, 401, NULL::text, NULL::text;
        RETURN;
    END IF;

    -- 3. the voucher, locked
    SELECT v.status, v.expires_at INTO v_found FROM voucher v WHERE v.id = p_voucher_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'voucher_not_found'::text, 404, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_found.status = 'revoked' THEN
        RETURN QUERY SELECT 'voucher_revoked'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_found.status = 'expired' OR v_found.expires_at <= now() THEN
        RETURN QUERY SELECT 'voucher_expired'::text, 409, NULL::text, vl_json_time(v_found.expires_at);
        RETURN;
    END IF;

    -- 4. the program's rules, as the caller found them, and whether its affiliation graph is current
    IF p_refused THEN
        RETURN QUERY SELECT 'refused'::text, 0, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF p_affiliation_version IS NOT NULL
       AND (SELECT a.version FROM affiliation_registry a) IS DISTINCT FROM p_affiliation_version THEN
        RETURN QUERY SELECT 'stale_affiliations'::text, 0, NULL::text, NULL::text;
        RETURN;
    END IF;

    -- 5. what may be paid: the token's room, the voucher's balance; the invoice not yet redeemed here
    IF p_limited THEN
        SELECT t.max_amount_fen - t.spent_fen INTO v_room FROM voucher_token t WHERE t.jti = p_jti FOR UPDATE;
        IF v_room <= 0 THEN
            RETURN QUERY SELECT 'token_limit_reached'::text, 409, NULL::text, NULL::text;
            RETURN;
        END IF;
    END IF;
    SELECT a.id, a.credits_posted - a.debits_posted - a.debits_pending INTO v_account_id, v_available
      FROM ledger_account a WHERE a.code = p_voucher_account FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'voucher % has no ledger account %', p_voucher_id, p_voucher_account USING ERRCODE = 'VL404';
    END IF;
    IF v_available <= 0 THEN
        RETURN QUERY SELECT 'voucher_exhausted'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM redemption r WHERE r.provider_entity_id = p_provider AND r.invoice_no = p_invoice_no)
    THEN
        RETURN QUERY SELECT 'invoice_redeemed'::text, 409, NULL::text, NULL::text;
        RETURN;
    END IF;
    v_subsidy := least(p_owed_fen, v_available, coalesce(v_room, p_owed_fen));

    -- 6. the transfer, the token's spending, the redemption, the stored answer
    SELECT a.id INTO v_payable_id FROM ledger_account a WHERE a.code = p_payable_account;
    IF NOT FOUND THEN
        INSERT INTO ledger_account (code) VALUES (p_payable_account) ON CONFLICT (code) DO NOTHING
        RETURNING id INTO v_payable_id;
        IF v_payable_id IS NULL THEN  -- opened meanwhile by a concurrent first redemption at this provider
            SELECT a.id INTO STRICT v_payable_id FROM ledger_account a WHERE a.code = p_payable_account;
        END IF;
    END IF;
    SELECT * INTO v_entry FROM ledger_post(
        'redeem:' || p_redemption_id,
        sha256(convert_to(jsonb_build_object(
            'kind', 'transfer', 'redemption', p_redemption_id, 'memo', p_memo, 'metadata', p_metadata,
            'postings', jsonb_build_array(jsonb_build_array(p_voucher_account, 'debit', 'posted', v_subsidy),
                                          jsonb_build_array(p_payable_account, 'credit', 'posted', v_subsidy))
        )::text, 'UTF8')),
        'transfer', NULL, NULL, NULL, p_memo, p_metadata,
        ARRAY[v_account_id, v_payable_id], ARRAY['debit', 'credit'], ARRAY['posted', 'posted'],
        ARRAY[v_subsidy, v_subsidy]);
    IF v_entry.outcome <> 'created' THEN
        -- cannot happen under the locks held; never answer as if it had been paid
        RAISE EXCEPTION 'redemption % was not posted: % %', p_redemption_id, v_entry.code, v_entry.detail
            USING ERRCODE = 'VL422';
    END IF;
    IF p_limited THEN
        UPDATE voucher_token SET spent_fen = spent_fen + v_subsidy WHERE jti = p_jti;
    END IF;
    INSERT INTO redemption (id, voucher_id, provider_entity_id, jti, invoice_no, lines, excluded, eligible_fen,
                            subsidy_fen, holder_pays_fen, entry_id)
    VALUES (p_redemption_id, p_voucher_id, p_provider, p_jti, p_invoice_no, p_lines, p_excluded, p_eligible_fen,
            v_subsidy, p_total_fen - v_subsidy, v_entry.entry_id)
    RETURNING redemption.created_at INTO v_created_at;
    v_response := p_response || jsonb_build_object(
        'subsidy_fen', v_subsidy, 'holder_pays_fen', p_total_fen - v_subsidy, 'created_at', vl_json_time(v_created_at));
    INSERT INTO idempotency_record (caller_key_id, idempotency_key, route, request_hash, status_code, response)
    VALUES (p_caller, p_key, p_route, p_request_hash, 201, v_response);
    RETURN QUERY SELECT 'created'::text, 201, v_response::text, NULL::text;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS voucher_redeem(text, text, text, bytea, text, boolean, text, text, text, text, text, boolean,
                                       bigint, bigint, bigint, bigint, text, jsonb, jsonb, text, jsonb, jsonb);
DROP FUNCTION IF EXISTS vl_json_time(timestamptz);
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
