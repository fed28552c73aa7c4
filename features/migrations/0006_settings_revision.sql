-- Every change to a user's settings gets a revision, increasing in the order the changes take
-- effect, so that a server process can tell which of two states it heard is the newer: the
-- UpdateSettings that changed it, NOTIFY and the periodic re-read reach it in no fixed order.
-- updated_at cannot tell (now() is the start of the transaction, not when its row lock was
-- taken). The revision is drawn in a BEFORE trigger, which runs once the row is locked, so a
-- change that waited for another's lock always draws the larger one.

CREATE SEQUENCE privrank_revision;
GRANT USAGE ON SEQUENCE privrank_revision TO privrank_service;

ALTER TABLE user_settings ADD COLUMN revision bigint NOT NULL DEFAULT 0;

CREATE FUNCTION privrank_next_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := nextval('privrank_revision');
    RETURN NEW;
END $$;
CREATE TRIGGER user_settings_revision BEFORE INSERT OR UPDATE ON user_settings
    FOR EACH ROW EXECUTE FUNCTION privrank_next_revision();

-- The payload now carries the revision: "<0|1>:<revision>:<user_id>"; a deleted row (erasure)
-- announces "1" (the default) with a revision of its own. Processes of an earlier release
-- misread it until they are restarted and hear opt-outs only on their re-read meanwhile.
CREATE OR REPLACE FUNCTION privrank_settings_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('privrank_settings',
                          '1:' || nextval('privrank_revision') || ':' || OLD.user_id);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('privrank_settings',
                      (CASE WHEN NEW.personalization_enabled THEN '1:' ELSE '0:' END)
                      || NEW.revision || ':' || NEW.user_id);
    RETURN NEW;
END $$;
