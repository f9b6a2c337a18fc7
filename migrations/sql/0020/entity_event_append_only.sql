-- An entity's history is append-only.
CREATE OR REPLACE FUNCTION entity_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'entity_event is append-only: % refused', TG_OP USING ERRCODE = 'VL001';
END $$;
