-- Chat, hand raise, Q&A, polls, whiteboards, study timers and studio scenes
-- (seeds 000 STR-018/019/028/029, 001, 003, 004).

CREATE TYPE chat_message_type AS ENUM ('text', 'emoji', 'system', 'poll');
CREATE TYPE chat_scope AS ENUM ('main', 'breakout');
CREATE TYPE hand_raise_status AS ENUM ('raised', 'lowered', 'acknowledged');
CREATE TYPE question_status AS ENUM ('pending', 'approved', 'rejected');
CREATE TYPE poll_status AS ENUM ('open', 'closed');
CREATE TYPE timer_status AS ENUM ('idle', 'running', 'paused', 'completed');
CREATE TYPE studio_asset_kind AS ENUM ('slide', 'whiteboard', 'image', 'video', 'document');

CREATE TABLE chat_messages (
    id                 uuid              PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id          uuid              NOT NULL,
    session_id         uuid              NOT NULL,
    scope              chat_scope        NOT NULL DEFAULT 'main',
    breakout_room_id   uuid,
    user_id            text              NOT NULL,
    -- set for a private message; only sender, recipient and moderators see it
    recipient_user_id  text,
    message_type       chat_message_type NOT NULL DEFAULT 'text',
    body               text              NOT NULL,
    sent_at            timestamptz       NOT NULL DEFAULT now(),
    deleted_at         timestamptz,
    deleted_by         text,
    CONSTRAINT chat_messages_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT chat_messages_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT chat_messages_scope_check CHECK ((scope = 'breakout') = (breakout_room_id IS NOT NULL)),
    CONSTRAINT chat_messages_body_check CHECK (char_length(btrim(body)) >= 1 AND char_length(body) <= 1000),
    CONSTRAINT chat_messages_user_id_check CHECK (char_length(user_id) BETWEEN 1 AND 255),
    CONSTRAINT chat_messages_deleted_check CHECK (deleted_by IS NULL OR deleted_at IS NOT NULL)
);
-- history paging: newest first by (sent_at, id) within a session / a room
CREATE INDEX chat_messages_tenant_session_sent_idx ON chat_messages (tenant_id, session_id, sent_at, id);
CREATE INDEX chat_messages_room_sent_idx ON chat_messages (breakout_room_id, sent_at, id)
    WHERE breakout_room_id IS NOT NULL;
CREATE INDEX chat_messages_tenant_user_idx ON chat_messages (tenant_id, user_id);

CREATE TABLE hand_raises (
    id               uuid              PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id        uuid              NOT NULL,
    session_id       uuid              NOT NULL,
    user_id          text              NOT NULL,
    status           hand_raise_status NOT NULL DEFAULT 'raised',
    raised_at        timestamptz       NOT NULL DEFAULT now(),
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    lowered_at       timestamptz,
    lowered_by       text,
    CONSTRAINT hand_raises_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT hand_raises_user_id_check CHECK (char_length(user_id) BETWEEN 1 AND 255)
);
-- one raised hand per user per session
CREATE UNIQUE INDEX hand_raises_one_active_key ON hand_raises (session_id, user_id)
    WHERE status = 'raised';
CREATE INDEX hand_raises_queue_idx ON hand_raises (tenant_id, session_id, status, raised_at);

