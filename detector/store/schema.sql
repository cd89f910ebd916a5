-- The durable store: PostgreSQL is the source of truth; Redis is rebuilt from it on demand.
-- Applied idempotently at start-up (under an advisory lock) by every process that uses it.

CREATE TABLE IF NOT EXISTS series (
    series_id    text PRIMARY KEY,
    last_version integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The last version number handed out per series, committed apart from the fit that took it:
-- a fit rolled back leaves a gap, so a number is never given to two fits. `series.last_version`
-- is the newest committed version (what predict's "latest" and GET /models report).
CREATE TABLE IF NOT EXISTS version_allocations (
    series_id      text PRIMARY KEY,
    last_allocated integer NOT NULL
);

CREATE TABLE IF NOT EXISTS model_versions (
    id            bigserial PRIMARY KEY,
    series_id     text NOT NULL REFERENCES series (series_id),
    version       integer NOT NULL,
    kind          text NOT NULL DEFAULT 'static',
    mean          double precision NOT NULL,
    std           double precision NOT NULL,
    sigma         double precision NOT NULL,
    direction     text NOT NULL,
    points_used   integer NOT NULL,
    first_ts      bigint NOT NULL,
    last_ts       bigint NOT NULL,
    min_value     double precision NOT NULL,
    max_value     double precision NOT NULL,
    params        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    mlflow_run_id text,
    UNIQUE (series_id, version)
);

-- Set when retention deleted the version's training points (the row itself stays).
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS points_deleted_at timestamptz;

-- A version's training points: one row of two arrays in timestamp order, written by one COPY
-- row and read by one, 16 bytes a point on disk (a row a point took about 52, and a fleet of
-- small fits a row each per point). Stored uncompressed (EXTERNAL): float data barely
-- compresses, and compressing it would cost the fit its time.
CREATE TABLE IF NOT EXISTS training_arrays (
    model_id bigint PRIMARY KEY,
    ts       bigint[] NOT NULL,
    value    double precision[] NOT NULL
);
ALTER TABLE training_arrays ALTER COLUMN ts SET STORAGE EXTERNAL;
ALTER TABLE training_arrays ALTER COLUMN value SET STORAGE EXTERNAL;

-- Versions fitted before training_arrays keep a row a point here, read and trimmed as before.
CREATE TABLE IF NOT EXISTS training_points (
    model_id bigint NOT NULL,
    ts       bigint NOT NULL,
    value    double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS training_points_model_brin
    ON training_points USING brin (model_id) WITH (pages_per_range = 16);

-- Every stored training point as a row, however it is stored (for SQL by hand).
CREATE OR REPLACE VIEW training_point_rows AS
    SELECT model_id, ts, value FROM training_points
    UNION ALL
    SELECT a.model_id, p.ts, p.value
    FROM training_arrays a, unnest(a.ts, a.value) AS p(ts, value);

-- MLflow runs still to be logged: written in the fit's transaction, drained off the request
-- path, so a fit never waits for MLflow and a run is never lost or logged twice.
CREATE TABLE IF NOT EXISTS mlflow_outbox (
    model_id   bigint PRIMARY KEY REFERENCES model_versions (id),
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    next_try   timestamptz NOT NULL DEFAULT now()
);
-- The series and version of each row, so a claim picks each series' oldest row by index.
ALTER TABLE mlflow_outbox ADD COLUMN IF NOT EXISTS series_id text;
ALTER TABLE mlflow_outbox ADD COLUMN IF NOT EXISTS version integer;
UPDATE mlflow_outbox o SET series_id = m.series_id, version = m.version
FROM model_versions m WHERE m.id = o.model_id AND o.series_id IS NULL;
CREATE INDEX IF NOT EXISTS mlflow_outbox_series_version ON mlflow_outbox (series_id, version);

-- Anomalies found on the stream, for history queries (source_id de-duplicates redeliveries).
CREATE TABLE IF NOT EXISTS anomalies (
    id            bigserial PRIMARY KEY,
    series_id     text NOT NULL,
    ts            bigint NOT NULL,
    value         double precision NOT NULL,
    model_version integer NOT NULL,
    mean          double precision NOT NULL,
    std           double precision NOT NULL,
    lower_bound   double precision NOT NULL,
    upper_bound   double precision NOT NULL,
    score         double precision NOT NULL,
    source        text NOT NULL,
    source_id     text,
    episode_id    text,
    detected_at   timestamptz NOT NULL DEFAULT now()
);
-- Entry ids are unique within one stream only (several `readings` streams, e.g. one per Redis
-- Cluster shard, can hand out the same id), so the de-duplication key includes the stream.
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS source_stream text NOT NULL DEFAULT '';
DROP INDEX IF EXISTS anomalies_source_id;
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_source_key ON anomalies (source_stream, source_id);
CREATE INDEX IF NOT EXISTS anomalies_series_ts ON anomalies (series_id, ts);
-- Episodes: episode_id is the opener's source_id; onset marks the reading that opened it.
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS onset boolean;

-- Incidents (episodes of many series opening close together), one row each, written by the
-- workers as the incident opens, gains series and closes: upserts that only move forward
-- (counts and the last onset up, the first onset down, closed once), so a redelivered or
-- repeated write changes nothing. `source` is the output (anomalies stream or `kafka:` topic)
-- whose incident it is; ids are unique within one.
CREATE TABLE IF NOT EXISTS incidents (
    source       text NOT NULL,
    incident_id  text NOT NULL,
    state        text NOT NULL,
    opened_at    timestamptz NOT NULL,
    closed_at    timestamptz,
    series_count integer NOT NULL,
    onset_count  integer NOT NULL,
    first_onset  bigint NOT NULL,
    last_onset   bigint NOT NULL,
    closed_by    text,
    PRIMARY KEY (source, incident_id)
);
CREATE INDEX IF NOT EXISTS incidents_first_onset ON incidents (first_onset, incident_id);
-- The test that fired (point, shift, divergence, threshold): what feedback on an episode
-- widens (detector.feedback).
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS test text;
CREATE INDEX IF NOT EXISTS anomalies_episode ON anomalies (episode_id) WHERE onset;

-- Feedback on detections (POST /anomalies/{episode_id}/feedback, POST /series/{id}/feedback):
-- the source of truth of each series' threshold adjustment, which the API writes to Redis
-- (`feedback:{<series_id>}`) for the workers. One judgment per episode (a later one replaces
-- the label), one row per missed range; `mlflow_logged_at` is NULL until the row is recorded
-- on the MLflow run of its version (drained like mlflow_outbox).
CREATE SEQUENCE IF NOT EXISTS feedback_revision;
CREATE TABLE IF NOT EXISTS feedback (
    id               bigserial PRIMARY KEY,
    -- Bumped by every insert and change: the newest of a series' rows orders its Redis writes.
    revision         bigint NOT NULL DEFAULT nextval('feedback_revision'),
    series_id        text NOT NULL,
    episode_id       text,
    label            text NOT NULL
        CHECK (label IN ('false_positive', 'true_positive', 'missed')),
    test             text,
    model_version    integer,
    from_ts          bigint,
    to_ts            bigint,
    note             text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    mlflow_logged_at timestamptz,
    mlflow_attempts  integer NOT NULL DEFAULT 0,
    mlflow_next_try  timestamptz NOT NULL DEFAULT now(),
    mlflow_error     text
);
CREATE UNIQUE INDEX IF NOT EXISTS feedback_episode ON feedback (series_id, episode_id)
    WHERE episode_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS feedback_missed_range ON feedback (series_id, from_ts, to_ts)
    WHERE episode_id IS NULL;
CREATE INDEX IF NOT EXISTS feedback_series ON feedback (series_id, id);
CREATE INDEX IF NOT EXISTS feedback_mlflow_due ON feedback (mlflow_next_try)
    WHERE mlflow_logged_at IS NULL;
