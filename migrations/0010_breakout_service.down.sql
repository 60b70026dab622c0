DROP INDEX breakout_rooms_session_order_idx;

ALTER TABLE breakout_rooms
    DROP CONSTRAINT breakout_rooms_router_id_check,
    DROP CONSTRAINT breakout_rooms_close_reason_check,
    DROP COLUMN position,
    DROP COLUMN router_id,
    DROP COLUMN close_reason;
