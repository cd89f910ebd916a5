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

-- Anomalies found on the stream, for history queries: partitioned by the reading's time (`ts`),
-- a partition a UTC day (`anomalies_d20261202`: [day * 86400, (day + 1) * 86400)), so retention
-- drops whole days instead of deleting rows. The key includes `ts` (a partitioned table's unique
-- indexes must): a redelivered reading has the same stream, source id and `ts`, so
-- (source_stream, source_id, ts) still de-duplicates redeliveries. The DEFAULT partition takes
-- the readings of days without a partition (far future, fuzzed timestamps), so an insert never
-- fails; its `ts` index serves retention and the rows a new day's partition takes over.
--
-- A deployment of the plain table is converted here, in this one transaction (an interrupted
-- start changes nothing, the next one converts): the old table is set aside, its indexes
-- dropped (only read once, in full) and its id sequence kept, so ids carry on; the rows are
-- copied after the partitioned table exists, then the old table is dropped. Columns that
-- older deployments added later are added first, so the copy reads them all.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_class WHERE oid = to_regclass('anomalies') AND relkind = 'r') THEN
        ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS source_stream text NOT NULL DEFAULT '';
        ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS onset boolean;
        ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS test text;
        ALTER TABLE anomalies RENAME TO anomalies_legacy;
        ALTER TABLE anomalies_legacy DROP CONSTRAINT IF EXISTS anomalies_pkey;
        DROP INDEX IF EXISTS anomalies_source_id, anomalies_source_key, anomalies_series_ts,
            anomalies_episode;
        ALTER SEQUENCE IF EXISTS anomalies_id_seq OWNED BY NONE;
    END IF;
END $$;

CREATE SEQUENCE IF NOT EXISTS anomalies_id_seq;
DO $$
BEGIN
    IF to_regclass('anomalies') IS NULL THEN
        CREATE TABLE anomalies (
            id            bigint NOT NULL DEFAULT nextval('anomalies_id_seq'),
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
            -- Episodes: episode_id is the opener's source_id; onset marks the reading that
            -- opened it.
            episode_id    text,
            detected_at   timestamptz NOT NULL DEFAULT now(),
            -- Entry ids are unique within one stream only (several `readings` streams, e.g.
            -- one per Redis Cluster shard, can hand out the same id), so the de-duplication
            -- key includes the stream.
            source_stream text NOT NULL DEFAULT '',
            onset         boolean,
            -- The test that fired (point, shift, divergence, threshold): what feedback on an
            -- episode widens (detector.feedback).
            test          text,
            -- That test's statistic over the version's own threshold (the event's
            -- base_score): how strong a false alert was, which caps what feedback on it
            -- suppresses.
            base_score    double precision,
            PRIMARY KEY (id, ts)
        ) PARTITION BY RANGE (ts);
        ALTER SEQUENCE anomalies_id_seq OWNED BY anomalies.id;
    END IF;
END $$;
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS base_score double precision;
CREATE TABLE IF NOT EXISTS anomalies_default PARTITION OF anomalies DEFAULT;
CREATE UNIQUE INDEX IF NOT EXISTS anomalies_source_key ON anomalies (source_stream, source_id, ts);
CREATE INDEX IF NOT EXISTS anomalies_series_ts ON anomalies (series_id, ts);
CREATE INDEX IF NOT EXISTS anomalies_episode ON anomalies (episode_id) WHERE onset;
CREATE INDEX IF NOT EXISTS anomalies_default_ts ON anomalies_default (ts);

