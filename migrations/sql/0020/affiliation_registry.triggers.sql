CREATE OR REPLACE TRIGGER affiliation_registry_no_truncate BEFORE TRUNCATE ON affiliation_registry
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_no_truncate();
