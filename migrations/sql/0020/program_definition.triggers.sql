CREATE OR REPLACE TRIGGER program_definition_immutable BEFORE UPDATE OR DELETE ON program_definition
    FOR EACH ROW EXECUTE FUNCTION program_definition_immutable();
CREATE OR REPLACE TRIGGER program_definition_no_truncate BEFORE TRUNCATE ON program_definition
    FOR EACH STATEMENT EXECUTE FUNCTION program_definition_immutable();
