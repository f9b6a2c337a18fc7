-- A timestamp as pydantic writes one in JSON (the rest of the API's answers): UTC, 'Z', microseconds only
-- when there are some.
CREATE OR REPLACE FUNCTION vl_json_time(p_at timestamptz) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN extract(microseconds FROM p_at)::bigint % 1000000 = 0 THEN ''
                   ELSE '.' || to_char(p_at AT TIME ZONE 'UTC', 'US') END
           || 'Z'
$$;
