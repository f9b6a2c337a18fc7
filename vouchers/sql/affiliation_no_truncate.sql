-- Neither the relations nor the registry's version row are ever truncated.
CREATE OR REPLACE FUNCTION affiliation_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% refused: affiliations are never deleted', TG_OP USING ERRCODE = 'VL001';
END $$;
