-- Sessions (classes and study rooms), participants, the event log, guest tokens, attendance
-- logs and analytics snapshots (seeds 000 STR-001/002, 001, 003, 004).
-- Children reference parents through (tenant_id, id) so a row can never point into another
-- tenant's data (seed 002: "foreign keys must include tenant_id").

CREATE TYPE session_kind AS ENUM ('class', 'study_room');
CREATE TYPE session_status AS ENUM ('scheduled', 'live', 'ended', 'cancelled');
CREATE TYPE participant_role AS ENUM ('instructor', 'assistant', 'student', 'guest');
CREATE TYPE participant_status AS ENUM ('lobby', 'admitted', 'removed', 'left', 'disconnected');
CREATE TYPE leave_reason AS ENUM (
    'left', 'disconnected', 'removed', 'session_ended', 'room_closed', 'moved'
);

CREATE TABLE sessions (
    id                 uuid           PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id          uuid           NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind               session_kind   NOT NULL DEFAULT 'class',
    title              varchar(255)   NOT NULL,
    description        text           NOT NULL DEFAULT '',
    -- partner user id of the owning instructor (see users)
    instructor_id      text           NOT NULL,
    scheduled_start    timestamptz    NOT NULL,
    scheduled_end      timestamptz    NOT NULL,
    status             session_status NOT NULL DEFAULT 'scheduled',
    capacity           integer        NOT NULL DEFAULT 500,
    -- admitted participants right now; kept by the service under the session row lock
    current_occupancy  integer        NOT NULL DEFAULT 0,
    join_link_token    text           NOT NULL,
    recording_enabled  boolean        NOT NULL DEFAULT true,
    lms_course_ref     text,
    lms_lesson_ref     text,
    settings           jsonb          NOT NULL DEFAULT '{}'::jsonb,
    actual_start       timestamptz,
    actual_end         timestamptz,
    -- newest seq of session_events; bumped by core/events.append_event (gap-free counter)
    last_seq           bigint         NOT NULL DEFAULT 0,
    created_at         timestamptz    NOT NULL DEFAULT now(),
    updated_at         timestamptz    NOT NULL DEFAULT now(),
    deleted_at         timestamptz,
    CONSTRAINT sessions_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT sessions_join_link_token_key UNIQUE (join_link_token),
    CONSTRAINT sessions_title_check CHECK (char_length(btrim(title)) BETWEEN 1 AND 255),
    CONSTRAINT sessions_description_check CHECK (char_length(description) <= 5000),
    CONSTRAINT sessions_instructor_id_check CHECK (char_length(instructor_id) BETWEEN 1 AND 255),
    CONSTRAINT sessions_schedule_check CHECK (scheduled_end > scheduled_start),
    CONSTRAINT sessions_capacity_check CHECK (capacity BETWEEN 1 AND 1000),
    CONSTRAINT sessions_occupancy_check CHECK (current_occupancy BETWEEN 0 AND capacity),
    CONSTRAINT sessions_join_link_token_check CHECK (join_link_token ~ '^[A-Za-z0-9_-]{64}$'),
    CONSTRAINT sessions_lms_course_ref_check CHECK (lms_course_ref IS NULL OR char_length(lms_course_ref) BETWEEN 1 AND 255),
    CONSTRAINT sessions_lms_lesson_ref_check CHECK (lms_lesson_ref IS NULL OR char_length(lms_lesson_ref) BETWEEN 1 AND 255),
    CONSTRAINT sessions_settings_check CHECK (jsonb_typeof(settings) = 'object'),
    CONSTRAINT sessions_actual_times_check CHECK (actual_end IS NULL OR actual_start IS NULL OR actual_end >= actual_start),
    CONSTRAINT sessions_last_seq_check CHECK (last_seq >= 0)
);
CREATE INDEX sessions_tenant_status_idx ON sessions (tenant_id, status);
CREATE INDEX sessions_tenant_instructor_idx ON sessions (tenant_id, instructor_id, status);
CREATE INDEX sessions_tenant_scheduled_start_idx ON sessions (tenant_id, scheduled_start, id);
CREATE INDEX sessions_tenant_kind_idx ON sessions (tenant_id, kind) WHERE deleted_at IS NULL;
CREATE INDEX sessions_scheduled_start_idx ON sessions (scheduled_start);

CREATE TABLE session_participants (
    id                       uuid               PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id                uuid               NOT NULL,
    session_id               uuid               NOT NULL,
    user_id                  text               NOT NULL,
    display_name             varchar(100)       NOT NULL,
    role                     participant_role   NOT NULL,
    status                   participant_status NOT NULL DEFAULT 'lobby',
    is_guest                 boolean            NOT NULL DEFAULT false,
    audio_muted              boolean            NOT NULL DEFAULT false,
    video_muted              boolean            NOT NULL DEFAULT false,
    chat_muted               boolean            NOT NULL DEFAULT false,
    permissions              jsonb              NOT NULL DEFAULT '{}'::jsonb,
    joined_at                timestamptz        NOT NULL DEFAULT now(),
    admitted_at              timestamptz,
    left_at                  timestamptz,
    last_seen_at             timestamptz,
    -- start of the current connected stretch; folded into total_connected_seconds on leave
    connected_since          timestamptz,
    total_connected_seconds  bigint             NOT NULL DEFAULT 0,
    removed_by               text,
    removed_reason           text,
    created_at               timestamptz        NOT NULL DEFAULT now(),
    updated_at               timestamptz        NOT NULL DEFAULT now(),
    CONSTRAINT session_participants_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_participants_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT session_participants_session_user_key UNIQUE (session_id, user_id),
    CONSTRAINT session_participants_user_id_check CHECK (char_length(user_id) BETWEEN 1 AND 255),
    CONSTRAINT session_participants_display_name_check CHECK (char_length(btrim(display_name)) BETWEEN 1 AND 100),
    CONSTRAINT session_participants_permissions_check CHECK (jsonb_typeof(permissions) = 'object'),
    CONSTRAINT session_participants_connected_seconds_check CHECK (total_connected_seconds >= 0),
    CONSTRAINT session_participants_removed_reason_check CHECK (removed_reason IS NULL OR char_length(removed_reason) <= 500)
);
CREATE INDEX session_participants_tenant_session_status_idx
    ON session_participants (tenant_id, session_id, status);
