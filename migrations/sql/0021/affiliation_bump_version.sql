-- One version per statement, taken before it writes (a bulk load moves the version once): readers compare
-- the registry's version with their cached graph's. Taking it first takes the registry's row lock before
-- any relation is written, held to the commit, so writers commit in version order; the log keeps every
-- version whose statement committed, for a reader to tell whether its graph's version is in its history
-- (vouchers/affiliations.py); affiliation_stamp_version stamps each row with the same version.
CREATE OR REPLACE FUNCTION affiliation_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_version bigint;
BEGIN
    UPDATE affiliation_registry SET version = nextval('affiliation_version') RETURNING version INTO v_version;
    INSERT INTO affiliation_version_log (version) VALUES (v_version);
    RETURN NULL;
END $$;
