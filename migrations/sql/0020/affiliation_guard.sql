-- Rows are never deleted; the one change allowed is an end: valid_to set once, from NULL, with ended_at.
CREATE OR REPLACE FUNCTION affiliation_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'affiliations are never deleted: end one with valid_to' USING ERRCODE = 'VL001';
    END IF;
    IF OLD.valid_to IS NOT NULL OR NEW.valid_to IS NULL OR NEW.ended_at IS NULL
       OR (NEW.id, NEW.from_entity_id, NEW.to_entity_id, NEW.kind, NEW.valid_from, NEW.created_at)
          IS DISTINCT FROM (OLD.id, OLD.from_entity_id, OLD.to_entity_id, OLD.kind, OLD.valid_from, OLD.created_at)
       OR NEW.equity_pct IS DISTINCT FROM OLD.equity_pct OR NEW.source IS DISTINCT FROM OLD.source THEN
        RAISE EXCEPTION 'an affiliation only changes by being ended once (valid_to and ended_at set from NULL)'
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
