-- BreakoutService: why a room closed, its media router, its place in the batch that opened it.

ALTER TABLE breakout_rooms
    ADD COLUMN close_reason text,
    ADD COLUMN router_id    text,
    ADD COLUMN position     integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT breakout_rooms_close_reason_check CHECK (
        close_reason IS NULL
        OR close_reason IN ('manual', 'time_limit', 'all_closed', 'session_ended')
    ),
    ADD CONSTRAINT breakout_rooms_router_id_check CHECK (
        router_id IS NULL OR char_length(router_id) BETWEEN 1 AND 64
    );

-- rooms of a session in creation order (ListBreakoutRooms pages on it)
CREATE INDEX breakout_rooms_session_order_idx
    ON breakout_rooms (session_id, created_at, position, id);
