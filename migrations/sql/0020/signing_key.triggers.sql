CREATE OR REPLACE TRIGGER signing_key_guard BEFORE UPDATE OR DELETE ON signing_key
    FOR EACH ROW EXECUTE FUNCTION signing_key_guard();
