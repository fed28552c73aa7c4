-- Access control down to the database.
--
-- privrank_service: the role serving and job processes run as (SET ROLE at connect). It owns
-- nothing, is no superuser and has no BYPASSRLS, so row-level security applies to it.
-- User-keyed tables FORCE row-level security: inside a transaction that set
-- privrank.user_id (set_config(..., true)), only that user's rows are visible or writable;
-- a transaction without it (batch jobs, the opt-out set) sees every row.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'privrank_service') THEN
        CREATE ROLE privrank_service LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
    END IF;
    -- the migrating login may act as the service role (superusers always may)
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT privrank_service TO %I', current_user);
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO privrank_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON
    items, events, user_settings, user_features, ranks, model_versions, eval_results, job_runs
    TO privrank_service;
GRANT SELECT ON schema_migrations TO privrank_service;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO privrank_service;

-- One-way record of erasures (sha256 of the user ID, never the ID): every server process
-- hears of an erasure and masks the user's vector until a snapshot built after it serves,
-- and cleanup prunes older snapshots that may still hold the vector.
CREATE TABLE erasures (
    user_hash  text        NOT NULL,
    erased_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX erasures_time ON erasures (erased_at);
GRANT SELECT, INSERT, DELETE ON erasures TO privrank_service;

CREATE FUNCTION privrank_erasure_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('privrank_settings', 'E:' || NEW.user_hash);
    RETURN NEW;
END $$;
CREATE TRIGGER erasures_notify AFTER INSERT ON erasures
    FOR EACH ROW EXECUTE FUNCTION privrank_erasure_notify();

CREATE FUNCTION privrank_user_visible(row_user text) RETURNS boolean
    LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('privrank.user_id', true), '') IN ('', row_user)
$$;

ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE events FORCE ROW LEVEL SECURITY;
CREATE POLICY user_scoped ON events
    USING (privrank_user_visible(user_id)) WITH CHECK (privrank_user_visible(user_id));

ALTER TABLE user_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_settings FORCE ROW LEVEL SECURITY;
CREATE POLICY user_scoped ON user_settings
    USING (privrank_user_visible(user_id)) WITH CHECK (privrank_user_visible(user_id));

ALTER TABLE user_features ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_features FORCE ROW LEVEL SECURITY;
CREATE POLICY user_scoped ON user_features
    USING (privrank_user_visible(user_id)) WITH CHECK (privrank_user_visible(user_id));

ALTER TABLE ranks ENABLE ROW LEVEL SECURITY;
ALTER TABLE ranks FORCE ROW LEVEL SECURITY;
CREATE POLICY user_scoped ON ranks
    USING (privrank_user_visible(user_id)) WITH CHECK (privrank_user_visible(user_id));
