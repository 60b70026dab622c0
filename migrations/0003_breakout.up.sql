-- Breakout rooms and who is in which (seed 000 STR-012/013).

CREATE TYPE breakout_room_status AS ENUM ('open', 'closed');

CREATE TABLE breakout_rooms (
    id                  uuid                 PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id           uuid                 NOT NULL,
    session_id          uuid                 NOT NULL,
    name                varchar(100)         NOT NULL,
    capacity            integer              NOT NULL DEFAULT 10,
    time_limit_minutes  integer,
    status              breakout_room_status NOT NULL DEFAULT 'open',
    created_by          text,
    opened_at           timestamptz          NOT NULL DEFAULT now(),
    -- when the timer runs out (opened_at + time limit, moved by "extend"); null = no limit
    closes_at           timestamptz,
    closed_at           timestamptz,
    created_at          timestamptz          NOT NULL DEFAULT now(),
    updated_at          timestamptz          NOT NULL DEFAULT now(),
    CONSTRAINT breakout_rooms_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT breakout_rooms_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT breakout_rooms_name_check CHECK (char_length(btrim(name)) BETWEEN 1 AND 100),
    CONSTRAINT breakout_rooms_capacity_check CHECK (capacity BETWEEN 2 AND 50),
    CONSTRAINT breakout_rooms_time_limit_check CHECK (time_limit_minutes IS NULL OR time_limit_minutes BETWEEN 1 AND 120),
    CONSTRAINT breakout_rooms_closes_at_check CHECK (closes_at IS NULL OR closes_at > opened_at),
    CONSTRAINT breakout_rooms_closed_check CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);
CREATE INDEX breakout_rooms_tenant_session_idx ON breakout_rooms (tenant_id, session_id, status);
CREATE INDEX breakout_rooms_created_idx ON breakout_rooms (created_at);
-- room names are unique among a session's open rooms (closed ones may be reused)
CREATE UNIQUE INDEX breakout_rooms_open_name_key ON breakout_rooms (session_id, name)
    WHERE status = 'open';
-- timer sweeper: open rooms whose time is up
CREATE INDEX breakout_rooms_closes_at_idx ON breakout_rooms (closes_at) WHERE status = 'open';

CREATE TABLE room_assignments (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    breakout_room_id  uuid        NOT NULL,
    participant_id    uuid        NOT NULL,
    assigned_by       text,
    assigned_at       timestamptz NOT NULL DEFAULT now(),
    joined_at         timestamptz,
    -- set when the participant leaves the room (moved, room closed, left the session)
    left_at           timestamptz,
    CONSTRAINT room_assignments_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT room_assignments_room_fkey FOREIGN KEY (tenant_id, breakout_room_id)
        REFERENCES breakout_rooms (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT room_assignments_participant_fkey FOREIGN KEY (tenant_id, participant_id)
        REFERENCES session_participants (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT room_assignments_room_participant_key UNIQUE (breakout_room_id, participant_id),
    CONSTRAINT room_assignments_times_check CHECK (left_at IS NULL OR left_at >= assigned_at)
);
-- a participant is in at most one breakout room at a time
CREATE UNIQUE INDEX room_assignments_one_active_key ON room_assignments (participant_id)
    WHERE left_at IS NULL;
CREATE INDEX room_assignments_tenant_session_idx ON room_assignments (tenant_id, session_id);
CREATE INDEX room_assignments_participant_idx ON room_assignments (participant_id, assigned_at);