CREATE TABLE questions (
    id            uuid            PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid            NOT NULL,
    session_id    uuid            NOT NULL,
    user_id       text            NOT NULL,
    is_anonymous  boolean         NOT NULL DEFAULT false,
    body          text            NOT NULL,
    status        question_status NOT NULL DEFAULT 'approved',
    upvotes       integer         NOT NULL DEFAULT 0,
    downvotes     integer         NOT NULL DEFAULT 0,
    score         integer         GENERATED ALWAYS AS (upvotes - downvotes) STORED,
    pinned        boolean         NOT NULL DEFAULT false,
    answered      boolean         NOT NULL DEFAULT false,
    answered_at   timestamptz,
    answered_by   text,
    answer_text   text,
    moderated_by  text,
    moderated_at  timestamptz,
    created_at    timestamptz     NOT NULL DEFAULT now(),
    updated_at    timestamptz     NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    CONSTRAINT questions_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT questions_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT questions_body_check CHECK (char_length(btrim(body)) BETWEEN 1 AND 1000),
    CONSTRAINT questions_votes_check CHECK (upvotes >= 0 AND downvotes >= 0),
    CONSTRAINT questions_answered_check CHECK (answered = (answered_at IS NOT NULL)),
    CONSTRAINT questions_answer_text_check CHECK (answer_text IS NULL OR char_length(answer_text) <= 5000),
    CONSTRAINT questions_user_id_check CHECK (char_length(user_id) BETWEEN 1 AND 255)
);
-- "list by score": pinned first, then score, then oldest
CREATE INDEX questions_tenant_session_score_idx
    ON questions (tenant_id, session_id, status, pinned DESC, score DESC, created_at);
CREATE INDEX questions_tenant_user_idx ON questions (tenant_id, user_id);

CREATE TABLE question_votes (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid        NOT NULL,
    question_id  uuid        NOT NULL,
    user_id      text        NOT NULL,
    value        smallint    NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT question_votes_question_fkey FOREIGN KEY (tenant_id, question_id)
        REFERENCES questions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT question_votes_question_user_key UNIQUE (question_id, user_id),
    CONSTRAINT question_votes_value_check CHECK (value IN (-1, 1))
);
CREATE INDEX question_votes_tenant_user_idx ON question_votes (tenant_id, user_id);

CREATE TABLE session_polls (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    breakout_room_id  uuid,
    question          text        NOT NULL,
    -- JSON array of 2..10 option labels
    options           jsonb       NOT NULL,
    allow_multiple    boolean     NOT NULL DEFAULT false,
    is_anonymous      boolean     NOT NULL DEFAULT false,
    status            poll_status NOT NULL DEFAULT 'open',
    created_by        text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    closed_at         timestamptz,
    CONSTRAINT session_polls_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_polls_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT session_polls_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT session_polls_question_check CHECK (char_length(btrim(question)) BETWEEN 1 AND 500),
    -- CASE, not AND: PostgreSQL does not promise left-to-right evaluation, and
    -- jsonb_array_length raises on a non-array
    CONSTRAINT session_polls_options_check CHECK (
        CASE WHEN jsonb_typeof(options) = 'array'
             THEN jsonb_array_length(options) BETWEEN 2 AND 10
             ELSE false END),
    CONSTRAINT session_polls_closed_check CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);
CREATE INDEX session_polls_tenant_session_idx ON session_polls (tenant_id, session_id, created_at);

