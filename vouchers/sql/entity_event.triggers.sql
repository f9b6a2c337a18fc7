CREATE OR REPLACE TRIGGER entity_event_append_only BEFORE UPDATE OR DELETE ON entity_event
    FOR EACH ROW EXECUTE FUNCTION entity_event_append_only();
CREATE OR REPLACE TRIGGER entity_event_no_truncate BEFORE TRUNCATE ON entity_event
    FOR EACH STATEMENT EXECUTE FUNCTION entity_event_append_only();
