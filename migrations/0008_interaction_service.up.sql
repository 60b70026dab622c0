-- What InteractionService needs beyond 0004: the scope (breakout room) of hand raises and
-- questions, the event seq of chat messages, poll options, whiteboard size bookkeeping,
-- timer mode and millisecond precision, slide decks on scenes and the live studio state.

ALTER TABLE chat_messages
    -- seq of the chat_message_posted event that posted it: history is ordered by it, so it
    -- agrees with the live feed (commit order), which sent_at (transaction start) may not
    ADD COLUMN seq bigint,
    ADD CONSTRAINT chat_messages_seq_check CHECK (seq IS NULL OR seq >= 1);
-- history of one scope, newest first by seq
CREATE INDEX chat_messages_scope_seq_idx
    ON chat_messages (tenant_id, session_id, breakout_room_id, seq);
-- the retention job deletes the oldest messages of every tenant
CREATE INDEX chat_messages_sent_at_idx ON chat_messages (sent_at);

ALTER TABLE hand_raises
    -- NULL = main room
    ADD COLUMN breakout_room_id uuid,
    ADD CONSTRAINT hand_raises_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE;

ALTER TABLE questions
    -- NULL = main room
    ADD COLUMN breakout_room_id uuid,
    -- answered aloud (answer_text may still be empty)
    ADD COLUMN answered_live boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT questions_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE;

ALTER TABLE session_polls
    -- multiple choice: most options one respondent may pick (0 = all)
    ADD COLUMN max_selections integer NOT NULL DEFAULT 0,
    -- students see results while the poll is open
    ADD COLUMN show_results_live boolean NOT NULL DEFAULT false,
    -- auto-close time (NULL = closed only by ClosePoll)
    ADD COLUMN closes_at timestamptz,
    -- HMAC key of the respondent keys in poll_results_changed events; never leaves the server
    ADD COLUMN respondent_salt bytea NOT NULL
        DEFAULT decode(replace(gen_random_uuid()::text, '-', ''), 'hex'),
    ADD CONSTRAINT session_polls_max_selections_check CHECK (max_selections BETWEEN 0 AND 10),
    ADD CONSTRAINT session_polls_closes_at_check CHECK (closes_at IS NULL OR closes_at > created_at);
-- the sweeper closes open polls whose time is up
CREATE INDEX session_polls_closes_at_idx ON session_polls (closes_at) WHERE status = 'open';

ALTER TABLE whiteboards
    -- serialised size of all elements (sum of their JSON text), kept by every update
    ADD COLUMN size_bytes bigint NOT NULL DEFAULT 0,
    -- who changed it last (common.v1.Actor as protobuf JSON)
    ADD COLUMN updated_actor jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD CONSTRAINT whiteboards_size_bytes_check CHECK (size_bytes >= 0),
    ADD CONSTRAINT whiteboards_updated_actor_check CHECK (jsonb_typeof(updated_actor) = 'object');

ALTER TABLE study_timers
    ADD COLUMN mode text NOT NULL DEFAULT 'focus',
    -- run time before the current running stretch, to the millisecond (pauses fold it in)
    ADD COLUMN elapsed_ms bigint NOT NULL DEFAULT 0,
    -- when a running timer reaches zero; NULL unless running
    ADD COLUMN ends_at timestamptz,
    ADD COLUMN completed_focus_count integer NOT NULL DEFAULT 0,
    ADD COLUMN updated_actor jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD CONSTRAINT study_timers_mode_check CHECK (mode IN ('focus', 'break')),
    ADD CONSTRAINT study_timers_elapsed_ms_check CHECK (elapsed_ms >= 0),
    ADD CONSTRAINT study_timers_ends_at_check CHECK ((status = 'running') = (ends_at IS NOT NULL)),
    ADD CONSTRAINT study_timers_completed_focus_check CHECK (completed_focus_count >= 0),
    ADD CONSTRAINT study_timers_updated_actor_check CHECK (jsonb_typeof(updated_actor) = 'object');
-- the sweeper completes running timers that reached zero
CREATE INDEX study_timers_ends_at_idx ON study_timers (ends_at) WHERE status = 'running';

ALTER TABLE studio_scenes
    ADD COLUMN slide_deck_id text,
    ADD COLUMN slide_deck_url text,
    ADD CONSTRAINT studio_scenes_deck_id_check
        CHECK (slide_deck_id IS NULL OR char_length(slide_deck_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT studio_scenes_deck_url_check
        CHECK (slide_deck_url IS NULL OR char_length(slide_deck_url) BETWEEN 1 AND 2048);

-- Live state of a session's teaching studio (seed 001/002): the active scene, the effective
-- layout and the slide shown, with the seq of the event that produced it.
CREATE TABLE studio_state (
    session_id       uuid         PRIMARY KEY,
    tenant_id        uuid         NOT NULL,
    active_scene_id  uuid,
    layout           text         NOT NULL DEFAULT 'speaker',
    deck_id          text,
    slide_index      integer      NOT NULL DEFAULT 0,
    slide_count      integer      NOT NULL DEFAULT 0,
    slide_url        text,
    seq              bigint       NOT NULL DEFAULT 0,
    updated_actor    jsonb        NOT NULL DEFAULT '{}'::jsonb,
    updated_at       timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT studio_state_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT studio_state_scene_fkey FOREIGN KEY (tenant_id, active_scene_id)
        REFERENCES studio_scenes (tenant_id, id),
    CONSTRAINT studio_state_layout_check CHECK (char_length(layout) BETWEEN 1 AND 64),
    CONSTRAINT studio_state_deck_id_check CHECK (deck_id IS NULL OR char_length(deck_id) BETWEEN 1 AND 128),
    CONSTRAINT studio_state_slide_check CHECK (
        slide_count BETWEEN 0 AND 10000 AND slide_index BETWEEN 0 AND 9999
        AND (slide_count = 0 OR slide_index < slide_count)),
    CONSTRAINT studio_state_slide_url_check CHECK (slide_url IS NULL OR char_length(slide_url) <= 2048),
    CONSTRAINT studio_state_seq_check CHECK (seq >= 0),
    CONSTRAINT studio_state_updated_actor_check CHECK (jsonb_typeof(updated_actor) = 'object')
);
CREATE INDEX studio_state_tenant_idx ON studio_state (tenant_id);
