-- A published program definition is never edited nor deleted: a change is a new version.
CREATE OR REPLACE FUNCTION program_definition_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a published program definition never changes: publish a new version' USING ERRCODE = 'VL001';
END $$;