CREATE INDEX session_participants_tenant_user_idx ON session_participants (tenant_id, user_id);
CREATE INDEX session_participants_session_admitted_idx ON session_participants (session_id, admitted_at);

-- The event log (ARCHITECTURE "Data"). seq is handed out by sessions.last_seq under the
-- session row lock, so it is gap-free; the primary key makes (session_id, seq) unique.
CREATE TABLE session_events (
    tenant_id         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    seq               bigint      NOT NULL,
    type              text        NOT NULL,
    payload           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    actor             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    request_id        text,
    -- no foreign key: the log is append-only history and must outlive any room row
    breakout_room_id  uuid,
    -- clock_timestamp(): appends are serialised by the row lock, so times follow seq
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT session_events_pkey PRIMARY KEY (session_id, seq),
    CONSTRAINT session_events_session_request_id_key UNIQUE (session_id, request_id),
    CONSTRAINT session_events_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_events_seq_check CHECK (seq >= 1),
    CONSTRAINT session_events_type_check CHECK (type ~ '^[a-z][a-z0-9_.]{0,99}$'),
    CONSTRAINT session_events_payload_check CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT session_events_actor_check CHECK (jsonb_typeof(actor) = 'object'),
    CONSTRAINT session_events_request_id_check CHECK (request_id IS NULL OR char_length(request_id) BETWEEN 1 AND 128)
);
CREATE INDEX session_events_tenant_created_idx ON session_events (tenant_id, created_at);

-- Join-without-account tokens (seed 004): only a hash is kept so a leaked table leaks no token.
CREATE TABLE guest_tokens (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid        NOT NULL,
    session_id    uuid        NOT NULL,
    token_hash    bytea       NOT NULL,
    display_name  varchar(100) NOT NULL,
    created_by    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT guest_tokens_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT guest_tokens_token_hash_key UNIQUE (token_hash),
    CONSTRAINT guest_tokens_token_hash_check CHECK (octet_length(token_hash) = 32),
    CONSTRAINT guest_tokens_display_name_check CHECK (char_length(btrim(display_name)) BETWEEN 1 AND 100),
    CONSTRAINT guest_tokens_expiry_check CHECK (expires_at > created_at)
);
CREATE INDEX guest_tokens_tenant_session_idx ON guest_tokens (tenant_id, session_id);

-- Attendance history (seed 003 SessionLog): one row per finished stay, including disconnects.
CREATE TABLE session_logs (
    id                uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid         NOT NULL,
    session_id        uuid         NOT NULL,
    participant_id    uuid,
    breakout_room_id  uuid,
    user_id           text         NOT NULL,
    joined_at         timestamptz  NOT NULL,
    left_at           timestamptz  NOT NULL,
    duration_seconds  integer      NOT NULL,
    reason            leave_reason NOT NULL DEFAULT 'left',
    created_at        timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT session_logs_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_logs_duration_check CHECK (duration_seconds >= 0),
    CONSTRAINT session_logs_times_check CHECK (left_at >= joined_at),
    CONSTRAINT session_logs_user_id_check CHECK (char_length(user_id) BETWEEN 1 AND 255)
);
CREATE INDEX session_logs_tenant_session_idx ON session_logs (tenant_id, session_id, created_at);
CREATE INDEX session_logs_tenant_user_idx ON session_logs (tenant_id, user_id, created_at);
CREATE INDEX session_logs_tenant_created_idx ON session_logs (tenant_id, created_at);

-- Analytics snapshot per session (seed 004), recomputed from the tables and the event log.
CREATE TABLE session_analytics (
    session_id                uuid        PRIMARY KEY,
    tenant_id                 uuid        NOT NULL,
    peak_participants         integer     NOT NULL DEFAULT 0,
    unique_participants       integer     NOT NULL DEFAULT 0,
    total_chat_messages       integer     NOT NULL DEFAULT 0,
    total_questions           integer     NOT NULL DEFAULT 0,
    total_question_votes      integer     NOT NULL DEFAULT 0,
    total_poll_responses      integer     NOT NULL DEFAULT 0,
    total_hand_raises         integer     NOT NULL DEFAULT 0,
    avg_attendance_seconds    integer     NOT NULL DEFAULT 0,
    metrics                   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    computed_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT session_analytics_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_analytics_counts_check CHECK (
        peak_participants >= 0 AND unique_participants >= 0 AND total_chat_messages >= 0
        AND total_questions >= 0 AND total_question_votes >= 0 AND total_poll_responses >= 0
        AND total_hand_raises >= 0 AND avg_attendance_seconds >= 0),
    CONSTRAINT session_analytics_metrics_check CHECK (jsonb_typeof(metrics) = 'object')
);
CREATE INDEX session_analytics_tenant_idx ON session_analytics (tenant_id, computed_at);
