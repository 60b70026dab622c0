-- Webhook delivery (seed 002): the fields the Webhook resource reports and the durable
-- per-session cursor the dispatcher tails session_events with; Tenant.update_time.

ALTER TABLE tenants ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE webhooks
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN last_success_at      timestamptz,
    ADD CONSTRAINT webhooks_consecutive_failures_check CHECK (consecutive_failures >= 0);

-- How far the dispatcher has turned a session's events into webhook_deliveries. A session's
-- seq is gap-free and follows commit order (the row lock of append_event), so "every event
-- up to sessions.last_seq" is committed once that last_seq is visible: the cursor only ever
-- moves over committed events and nothing is skipped. Rows are locked FOR UPDATE SKIP
-- LOCKED, so several dispatchers share the sessions; the unique (webhook_id, event_key) of
-- webhook_deliveries makes a repeat a no-op.
CREATE TABLE webhook_cursors (
    session_id  uuid        PRIMARY KEY,
    tenant_id   uuid        NOT NULL,
    seq         bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_cursors_session_fkey FOREIGN KEY (tenant_id, session_id)
        REFERENCES sessions (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT webhook_cursors_seq_check CHECK (seq >= 0)
);
CREATE INDEX webhook_cursors_tenant_idx ON webhook_cursors (tenant_id);

-- Deliveries a crashed dispatcher left 'running' are claimed again after a lease.
CREATE INDEX webhook_deliveries_running_idx ON webhook_deliveries (locked_at) WHERE state = 'running';
