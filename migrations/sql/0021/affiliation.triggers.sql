CREATE OR REPLACE TRIGGER affiliation_guard BEFORE UPDATE OR DELETE ON affiliation
    FOR EACH ROW EXECUTE FUNCTION affiliation_guard();
CREATE OR REPLACE TRIGGER affiliation_no_truncate BEFORE TRUNCATE ON affiliation
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_no_truncate();
CREATE OR REPLACE TRIGGER affiliation_bump_version BEFORE INSERT OR UPDATE ON affiliation
    FOR EACH STATEMENT EXECUTE FUNCTION affiliation_bump_version();
CREATE OR REPLACE TRIGGER affiliation_stamp_version BEFORE INSERT OR UPDATE ON affiliation
    FOR EACH ROW EXECUTE FUNCTION affiliation_stamp_version();
