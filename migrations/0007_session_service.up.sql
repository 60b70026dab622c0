-- What SessionService needs beyond 0002: an `admin` participant role, per-visit presence
-- bookkeeping on participants, the main media router of a session, and study-room log rows
-- (visits and timer actions) with the fields the API returns.

-- Admins who join a session appear as admins in the roster (not as a fake instructor, which
-- would change who counts as "the last instructor"). Not used in this transaction, so
-- ADD VALUE may run inside it.
ALTER TYPE participant_role ADD VALUE 'admin';

ALTER TABLE sessions
    -- router of the main room returned by MediaService.CreateRouter on start (empty until then)
    ADD COLUMN media_router_id text,
    ADD CONSTRAINT sessions_media_router_id_check
        CHECK (media_router_id IS NULL OR char_length(media_router_id) BETWEEN 1 AND 128);

ALTER TABLE session_participants
    -- the current connection; every JoinSession replaces it (a second tab takes over)
    ADD COLUMN connection_id uuid,
    -- joins and reconnects, >= 1 once a row exists
    ADD COLUMN join_count integer NOT NULL DEFAULT 1,
    ADD COLUMN screen_muted boolean NOT NULL DEFAULT false,
    -- start of the current visit (join or rejoin after leaving); a visit ends in a session_logs row
    ADD COLUMN visit_started_at timestamptz,
    -- when presence was lost; the reconnect grace window runs from here
    ADD COLUMN disconnected_at timestamptz,
    -- lobby time summed over visits (attendance "lobby wait"), milliseconds
    ADD COLUMN lobby_wait_ms bigint NOT NULL DEFAULT 0,
    -- total_connected_seconds to the millisecond (short visits add up without rounding drift)
    ADD COLUMN total_connected_ms bigint NOT NULL DEFAULT 0,
    ADD COLUMN study_session_id text,
    -- guests only, never shown to other participants (seed 004)
    ADD COLUMN email text,
    ADD CONSTRAINT session_participants_join_count_check CHECK (join_count >= 1),
    ADD CONSTRAINT session_participants_lobby_wait_check CHECK (lobby_wait_ms >= 0),
    ADD CONSTRAINT session_participants_connected_ms_check CHECK (total_connected_ms >= 0),
    ADD CONSTRAINT session_participants_study_session_id_check
        CHECK (study_session_id IS NULL OR char_length(study_session_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT session_participants_email_check
        CHECK (email IS NULL OR char_length(email) BETWEEN 3 AND 254);

-- The presence sweeper: participants whose heartbeat is overdue, and those whose grace expired.
CREATE INDEX session_participants_presence_idx ON session_participants (last_seen_at)
    WHERE status IN ('lobby', 'admitted');
CREATE INDEX session_participants_grace_idx ON session_participants (disconnected_at)
    WHERE status = 'disconnected';

ALTER TABLE session_logs
    -- 'visit' (join to leave) or 'timer' (a study-timer action, written by InteractionService)
    ADD COLUMN kind text NOT NULL DEFAULT 'visit',
    ADD COLUMN display_name text NOT NULL DEFAULT '',
    -- how a visit ended (left, disconnected, removed, session_ended) or the timer action
    ADD COLUMN detail text NOT NULL DEFAULT '',
    ADD COLUMN study_session_id text,
    ALTER COLUMN reason DROP NOT NULL,
    ADD CONSTRAINT session_logs_kind_check CHECK (kind IN ('visit', 'timer')),
    ADD CONSTRAINT session_logs_visit_reason_check CHECK (kind <> 'visit' OR reason IS NOT NULL),
    ADD CONSTRAINT session_logs_display_name_check CHECK (char_length(display_name) <= 100),
    ADD CONSTRAINT session_logs_detail_check CHECK (char_length(detail) <= 32),
    ADD CONSTRAINT session_logs_study_session_id_check
        CHECK (study_session_id IS NULL OR char_length(study_session_id) BETWEEN 1 AND 128);
