DROP TABLE studio_state;

ALTER TABLE studio_scenes
    DROP CONSTRAINT studio_scenes_deck_url_check,
    DROP CONSTRAINT studio_scenes_deck_id_check,
    DROP COLUMN slide_deck_url,
    DROP COLUMN slide_deck_id;

DROP INDEX study_timers_ends_at_idx;
ALTER TABLE study_timers
    DROP CONSTRAINT study_timers_updated_actor_check,
    DROP CONSTRAINT study_timers_completed_focus_check,
    DROP CONSTRAINT study_timers_ends_at_check,
    DROP CONSTRAINT study_timers_elapsed_ms_check,
    DROP CONSTRAINT study_timers_mode_check,
    DROP COLUMN updated_actor,
    DROP COLUMN completed_focus_count,
    DROP COLUMN ends_at,
    DROP COLUMN elapsed_ms,
    DROP COLUMN mode;

ALTER TABLE whiteboards
    DROP CONSTRAINT whiteboards_updated_actor_check,
    DROP CONSTRAINT whiteboards_size_bytes_check,
    DROP COLUMN updated_actor,
    DROP COLUMN size_bytes;

DROP INDEX session_polls_closes_at_idx;
ALTER TABLE session_polls
    DROP CONSTRAINT session_polls_closes_at_check,
    DROP CONSTRAINT session_polls_max_selections_check,
    DROP COLUMN respondent_salt,
    DROP COLUMN closes_at,
    DROP COLUMN show_results_live,
    DROP COLUMN max_selections;

ALTER TABLE questions
    DROP CONSTRAINT questions_room_fkey,
    DROP COLUMN answered_live,
    DROP COLUMN breakout_room_id;

ALTER TABLE hand_raises
    DROP CONSTRAINT hand_raises_room_fkey,
    DROP COLUMN breakout_room_id;

DROP INDEX chat_messages_sent_at_idx;
DROP INDEX chat_messages_scope_seq_idx;
ALTER TABLE chat_messages
    DROP CONSTRAINT chat_messages_seq_check,
    DROP COLUMN seq;
