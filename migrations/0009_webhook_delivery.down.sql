DROP INDEX IF EXISTS webhook_deliveries_running_idx;
DROP TABLE IF EXISTS webhook_cursors;
ALTER TABLE webhooks
    DROP CONSTRAINT IF EXISTS webhooks_consecutive_failures_check,
    DROP COLUMN IF EXISTS last_success_at,
    DROP COLUMN IF EXISTS consecutive_failures;
ALTER TABLE tenants DROP COLUMN IF EXISTS updated_at;
