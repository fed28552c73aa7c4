-- The global personalization switch (Admin.SetFlags), stored so that it holds for every server
-- process and across restarts. One row. A change is announced on the settings channel as
-- "G:<revision>:<0|1>" (1 = personalization on), its revision drawn as a user's (0006).

CREATE TABLE global_flags (
    only_row                boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    personalization_enabled boolean     NOT NULL DEFAULT true,
    revision                bigint      NOT NULL DEFAULT 0,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
INSERT INTO global_flags DEFAULT VALUES;
GRANT SELECT, UPDATE ON global_flags TO privrank_service;

CREATE TRIGGER global_flags_revision BEFORE UPDATE ON global_flags
    FOR EACH ROW EXECUTE FUNCTION privrank_next_revision();

CREATE FUNCTION privrank_flags_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('privrank_settings', 'G:' || NEW.revision || ':'
                      || (CASE WHEN NEW.personalization_enabled THEN '1' ELSE '0' END));
    RETURN NEW;
END $$;
CREATE TRIGGER global_flags_notify AFTER UPDATE ON global_flags
    FOR EACH ROW EXECUTE FUNCTION privrank_flags_notify();
