"""Ledger core: accounts, append-only journal, two-phase holds, refusals, hash-chain seals.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Everything the ledger asserts in Python the database asserts again here: postings balance per entry and
phase (deferred constraint trigger), amounts are positive, limits hold (CHECK on the account row), a hold is
resolved exactly once and an entry reversed at most once (unique indexes), the journal is append-only (row
and TRUNCATE triggers), and each seal links to the one before it.
"""

from collections.abc import Sequence

from alembic import op

from app.migrate import execute_script

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Custom SQLSTATEs raised by the functions below; ledger/errors.py maps each to a domain error.
#   VL001 append-only violation   VL002 unbalanced or malformed entry   VL404 unknown account or entry
#   VL409 idempotency conflict     VL422 request the ledger cannot take

UPGRADE = r"""
CREATE TABLE ledger_account (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code text NOT NULL,
    currency char(3) NOT NULL DEFAULT 'CNY',
    debits_must_not_exceed_credits boolean NOT NULL DEFAULT false,
    credits_must_not_exceed_debits boolean NOT NULL DEFAULT false,
    -- Cached totals. For an account with a limit they include every committed posting (updated under the
    -- row lock by ledger_post); for an account without one they include the sealed postings (updated in
    -- batches by the sealer), so that a hot payable account is never a lock every writer queues on.
    debits_posted bigint NOT NULL DEFAULT 0,
    credits_posted bigint NOT NULL DEFAULT 0,
    debits_pending bigint NOT NULL DEFAULT 0,
    credits_pending bigint NOT NULL DEFAULT 0,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_account_code_unique UNIQUE (code),
    CONSTRAINT ledger_account_code_format CHECK (
        length(code) <= 200 AND code ~ '^[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)*$'),
    CONSTRAINT ledger_account_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT ledger_account_one_limit CHECK (
        NOT (debits_must_not_exceed_credits AND credits_must_not_exceed_debits)),
    CONSTRAINT ledger_account_totals_non_negative CHECK (
        debits_posted >= 0 AND credits_posted >= 0 AND debits_pending >= 0 AND credits_pending >= 0),
    CONSTRAINT ledger_account_debit_limit CHECK (
        NOT debits_must_not_exceed_credits OR debits_posted + debits_pending <= credits_posted),
    CONSTRAINT ledger_account_credit_limit CHECK (
        NOT credits_must_not_exceed_debits OR credits_posted + credits_pending <= debits_posted)
);

CREATE TABLE ledger_entry (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key text NOT NULL,
    request_hash bytea NOT NULL,
    kind text NOT NULL,
    pending_entry_id bigint REFERENCES ledger_entry (id),
    reverses_entry_id bigint REFERENCES ledger_entry (id),
    expires_at timestamptz,
    memo text NOT NULL DEFAULT '',
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- the top-level transaction that wrote the entry: postings may only be added by that transaction
    tx_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT ledger_entry_key_unique UNIQUE (idempotency_key),
    CONSTRAINT ledger_entry_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT ledger_entry_request_hash_length CHECK (length(request_hash) = 32),
    CONSTRAINT ledger_entry_kind CHECK (
        kind IN ('transfer', 'pending', 'post_pending', 'void_pending', 'expire_pending', 'reversal')),
    CONSTRAINT ledger_entry_pending_has_timeout CHECK ((kind = 'pending') = (expires_at IS NOT NULL)),
    CONSTRAINT ledger_entry_resolution_names_pending CHECK (
        (kind IN ('post_pending', 'void_pending', 'expire_pending')) = (pending_entry_id IS NOT NULL)),
    CONSTRAINT ledger_entry_reversal_names_original CHECK ((kind = 'reversal') = (reverses_entry_id IS NOT NULL)),
    CONSTRAINT ledger_entry_memo_length CHECK (length(memo) <= 500)
);
-- a hold is posted, voided or expired exactly once; an entry is reversed at most once
CREATE UNIQUE INDEX ledger_entry_resolves_pending_once ON ledger_entry (pending_entry_id)
    WHERE pending_entry_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_entry_reversed_once ON ledger_entry (reverses_entry_id)
    WHERE reverses_entry_id IS NOT NULL;
CREATE INDEX ledger_entry_created_at ON ledger_entry (created_at);

CREATE TABLE ledger_posting (
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    seq smallint NOT NULL,
    -- No foreign key to ledger_account: a key check share-locks the account row, and thousands of
    -- postings to one provider's payable account would queue on it. ledger_post validates the accounts,
    -- the deferred balance check joins them again, and accounts can never be deleted.
    account_id bigint NOT NULL,
    direction text NOT NULL,
    phase text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (entry_id, seq),
    CONSTRAINT ledger_posting_seq CHECK (seq >= 0),
    CONSTRAINT ledger_posting_direction CHECK (direction IN ('debit', 'credit')),
    CONSTRAINT ledger_posting_phase CHECK (phase IN ('posted', 'pending', 'release')),
    CONSTRAINT ledger_posting_amount_positive CHECK (amount > 0)
);
CREATE INDEX ledger_posting_account ON ledger_posting (account_id, entry_id);

-- A refused request is an outcome too: the same key returns the same refusal forever.
CREATE TABLE ledger_refusal (
    idempotency_key text PRIMARY KEY,
    request_hash bytea NOT NULL,
    code text NOT NULL,
    detail text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Holds not yet resolved (a work queue, not part of the journal: rows leave when the hold resolves).
CREATE TABLE ledger_pending_open (
    entry_id bigint PRIMARY KEY REFERENCES ledger_entry (id),
    expires_at timestamptz NOT NULL
);
CREATE INDEX ledger_pending_open_expires_at ON ledger_pending_open (expires_at);

-- Entries committed but not yet sealed into the hash chain (a work queue for the sealer).
CREATE TABLE ledger_unsealed (
    entry_id bigint PRIMARY KEY REFERENCES ledger_entry (id)
);

-- The hash chain, in seal order (which is commit order as the sealer saw it).
CREATE TABLE ledger_seal (
    chain_seq bigint PRIMARY KEY,
    entry_id bigint NOT NULL REFERENCES ledger_entry (id),
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    sealed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_seal_entry_once UNIQUE (entry_id),
    CONSTRAINT ledger_seal_seq_positive CHECK (chain_seq >= 1),
    CONSTRAINT ledger_seal_hash_length CHECK (length(prev_hash) = 32 AND length(hash) = 32)
);

------------------------------------------------------------------------------------------------------------
-- append-only

CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused (a correction is a new, reversing entry)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'VL001';
END $$;

CREATE TRIGGER ledger_entry_append_only BEFORE UPDATE OR DELETE ON ledger_entry
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_entry_no_truncate BEFORE TRUNCATE ON ledger_entry
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_posting_append_only BEFORE UPDATE OR DELETE ON ledger_posting
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_posting_no_truncate BEFORE TRUNCATE ON ledger_posting
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_seal_append_only BEFORE UPDATE OR DELETE ON ledger_seal
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_seal_no_truncate BEFORE TRUNCATE ON ledger_seal
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_refusal_append_only BEFORE UPDATE OR DELETE ON ledger_refusal
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_refusal_no_truncate BEFORE TRUNCATE ON ledger_refusal
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_account_no_delete BEFORE DELETE ON ledger_account
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_account_no_truncate BEFORE TRUNCATE ON ledger_account
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- An account's identity and limits never change; only its cached totals and metadata do.
CREATE FUNCTION ledger_account_guard() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER ledger_account_fixed BEFORE UPDATE ON ledger_account
    FOR EACH ROW EXECUTE FUNCTION ledger_account_guard();

------------------------------------------------------------------------------------------------------------
-- balanced entries

-- Postings can only join an entry inside the transaction that wrote it.
CREATE FUNCTION ledger_posting_same_transaction() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_postings p JOIN ledger_entry e ON e.id = p.entry_id
               WHERE e.tx_id <> pg_current_xact_id()) THEN
        RAISE EXCEPTION 'postings can only be added by the transaction that writes their entry'
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_posting_same_transaction AFTER INSERT ON ledger_posting
    REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_posting_same_transaction();

-- At commit: at least two postings, every account known, one currency, and debits equal credits in
-- each phase (posted, pending, release).
CREATE FUNCTION ledger_entry_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n_postings int;
    n_accounts int;
    n_currencies int;
    n_unbalanced int;
BEGIN
    SELECT count(*), count(a.id), count(DISTINCT a.currency)
      INTO n_postings, n_accounts, n_currencies
      FROM ledger_posting p LEFT JOIN ledger_account a ON a.id = p.account_id
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
CREATE CONSTRAINT TRIGGER ledger_entry_balanced AFTER INSERT ON ledger_entry
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_entry_check_balanced();

-- Each seal links to the previous one (or to 32 zero bytes for the first).
CREATE FUNCTION ledger_seal_check_link() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER ledger_seal_links BEFORE INSERT ON ledger_seal
    FOR EACH ROW EXECUTE FUNCTION ledger_seal_check_link();

------------------------------------------------------------------------------------------------------------
-- the write path: one round trip per entry

-- What an entry's postings do to each account's four totals (release postings give back what is pending).
-- A plain SQL function, so the planner inlines it into both statements of ledger_post that use it.
CREATE FUNCTION ledger_deltas(p_account_ids bigint[], p_directions text[], p_phases text[], p_amounts bigint[])
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

CREATE FUNCTION ledger_post(
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
LANGUAGE plpgsql AS $$
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
BEGIN
    IF cardinality(p_account_ids) < 2
       OR cardinality(p_account_ids) <> cardinality(p_directions)
       OR cardinality(p_account_ids) <> cardinality(p_phases)
       OR cardinality(p_account_ids) <> cardinality(p_amounts) THEN
        RAISE EXCEPTION 'an entry needs at least two postings, each with account, direction, phase and amount'
            USING ERRCODE = 'VL002';
    END IF;

    SELECT count(*), count(DISTINCT a.currency) INTO v_n_accounts, v_n_currencies
      FROM ledger_account a WHERE a.id = ANY (p_account_ids);
    IF v_n_accounts <> (SELECT count(DISTINCT x) FROM unnest(p_account_ids) x) THEN
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
             WHERE (a.debits_must_not_exceed_credits AND n.dp + n.dq > n.cp)
                OR (a.credits_must_not_exceed_debits AND n.cp + n.cq > n.dp)
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

-- Release an expired hold: an expire_pending entry whose release postings mirror the hold's postings.
-- Returns the new entry id, or NULL when the hold was already resolved.
CREATE FUNCTION ledger_expire_pending(p_pending_entry_id bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_dirs text[];
    v_amounts bigint[];
    v_phases text[];
    v_key text := '~expire:' || p_pending_entry_id;
    v_hash bytea := sha256(convert_to(v_key, 'UTF8'));
    v_result record;
BEGIN
    SELECT array_agg(p.account_id ORDER BY p.seq), array_agg(p.direction ORDER BY p.seq),
           array_agg(p.amount ORDER BY p.seq), array_agg('release'::text ORDER BY p.seq)
      INTO v_ids, v_dirs, v_amounts, v_phases
      FROM ledger_posting p WHERE p.entry_id = p_pending_entry_id AND p.phase = 'pending';
    SELECT * INTO v_result FROM ledger_post(v_key, v_hash, 'expire_pending', p_pending_entry_id, NULL, NULL,
                                            'hold expired', '{}'::jsonb, v_ids, v_dirs, v_phases, v_amounts);
    IF v_result.outcome = 'created' THEN
        RETURN v_result.entry_id;
    END IF;
    -- already resolved: the queue row may still be there if an older release left it
    DELETE FROM ledger_pending_open o WHERE o.entry_id = p_pending_entry_id;
    RETURN NULL;
END $$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS ledger_expire_pending(bigint);
DROP FUNCTION IF EXISTS ledger_deltas(bigint[], text[], text[], bigint[]);
DROP FUNCTION IF EXISTS ledger_post(text, bytea, text, bigint, bigint, timestamptz, text, jsonb,
                                    bigint[], text[], text[], bigint[]);
DROP TABLE IF EXISTS ledger_seal;
DROP TABLE IF EXISTS ledger_unsealed;
DROP TABLE IF EXISTS ledger_pending_open;
DROP TABLE IF EXISTS ledger_refusal;
DROP TABLE IF EXISTS ledger_posting;
DROP TABLE IF EXISTS ledger_entry;
DROP TABLE IF EXISTS ledger_account;
DROP FUNCTION IF EXISTS ledger_seal_check_link();
DROP FUNCTION IF EXISTS ledger_entry_check_balanced();
DROP FUNCTION IF EXISTS ledger_posting_same_transaction();
DROP FUNCTION IF EXISTS ledger_account_guard();
DROP FUNCTION IF EXISTS ledger_refuse_change();
"""


def upgrade() -> None:
    execute_script(op.get_bind(), UPGRADE)


def downgrade() -> None:
    execute_script(op.get_bind(), DOWNGRADE)
