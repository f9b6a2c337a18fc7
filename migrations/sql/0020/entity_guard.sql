-- An entity is never deleted (the journal and the history name it); its id, unified social credit code
-- and identity-document hash never change.
CREATE OR REPLACE FUNCTION entity_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'entities are never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.uscc IS DISTINCT FROM OLD.uscc OR NEW.created_at <> OLD.created_at
       OR NEW.id_document_hmac IS DISTINCT FROM OLD.id_document_hmac THEN
        RAISE EXCEPTION 'an entity''s id, unified social credit code and identity-document hash never change'
            USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