-- The partition of one UTC day (``day`` = ts div 86400), made if missing: true if this call
-- made it. The rows of that day the DEFAULT partition holds move into it in the same
-- transaction (a partition cannot be added while the default holds rows of its range). It is
-- built as a table of its own, then attached: attaching locks the parent only against other
-- DDL, not against inserts and queries (CREATE TABLE ... PARTITION OF would lock it against
-- all), and its check constraint spares attaching a scan of the new table. One maker at a
-- time (an advisory lock, taken only when the partition is missing), so writers and the
-- retention pass of several processes may all ask for the same day.
CREATE OR REPLACE FUNCTION anomalies_day_partition(day bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo   bigint := day * 86400;
    hi   bigint := lo + 86400;
    part text := 'anomalies_d' || to_char(to_timestamp(lo) AT TIME ZONE 'UTC', 'YYYYMMDD');
BEGIN
    FOR attempt IN 1..2 LOOP
        -- Each a fresh snapshot: the second sees a partition made while we waited.
        PERFORM FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'anomalies'::regclass AND c.relname = part;
        IF FOUND THEN
            RETURN false;
        END IF;
        IF attempt = 1 THEN
            PERFORM pg_advisory_xact_lock(1634627681);  -- 0x616E7061, "anpa"
        END IF;
    END LOOP;
    EXECUTE format('CREATE TABLE %I (LIKE anomalies INCLUDING DEFAULTS)', part);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %s AND ts < %s)',
                   part, part || '_day', lo, hi);
    EXECUTE format('WITH moved AS (DELETE FROM anomalies_default WHERE ts >= %s AND ts < %s'
                   ' RETURNING *) INSERT INTO %I SELECT * FROM moved', lo, hi, part);
    EXECUTE format('ALTER TABLE anomalies ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
                   part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_day');
    RETURN true;
END $$;

-- The plain table's rows, copied once the partitioned table exists: the days of the last year
-- (and the next two) get their partitions first, so the rows land there rather than in the
-- default partition (a retention pass then drops the days it does not keep).
DO $$
DECLARE
    today bigint := floor(extract(epoch FROM now()) / 86400);
BEGIN
    IF to_regclass('anomalies_legacy') IS NULL THEN
        RETURN;
    END IF;
    PERFORM anomalies_day_partition(d) FROM (
        SELECT DISTINCT ts / 86400 AS d FROM anomalies_legacy
        WHERE ts >= (today - 366) * 86400 AND ts < (today + 3) * 86400
    ) days;
    INSERT INTO anomalies (id, series_id, ts, value, model_version, mean, std, lower_bound,
        upper_bound, score, source, source_id, episode_id, detected_at, source_stream, onset,
        test)
    SELECT id, series_id, ts, value, model_version, mean, std, lower_bound, upper_bound, score,
        source, source_id, episode_id, detected_at, source_stream, onset, test
    FROM anomalies_legacy
    ON CONFLICT DO NOTHING;
    PERFORM setval('anomalies_id_seq', max(id)) FROM anomalies_legacy
    HAVING max(id) > (SELECT last_value FROM anomalies_id_seq);
    DROP TABLE anomalies_legacy;
END $$;

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
-- A judgment's episode opener as the rule reads it: its reading's timestamp and base score
-- (copied from `anomalies`, which retention deletes). Rows judged before they were kept take
-- the opener's timestamp from `anomalies` while it is there.
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS episode_ts bigint;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS base_score double precision;
UPDATE feedback f SET episode_ts = a.ts
FROM anomalies a
WHERE f.episode_ts IS NULL AND f.episode_id IS NOT NULL AND a.episode_id = f.episode_id
    AND a.onset AND a.source = 'stream' AND a.series_id = f.series_id;
CREATE UNIQUE INDEX IF NOT EXISTS feedback_episode ON feedback (series_id, episode_id)
    WHERE episode_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS feedback_missed_range ON feedback (series_id, from_ts, to_ts)
    WHERE episode_id IS NULL;
CREATE INDEX IF NOT EXISTS feedback_series ON feedback (series_id, id);
CREATE INDEX IF NOT EXISTS feedback_mlflow_due ON feedback (mlflow_next_try)
    WHERE mlflow_logged_at IS NULL;

-- Bulk fits (POST /fit, `anomaly-ingest fit`): one row a job, whose versions name it in
-- `model_versions.fit_job`. A job is one MLflow run (its counts, and a table of its versions
-- as an artifact), not one run a version: the tracker logs it once the job is finished, or
-- once it has stopped making progress for a while (a process that died mid-job), and records
-- the run here; its versions' `mlflow_run_id` is the job's. `refusals` keeps the first
-- refused series and why.
CREATE TABLE IF NOT EXISTS fit_jobs (
    id              bigserial PRIMARY KEY,
    source          text NOT NULL,
    kind            text NOT NULL,
    sigma           double precision NOT NULL,
    direction       text NOT NULL,
    fitted          integer NOT NULL DEFAULT 0,
    refused         integer NOT NULL DEFAULT 0,
    points          bigint NOT NULL DEFAULT 0,
    seconds         double precision,
    refusals        jsonb NOT NULL DEFAULT '[]'::jsonb,
    status          text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'finished', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    mlflow_run_id   text,
    mlflow_attempts integer NOT NULL DEFAULT 0,
    mlflow_next_try timestamptz NOT NULL DEFAULT now(),
    mlflow_error    text
);
CREATE INDEX IF NOT EXISTS fit_jobs_mlflow_due ON fit_jobs (mlflow_next_try)
    WHERE mlflow_run_id IS NULL;
-- No foreign key: a bulk batch inserts a thousand versions, and a per-row check of a job
-- that the same process created before buys nothing.
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS fit_job bigint;
CREATE INDEX IF NOT EXISTS model_versions_fit_job ON model_versions (fit_job)
    WHERE fit_job IS NOT NULL;
