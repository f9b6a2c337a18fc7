-- One bump per statement: a bulk load moves the version once. Readers compare the registry's version with
-- their cached graph's.
CREATE OR REPLACE FUNCTION affiliation_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE affiliation_registry SET version = nextval('affiliation_version');
    RETURN NULL;
END $$;
