-- privrank schema v1: events, items, settings, privacy-safe features, cached ranks,
-- evaluation results, model versions and the job-run history.

CREATE TABLE items (
    scope       text        NOT NULL,
    item_id     text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    active      boolean     NOT NULL DEFAULT true,
    PRIMARY KEY (scope, item_id)
);

CREATE TABLE events (
    id                 bigserial   PRIMARY KEY,
    scope              text        NOT NULL,
    user_id            text        NOT NULL,
    item_id            text        NOT NULL,
    event_type         text        NOT NULL CHECK (event_type IN
        ('impression', 'click', 'view', 'complete', 'accept', 'dismiss', 'rating', 'purchase')),
    value              real        NOT NULL DEFAULT 1,
    occurred_at        timestamptz NOT NULL,
    session_id         text        NOT NULL DEFAULT '',
    device             smallint    NOT NULL DEFAULT 0,
    country            text        NOT NULL DEFAULT '',
    utc_offset_minutes smallint,
    received_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_scope_time ON events (scope, occurred_at);
CREATE INDEX events_user ON events (user_id);

CREATE TABLE user_settings (
    user_id                 text        PRIMARY KEY,
    personalization_enabled boolean     NOT NULL DEFAULT true,
    data_sharing_consent    boolean     NOT NULL DEFAULT false,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_settings_opted_out ON user_settings (user_id) WHERE NOT personalization_enabled;

-- Every change to a user's settings is announced, so each server process updates its
-- in-memory opt-out set at once (payload: "<0|1>:<user_id>", 1 = personalization enabled).
CREATE FUNCTION privrank_settings_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('privrank_settings', '1:' || OLD.user_id);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('privrank_settings',
                      (CASE WHEN NEW.personalization_enabled THEN '1:' ELSE '0:' END) || NEW.user_id);
    RETURN NEW;
END $$;
CREATE TRIGGER user_settings_notify AFTER INSERT OR UPDATE OR DELETE ON user_settings
    FOR EACH ROW EXECUTE FUNCTION privrank_settings_notify();

-- The allow-listed aggregate features of a user in a scope; nothing else.
CREATE TABLE user_features (
    scope               text        NOT NULL,
    user_id             text        NOT NULL,
    engagement_score    real        NOT NULL DEFAULT 0,
    click_through_rate  real        NOT NULL DEFAULT 0,
    sessions_7d         integer     NOT NULL DEFAULT 0,
    sessions_30d        integer     NOT NULL DEFAULT 0,
    avg_session_seconds real        NOT NULL DEFAULT 0,
    preferred_hour      smallint    NOT NULL DEFAULT 0,
    device_category     smallint    NOT NULL DEFAULT 0,
    country_code        text        NOT NULL DEFAULT '',
    utc_offset_minutes  smallint    NOT NULL DEFAULT 0,
    embedding           real[],
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, user_id)
);
CREATE INDEX user_features_user ON user_features (user_id);

CREATE TABLE ranks (
    scope         text        NOT NULL,
    user_id       text        NOT NULL,
    model_version text        NOT NULL,
    item_ids      text[]      NOT NULL,
    scores        real[]      NOT NULL,
    computed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, user_id)
);
CREATE INDEX ranks_user ON ranks (user_id);

CREATE TABLE model_versions (
    scope         text        NOT NULL,
    model_version text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    manifest      jsonb       NOT NULL,
    PRIMARY KEY (scope, model_version)
);

CREATE TABLE eval_results (
    id              bigserial   PRIMARY KEY,
    scope           text        NOT NULL,
    model_version   text        NOT NULL,
    model           text        NOT NULL,
    metrics         jsonb       NOT NULL,
    users_evaluated integer     NOT NULL,
    evaluated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX eval_results_scope ON eval_results (scope, evaluated_at DESC);

CREATE TABLE job_runs (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    scope       text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    detail      text        NOT NULL DEFAULT '',
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