CREATE TABLE poll_responses (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid        NOT NULL,
    poll_id           uuid        NOT NULL,
    user_id           text        NOT NULL,
    -- zero-based indexes into session_polls.options (bounds checked by the service)
    selected_options  integer[]   NOT NULL,
    responded_at      timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT poll_responses_poll_fkey FOREIGN KEY (tenant_id, poll_id)
        REFERENCES session_polls (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT poll_responses_poll_user_key UNIQUE (poll_id, user_id),
    CONSTRAINT poll_responses_selected_check CHECK (
        cardinality(selected_options) BETWEEN 1 AND 10
        AND 0 <= ALL (selected_options) AND 9 >= ALL (selected_options))
);
CREATE INDEX poll_responses_tenant_user_idx ON poll_responses (tenant_id, user_id);

CREATE TABLE whiteboards (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    breakout_room_id  uuid,
    canvas            jsonb       NOT NULL DEFAULT '{"strokes": [], "shapes": [], "text": []}'::jsonb,
    -- bumped on every update: optimistic concurrency for delta updates
    version           bigint      NOT NULL DEFAULT 0,
    updated_by        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT whiteboards_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT whiteboards_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    -- one board for the main room and one per breakout room
    CONSTRAINT whiteboards_session_room_key UNIQUE NULLS NOT DISTINCT (session_id, breakout_room_id),
    CONSTRAINT whiteboards_canvas_type_check CHECK (jsonb_typeof(canvas) = 'object'),
    CONSTRAINT whiteboards_canvas_size_check CHECK (pg_column_size(canvas) < 10485760),
    CONSTRAINT whiteboards_version_check CHECK (version >= 0)
);
CREATE INDEX whiteboards_tenant_session_idx ON whiteboards (tenant_id, session_id);

-- Shared study timer (seed 003): start/pause/resume/complete/reset, one per room.
CREATE TABLE study_timers (
    id                uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid         NOT NULL,
    session_id        uuid         NOT NULL,
    breakout_room_id  uuid,
    status            timer_status NOT NULL DEFAULT 'idle',
    duration_seconds  integer,
    -- time already run before the current running stretch (pauses fold it in)
    elapsed_seconds   integer      NOT NULL DEFAULT 0,
    started_at        timestamptz,
    paused_at         timestamptz,
    completed_at      timestamptz,
    updated_by        text,
    version           bigint       NOT NULL DEFAULT 0,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    updated_at        timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT study_timers_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT study_timers_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT study_timers_session_room_key UNIQUE NULLS NOT DISTINCT (session_id, breakout_room_id),
    CONSTRAINT study_timers_duration_check CHECK (duration_seconds IS NULL OR duration_seconds BETWEEN 1 AND 86400),
    CONSTRAINT study_timers_elapsed_check CHECK (elapsed_seconds >= 0),
    CONSTRAINT study_timers_running_check CHECK (status <> 'running' OR started_at IS NOT NULL),
    CONSTRAINT study_timers_paused_check CHECK (status <> 'paused' OR paused_at IS NOT NULL)
);
CREATE INDEX study_timers_tenant_session_idx ON study_timers (tenant_id, session_id);

-- Teaching studio (seed 001): scenes with a layout and a current slide, and their assets.
CREATE TABLE studio_scenes (
    id             uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid         NOT NULL,
    session_id     uuid         NOT NULL,
    name           varchar(100) NOT NULL,
    layout         text         NOT NULL DEFAULT 'default',
    metadata       jsonb        NOT NULL DEFAULT '{}'::jsonb,
    is_active      boolean      NOT NULL DEFAULT false,
    current_slide  integer      NOT NULL DEFAULT 0,
    slide_count    integer      NOT NULL DEFAULT 0,
    created_at     timestamptz  NOT NULL DEFAULT now(),
    updated_at     timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT studio_scenes_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT studio_scenes_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT studio_scenes_name_check CHECK (char_length(btrim(name)) BETWEEN 1 AND 100),
    CONSTRAINT studio_scenes_layout_check CHECK (char_length(layout) BETWEEN 1 AND 64),
    CONSTRAINT studio_scenes_metadata_check CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT studio_scenes_slides_check CHECK (
        slide_count >= 0 AND current_slide >= 0 AND current_slide <= greatest(slide_count - 1, 0))
);
-- one active scene per session
CREATE UNIQUE INDEX studio_scenes_one_active_key ON studio_scenes (session_id) WHERE is_active;
CREATE INDEX studio_scenes_tenant_session_idx ON studio_scenes (tenant_id, session_id);

CREATE TABLE studio_assets (
    id           uuid              PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid              NOT NULL,
    scene_id     uuid              NOT NULL,
    kind         studio_asset_kind NOT NULL,
    content_url  text              NOT NULL,
    position     integer           NOT NULL DEFAULT 0,
    metadata     jsonb             NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz       NOT NULL DEFAULT now(),
    CONSTRAINT studio_assets_scene_fkey FOREIGN KEY (tenant_id, scene_id)
        REFERENCES studio_scenes (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT studio_assets_scene_position_key UNIQUE (scene_id, position),
    CONSTRAINT studio_assets_position_check CHECK (position >= 0),
    CONSTRAINT studio_assets_content_url_check CHECK (char_length(content_url) BETWEEN 1 AND 2048),
    CONSTRAINT studio_assets_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX studio_assets_tenant_scene_idx ON studio_assets (tenant_id, scene_id);
