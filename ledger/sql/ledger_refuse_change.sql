-- The journal's tables are append-only: any UPDATE, DELETE or TRUNCATE of them is refused.
CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused (a correction is a new, reversing entry)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'VL001';
END $$;
