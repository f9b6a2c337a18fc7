-- A key's material, role, entity and voucher types never change, a revocation is final, and a key row is
-- never deleted (the journal's metadata may name the key that asked for an entry).
CREATE OR REPLACE FUNCTION api_key_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'api keys are revoked, never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.id <> OLD.id OR NEW.prefix <> OLD.prefix OR NEW.secret_hash <> OLD.secret_hash
       OR NEW.role <> OLD.role OR NEW.entity_id IS DISTINCT FROM OLD.entity_id
       OR NEW.voucher_types IS DISTINCT FROM OLD.voucher_types OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'api key %: key material, role, entity and voucher types are fixed at creation', OLD.id
            USING ERRCODE = 'VL001';
    END IF;
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'api key % is revoked; a revocation is final', OLD.id USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
