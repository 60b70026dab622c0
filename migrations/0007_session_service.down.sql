-- Timer rows have no leave reason; they cannot survive the NOT NULL that comes back.
DELETE FROM session_logs WHERE kind <> 'visit';
ALTER TABLE session_logs
    DROP CONSTRAINT session_logs_study_session_id_check,
    DROP CONSTRAINT session_logs_detail_check,
    DROP CONSTRAINT session_logs_display_name_check,
    DROP CONSTRAINT session_logs_visit_reason_check,
    DROP CONSTRAINT session_logs_kind_check,
    ALTER COLUMN reason SET NOT NULL,
    DROP COLUMN study_session_id,
    DROP COLUMN detail,
    DROP COLUMN display_name,
    DROP COLUMN kind;

DROP INDEX session_participants_grace_idx;
DROP INDEX session_participants_presence_idx;

ALTER TABLE session_participants
    DROP CONSTRAINT session_participants_email_check,
    DROP CONSTRAINT session_participants_study_session_id_check,
    DROP CONSTRAINT session_participants_connected_ms_check,
    DROP CONSTRAINT session_participants_lobby_wait_check,
    DROP CONSTRAINT session_participants_join_count_check,
    DROP COLUMN email,
    DROP COLUMN study_session_id,
    DROP COLUMN total_connected_ms,
    DROP COLUMN lobby_wait_ms,
    DROP COLUMN disconnected_at,
    DROP COLUMN visit_started_at,
    DROP COLUMN screen_muted,
    DROP COLUMN join_count,
    DROP COLUMN connection_id;

ALTER TABLE sessions
    DROP CONSTRAINT sessions_media_router_id_check,
    DROP COLUMN media_router_id;

-- An enum value cannot be dropped: rebuild the type without 'admin' (admins become assistants,
-- the closest role that keeps their moderation rights).
UPDATE session_participants SET role = 'assistant' WHERE role = 'admin';
ALTER TABLE session_participants ALTER COLUMN role TYPE text;
DROP TYPE participant_role;
CREATE TYPE participant_role AS ENUM ('instructor', 'assistant', 'student', 'guest');
ALTER TABLE session_participants
    ALTER COLUMN role TYPE participant_role USING role::participant_role;
