-- A signing key is never deleted; it only ever changes from active to retired.
CREATE OR REPLACE FUNCTION signing_key_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'signing keys are retired, never deleted' USING ERRCODE = 'VL001';
    END IF;
    IF NEW.kid <> OLD.kid OR NEW.public_jwk <> OLD.public_jwk OR NEW.created_at <> OLD.created_at
       OR (OLD.status = 'retired' AND NEW.status <> 'retired') THEN
        RAISE EXCEPTION 'a signing key only ever changes from active to retired' USING ERRCODE = 'VL001';
    END IF;
    RETURN NEW;
END $$;
