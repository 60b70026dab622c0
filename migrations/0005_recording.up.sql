-- Recordings, the durable job queue that processes them, and derived artifacts
-- (seeds 000 STR-023, 001, 002).

CREATE TYPE processing_status AS ENUM ('pending', 'processing', 'available', 'failed');
CREATE TYPE job_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'dead');
CREATE TYPE artifact_type AS ENUM ('transcript', 'captions', 'chapters', 'highlights', 'thumbnail');

-- status moves only pending -> processing -> available | failed (the service enforces the
-- order; the checks below keep each state's columns consistent)
CREATE TABLE session_recordings (
    id                uuid              PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid              NOT NULL,
    session_id        uuid              NOT NULL,
    breakout_room_id  uuid,
    status            processing_status NOT NULL DEFAULT 'pending',
    format            text              NOT NULL DEFAULT 'webm',
    content_type      text,
    s3_bucket         text,
    s3_key            varchar(500),
    size_bytes        bigint,
    duration_seconds  integer,
    attempts          integer           NOT NULL DEFAULT 0,
    error             text,
    started_by        text,
    started_at        timestamptz       NOT NULL DEFAULT now(),
    stopped_at        timestamptz,
    available_at      timestamptz,
    created_at        timestamptz       NOT NULL DEFAULT now(),
    updated_at        timestamptz       NOT NULL DEFAULT now(),
    CONSTRAINT session_recordings_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_recordings_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_recordings_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT session_recordings_format_check CHECK (format IN ('webm', 'mp4')),
    CONSTRAINT session_recordings_size_check CHECK (size_bytes IS NULL OR size_bytes > 0),
    CONSTRAINT session_recordings_duration_check CHECK (duration_seconds IS NULL OR duration_seconds >= 0),
    CONSTRAINT session_recordings_attempts_check CHECK (attempts >= 0),
    CONSTRAINT session_recordings_available_check CHECK (
        status <> 'available' OR (s3_key IS NOT NULL AND available_at IS NOT NULL)),
    CONSTRAINT session_recordings_stopped_check CHECK (stopped_at IS NULL OR stopped_at >= started_at)
);
-- at most one recording in progress per session / breakout room
CREATE UNIQUE INDEX session_recordings_one_active_key
    ON session_recordings (session_id, breakout_room_id) NULLS NOT DISTINCT
    WHERE stopped_at IS NULL;
CREATE INDEX session_recordings_tenant_session_idx ON session_recordings (tenant_id, session_id, created_at);
CREATE INDEX session_recordings_status_idx ON session_recordings (status, created_at);
CREATE INDEX session_recordings_available_idx ON session_recordings (available_at);

-- Durable work queue: workers claim with SELECT ... FOR UPDATE SKIP LOCKED on
-- (state = 'queued' AND run_after <= now()); retries back off through run_after; a job that
-- used up max_attempts moves to 'dead' (the dead-letter state an operator can retry).
CREATE TABLE recording_jobs (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid        NOT NULL,
    recording_id   uuid        NOT NULL,
    kind           text        NOT NULL,
    state          job_state   NOT NULL DEFAULT 'queued',
    attempts       integer     NOT NULL DEFAULT 0,
    max_attempts   integer     NOT NULL DEFAULT 5,
    run_after      timestamptz NOT NULL DEFAULT now(),
    locked_at      timestamptz,
    locked_by      text,
    last_error     text,
    payload        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    CONSTRAINT recording_jobs_recording_fkey FOREIGN KEY (tenant_id, recording_id)
        REFERENCES session_recordings (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT recording_jobs_kind_check CHECK (kind ~ '^[a-z][a-z0-9_]{0,31}$'),
    CONSTRAINT recording_jobs_attempts_check CHECK (attempts >= 0 AND max_attempts >= 1),
    CONSTRAINT recording_jobs_payload_check CHECK (jsonb_typeof(payload) = 'object')
);
CREATE INDEX recording_jobs_ready_idx ON recording_jobs (run_after) WHERE state = 'queued';
CREATE INDEX recording_jobs_tenant_state_idx ON recording_jobs (tenant_id, state, created_at);
CREATE INDEX recording_jobs_recording_idx ON recording_jobs (recording_id);

CREATE TABLE artifacts (
    id            uuid              PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid              NOT NULL,
    session_id    uuid              NOT NULL,
    recording_id  uuid,
    type          artifact_type     NOT NULL,
    status        processing_status NOT NULL DEFAULT 'pending',
    s3_key        varchar(500),
    content_type  text,
    size_bytes    bigint,
    -- small artifacts (chapters, highlights) inline; large ones in object storage
    data          jsonb,
    error         text,
    created_at    timestamptz       NOT NULL DEFAULT now(),
    updated_at    timestamptz       NOT NULL DEFAULT now(),
    CONSTRAINT artifacts_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT artifacts_recording_fkey FOREIGN KEY (tenant_id, recording_id)
        REFERENCES session_recordings (tenant_id, id) ON DELETE CASCADE,
    -- idempotent upserts by the pipeline (seed 001)
    CONSTRAINT artifacts_session_recording_type_key
        UNIQUE NULLS NOT DISTINCT (session_id, recording_id, type),
    CONSTRAINT artifacts_size_check CHECK (size_bytes IS NULL OR size_bytes >= 0)
);
CREATE INDEX artifacts_tenant_session_idx ON artifacts (tenant_id, session_id);
