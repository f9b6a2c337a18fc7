-- Release an expired hold: an expire_pending entry whose release postings mirror the hold's postings.
-- Returns the new entry id, or NULL when the hold was already resolved.
CREATE OR REPLACE FUNCTION ledger_expire_pending(p_pending_entry_id bigint) RETURNS bigint
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
