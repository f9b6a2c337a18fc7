-- Each row inserted or ended keeps the version of its statement, so a cached graph is brought forward by
-- the rows changed after its version (vouchers/affiliations.py). currval is the value the statement's
-- affiliation_bump_version just wrote to the registry: the last one this session took.
CREATE OR REPLACE FUNCTION affiliation_stamp_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_version := currval('affiliation_version');
    RETURN NEW;
END $$;
