-- Audit log (seed 000 STR-038, FERPA: kept 3 years) and outgoing webhooks (seed 002).

-- No foreign key to sessions: the audit trail must outlive a hard-deleted session.
-- action is free text in a fixed shape instead of an enum, so a new audited action needs
-- no migration; known values: participant_removed, participant_muted, session_ended,
-- recording_started, recording_stopped, question_moderated, chat_message_deleted, ...
CREATE TABLE audit_logs (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    session_id   uuid,
    actor_id     text        NOT NULL,
    actor_role   text,
    action       text        NOT NULL,
    target_type  text,
    target_id    text,
    reason       text,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    request_id   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_logs_action_check CHECK (action ~ '^[a-z][a-z0-9_.]{0,63}$'),
    CONSTRAINT audit_logs_actor_id_check CHECK (char_length(actor_id) BETWEEN 1 AND 255),
    CONSTRAINT audit_logs_reason_check CHECK (reason IS NULL OR char_length(reason) <= 1000),
    CONSTRAINT audit_logs_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX audit_logs_tenant_created_idx ON audit_logs (tenant_id, created_at);
CREATE INDEX audit_logs_tenant_session_idx ON audit_logs (tenant_id, session_id, created_at);
CREATE INDEX audit_logs_tenant_actor_idx ON audit_logs (tenant_id, actor_id, created_at);

CREATE TABLE webhooks (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url          text        NOT NULL,
    -- signs each delivery (HMAC/JWT over the body's sha256), so it must stay readable
    secret       text        NOT NULL,
    -- event types delivered; empty = all
    event_types  text[]      NOT NULL DEFAULT '{}',
    active       boolean     NOT NULL DEFAULT true,
    description  text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhooks_tenant_id_id_key UNIQUE (tenant_id, id),
    CONSTRAINT webhooks_url_check CHECK (url ~ '^https?://' AND char_length(url) <= 2048),
    CONSTRAINT webhooks_secret_check CHECK (char_length(secret) >= 16),
    CONSTRAINT webhooks_description_check CHECK (char_length(description) <= 500)
);
CREATE INDEX webhooks_tenant_idx ON webhooks (tenant_id, active);

-- Deliveries use the same durable-queue shape as recording_jobs.
CREATE TABLE webhook_deliveries (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id        uuid        NOT NULL,
    webhook_id       uuid        NOT NULL,
    -- dedupe key of the source event (e.g. "<session_id>:<seq>"): one delivery per event
    event_key        text        NOT NULL,
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    state            job_state   NOT NULL DEFAULT 'queued',
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 8,
    run_after        timestamptz NOT NULL DEFAULT now(),
    locked_at        timestamptz,
    last_error       text,
    response_status  integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT webhook_deliveries_webhook_fkey FOREIGN KEY (tenant_id, webhook_id)
        REFERENCES webhooks (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_webhook_event_key UNIQUE (webhook_id, event_key),
    CONSTRAINT webhook_deliveries_attempts_check CHECK (attempts >= 0 AND max_attempts >= 1)
);
CREATE INDEX webhook_deliveries_ready_idx ON webhook_deliveries (run_after) WHERE state = 'queued';
CREATE INDEX webhook_deliveries_tenant_webhook_idx ON webhook_deliveries (tenant_id, webhook_id, created_at);
