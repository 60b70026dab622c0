-- Tenants, their API keys and users, and the idempotency store every mutating RPC uses.
-- gen_random_uuid() is built into PostgreSQL 13+, so no extension is needed.

CREATE TABLE tenants (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_name_key UNIQUE (name),
    CONSTRAINT tenants_name_check CHECK (char_length(btrim(name)) BETWEEN 1 AND 100)
);

-- Symmetric (HS256) keys: the secret must be readable to verify tokens, so it is stored as is.
CREATE TABLE api_keys (
    id            text        PRIMARY KEY,
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    secret        text        NOT NULL,
    role          text        NOT NULL DEFAULT 'admin',
    description   text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT api_keys_id_check CHECK (char_length(id) BETWEEN 4 AND 128),
    CONSTRAINT api_keys_secret_check CHECK (char_length(secret) >= 32),
    CONSTRAINT api_keys_role_check CHECK (char_length(role) BETWEEN 1 AND 32)
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id, created_at);

-- Users belong to the partner LMS: ClassMesh knows them by the partner's id (the token `sub`).
-- Other tables keep that id as `user_id text` without a foreign key, because a user is first
-- seen in a token (and guests never have an account); this table is the directory of
-- profiles the services upsert on sight.
CREATE TABLE users (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    external_id   text        NOT NULL,
    display_name  text        NOT NULL DEFAULT '',
    email         text,
    role          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_tenant_external_id_key UNIQUE (tenant_id, external_id),
    CONSTRAINT users_external_id_check CHECK (char_length(external_id) BETWEEN 1 AND 255),
    CONSTRAINT users_display_name_check CHECK (char_length(display_name) <= 100),
    CONSTRAINT users_email_check CHECK (email IS NULL OR char_length(email) BETWEEN 3 AND 320)
);

-- One row per (tenant, request_id): the first response of a mutating RPC, replayed to repeats.
CREATE TABLE idempotency_keys (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    request_id   text        NOT NULL,
    method       text        NOT NULL,
    fingerprint  bytea       NOT NULL,
    response     bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (tenant_id, request_id),
    CONSTRAINT idempotency_keys_request_id_check CHECK (char_length(request_id) BETWEEN 1 AND 128),
    CONSTRAINT idempotency_keys_method_check CHECK (char_length(method) BETWEEN 1 AND 255),
    CONSTRAINT idempotency_keys_fingerprint_check CHECK (octet_length(fingerprint) = 32),
    CONSTRAINT idempotency_keys_ttl_check CHECK (expires_at >= created_at + interval '24 hours')
);
CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);
