"""Webhook delivery: a durable outbox of session events, sent signed over HTTP.

Two steps, both safe with any number of AdminService processes on one database:

* **Fan-out** turns committed `session_events` into `webhook_deliveries` rows. It tails each
  session's log with a durable cursor (`webhook_cursors.seq`) instead of adding work to
  `append_event`: a session's seq is gap-free and in commit order (the session row lock),
  and `sessions.last_seq` is only visible once the events up to it have committed, so
  reading `(cursor, last_seq]` never skips an event that commits later. Cursor rows are
  claimed `FOR UPDATE SKIP LOCKED`, the deliveries are inserted and the cursor moved in one
  transaction, and `UNIQUE (webhook_id, event_key)` makes any repeat a no-op, so each event
  becomes exactly one delivery per matching webhook. A webhook receives the events created
  at or after its own creation whose type is in its filter (empty filter: all).
* **Delivery** claims due rows (`queued` and due, or `running` past a lease: a process that
  died mid-send) with `FOR UPDATE SKIP LOCKED`, POSTs the event as protobuf JSON with a
  Stripe-style signature, and records the outcome: a 2xx is `succeeded`; anything else
  (status, timeout, connection error, redirect) is retried after an exponential backoff
  with jitter, and after `webhook_max_attempts` attempts the row is `dead` (kept, with
  `last_error`, for inspection). Deleting a webhook deletes its deliveries (cascade), and a
  delivery whose webhook is gone or disabled is never claimed.

Headers of a delivery: `classmesh-event-id` (`<session_id>:<seq>`, the same on every retry:
receivers dedupe on it), `classmesh-delivery-id`, `classmesh-event-type`,
`classmesh-attempt`, `classmesh-timestamp` (Unix seconds) and
`classmesh-signature: t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`;
`classmesh_sdk.verify_webhook` checks it.

Unless `webhook_allow_private` is set, a delivery only goes to public addresses
(netguard.py): an IP-literal host is checked before sending, a host name through the
guarded resolver the connection then uses; a refused target fails the attempt with
`last_error` "refused: ..." and sends nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from google.protobuf import json_format

from classmesh.admin.netguard import BlockedAddress, GuardedResolver, literal_host_reason
from classmesh.core.db import transaction
from classmesh.core.eventproto import to_event
from classmesh.core.events import EventRecord, read_events
from classmesh.core.periodic import Periodic
from classmesh.core.runtime import Runtime

__all__ = [
    "SIGNATURE_HEADER",
    "Claimed",
    "WebhookDispatcher",
    "backoff_seconds",
    "sign",
]

log = logging.getLogger("classmesh.admin.webhooks")

SIGNATURE_HEADER = "classmesh-signature"
TIMESTAMP_HEADER = "classmesh-timestamp"
EVENT_ID_HEADER = "classmesh-event-id"
DELIVERY_ID_HEADER = "classmesh-delivery-id"
EVENT_TYPE_HEADER = "classmesh-event-type"
ATTEMPT_HEADER = "classmesh-attempt"
USER_AGENT = "ClassMesh-Webhooks/1"

#: Sessions whose cursor one fan-out pass moves, and events read per session and pass.
CURSOR_BATCH = 20
EVENT_BATCH = 500
#: Deliveries one process claims (and sends concurrently) per pass.
CLAIM_BATCH = 20
#: A `running` delivery older than the send deadline plus this was abandoned by its process.
LEASE_MARGIN_SECONDS = 30.0
#: Characters of an error kept in `last_error`.
MAX_ERROR = 500

_JSON_OPTS: dict[str, Any] = {"preserving_proto_field_name": False}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `classmesh-signature` header value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay after failed attempt number `attempt` (1-based): base * 2^(attempt-1), capped,
    with "equal jitter" (uniformly between half and all of it), so failing receivers are not
    hit by every delivery at the same instant."""
    delay: float = min(cap, base * float(2 ** min(attempt - 1, 30)))
    return float(delay / 2 + rng.uniform(0, delay / 2))


def event_json(record: EventRecord) -> dict[str, Any]:
    """The delivered body: the typed `classmesh.events.v1.Event` as protobuf JSON."""
    return json_format.MessageToDict(to_event(record), **_JSON_OPTS)


@dataclass(frozen=True)
class Claimed:
    """One delivery this process is sending (attempt number `attempts`)."""

    id: str
    webhook_id: str
    event_key: str
    event_type: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    url: str
    secret: str


# ---------------------------------------------------------------------------- fan-out

_ADD_CURSORS = """
INSERT INTO webhook_cursors (session_id, tenant_id, seq)
SELECT s.id, s.tenant_id,
       -- events older than the tenant's oldest webhook are never delivered: start after them
       coalesce((SELECT max(e.seq) FROM session_events e
                 WHERE e.session_id = s.id AND e.created_at < h.first_created), 0)
FROM sessions s
JOIN (SELECT tenant_id, min(created_at) AS first_created FROM webhooks WHERE active
      GROUP BY tenant_id) h ON h.tenant_id = s.tenant_id
WHERE s.last_seq > 0
  AND NOT EXISTS (SELECT 1 FROM webhook_cursors c WHERE c.session_id = s.id)
ON CONFLICT (session_id) DO NOTHING
"""

_BEHIND = """
SELECT c.session_id, c.tenant_id, c.seq, s.last_seq
FROM webhook_cursors c JOIN sessions s ON s.id = c.session_id
WHERE s.last_seq > c.seq
  AND EXISTS (SELECT 1 FROM webhooks w WHERE w.tenant_id = c.tenant_id AND w.active)
ORDER BY c.updated_at
LIMIT $1
FOR UPDATE OF c SKIP LOCKED
"""

_WEBHOOKS_OF_TENANT = """
SELECT id, event_types, created_at FROM webhooks WHERE tenant_id = $1 AND active
"""

_INSERT_DELIVERIES = """
INSERT INTO webhook_deliveries (tenant_id, webhook_id, event_key, event_type, payload,
                                max_attempts)
SELECT $1, w, k, t, p::jsonb, $6
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[]) AS x (w, k, t, p)
ON CONFLICT (webhook_id, event_key) DO NOTHING
"""


async def fan_out(pool: asyncpg.Pool, *, max_attempts: int) -> int:
    """Turn committed events into deliveries; returns the number of events read."""
    read = 0
    async with transaction(pool) as conn:
        await conn.execute(_ADD_CURSORS)
    async with transaction(pool) as conn:
        behind = await conn.fetch(_BEHIND, CURSOR_BATCH)
        hooks_by_tenant: dict[uuid.UUID, list[asyncpg.Record]] = {}
        for cur in behind:
            tenant = cur["tenant_id"]
            if tenant not in hooks_by_tenant:
                hooks_by_tenant[tenant] = list(await conn.fetch(_WEBHOOKS_OF_TENANT, tenant))
            upto = min(int(cur["last_seq"]), int(cur["seq"]) + EVENT_BATCH)
            records = [
                r
                for r in await read_events(
                    conn,
                    tenant_id=str(tenant),
                    session_id=str(cur["session_id"]),
                    after_seq=int(cur["seq"]),
                    limit=upto - int(cur["seq"]),
                )
                if r.seq <= upto
            ]
            read += len(records)
            await _insert_deliveries(
                conn, tenant, hooks_by_tenant[tenant], records, max_attempts=max_attempts
            )
            await conn.execute(
                "UPDATE webhook_cursors SET seq = $2, updated_at = now() WHERE session_id = $1",
                cur["session_id"],
                upto,
            )
    return read


async def _insert_deliveries(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    hooks: Sequence[asyncpg.Record],
    records: Sequence[EventRecord],
    *,
    max_attempts: int,
) -> None:
    ids: list[uuid.UUID] = []
    keys: list[str] = []
    types: list[str] = []
    bodies: list[str] = []
    for record in records:
        body: str | None = None
        for hook in hooks:
            wanted = hook["event_types"]
            if record.created_at < hook["created_at"] or (wanted and record.type not in wanted):
                continue
            if body is None:
                body = json.dumps(event_json(record), separators=(",", ":"))
            ids.append(hook["id"])
            keys.append(f"{record.session_id}:{record.seq}")
            types.append(record.type)
            bodies.append(body)
    if ids:
        await conn.execute(_INSERT_DELIVERIES, tenant, ids, keys, types, bodies, max_attempts)


# ---------------------------------------------------------------------------- delivery

_CLAIM = """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d
    WHERE (d.state = 'queued' AND d.run_after <= now())
       OR (d.state = 'running' AND d.locked_at < now() - $2::interval)
    ORDER BY d.run_after
    LIMIT $1
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
SET state = 'running', locked_at = now(), attempts = d.attempts + 1, updated_at = now()
FROM due, webhooks w
WHERE d.id = due.id AND w.id = d.webhook_id AND w.active
RETURNING d.id, d.webhook_id, d.event_key, d.event_type, d.payload, d.attempts,
          d.max_attempts, w.url, w.secret
"""

_SUCCEEDED = """
WITH d AS (
    UPDATE webhook_deliveries
    SET state = 'succeeded', delivered_at = now(), updated_at = now(), locked_at = NULL,
        response_status = $3, last_error = NULL
    WHERE id = $1 AND state = 'running' AND attempts = $2
    RETURNING webhook_id
)
UPDATE webhooks w SET consecutive_failures = 0, last_success_at = now()
FROM d WHERE w.id = d.webhook_id
"""

_FAILED = """
WITH d AS (
    UPDATE webhook_deliveries
    SET state = CASE WHEN attempts >= max_attempts THEN 'dead'::job_state
                     ELSE 'queued'::job_state END,
        run_after = now() + $4::interval, updated_at = now(), locked_at = NULL,
        response_status = $3, last_error = $5
    WHERE id = $1 AND state = 'running' AND attempts = $2
    RETURNING webhook_id
)
UPDATE webhooks w SET consecutive_failures = w.consecutive_failures + 1
FROM d WHERE w.id = d.webhook_id
"""


class WebhookDispatcher(Periodic):
    """This process's fan-out and delivery loop; started with the AdminService servicer.
    A pass that did work is followed at once by the next (a backlog drains); an idle one
    waits `webhook_poll_interval_seconds`."""

    def __init__(self, runtime: Runtime, *, rng: random.Random | None = None) -> None:
        super().__init__(
            runtime.config.webhook_poll_interval_seconds,
            name="webhook dispatch pass",
            logger=log,
            drain=True,
        )
        self._runtime = runtime
        self._cfg = runtime.config
        self._rng = rng or random.Random()
        self._http: aiohttp.ClientSession | None = None

    async def stop(self) -> None:
        await super().stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def run_once(self) -> int:
        """One pass: fan out new events, send due deliveries. Returns the work done."""
        pool = self._runtime.pool
        read = await fan_out(pool, max_attempts=self._cfg.webhook_max_attempts)
        sent = await self.deliver_due()
        return read + sent

    async def deliver_due(self) -> int:
        lease = timedelta(seconds=self._cfg.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)
        async with transaction(self._runtime.pool) as conn:
            rows = await conn.fetch(_CLAIM, CLAIM_BATCH, lease)
        claimed = [
            Claimed(
                id=str(r["id"]),
                webhook_id=str(r["webhook_id"]),
                event_key=r["event_key"],
                event_type=r["event_type"],
                payload=r["payload"],
                attempts=r["attempts"],
                max_attempts=r["max_attempts"],
                url=r["url"],
                secret=r["secret"],
            )
            for r in rows
        ]
        if claimed:
            await asyncio.gather(*(self._deliver(c) for c in claimed))
        return len(claimed)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = (
                None
                if self._cfg.webhook_allow_private
                else aiohttp.TCPConnector(resolver=GuardedResolver())
            )
            self._http = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._cfg.webhook_timeout_seconds),
                headers={"User-Agent": USER_AGENT},
            )
        return self._http

    async def _deliver(self, item: Claimed) -> None:
        body = json.dumps(item.payload, separators=(",", ":")).encode()
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: item.event_key,
            DELIVERY_ID_HEADER: item.id,
            EVENT_TYPE_HEADER: item.event_type,
            ATTEMPT_HEADER: str(item.attempts),
            TIMESTAMP_HEADER: str(now),
            SIGNATURE_HEADER: sign(item.secret, now, body),
        }
        status: int | None = None
        error = ""
        if not self._cfg.webhook_allow_private:
            reason = literal_host_reason(urlsplit(item.url).hostname or "")
            if reason is not None:
                await self._record(item, None, f"refused: {reason} (not a public address)")
                return
        try:
            async with self._session().post(
                item.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                if not 200 <= status < 300:
                    snippet = (await resp.content.read(200)).decode("utf-8", "replace")
                    error = f"HTTP {status}: {snippet}"
        except asyncio.CancelledError:
            raise
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                error = f"refused: {exc.os_error} (not a public address)"
            else:
                error = f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            error = f"no response within {self._cfg.webhook_timeout_seconds:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        await self._record(item, status, error)

    async def _record(self, item: Claimed, status: int | None, error: str) -> None:
        async with transaction(self._runtime.pool) as conn:
            if not error:
                await conn.execute(_SUCCEEDED, uuid.UUID(item.id), item.attempts, status)
                return
            delay = backoff_seconds(
                item.attempts,
                self._cfg.webhook_backoff_base_seconds,
                self._cfg.webhook_backoff_max_seconds,
                self._rng,
            )
            await conn.execute(
                _FAILED,
                uuid.UUID(item.id),
                item.attempts,
                status,
                timedelta(seconds=delay),
                error[:MAX_ERROR],
            )
        if item.attempts >= item.max_attempts:
            log.warning(
                "webhook delivery %s (%s to %s) dead after %d attempts: %s",
                item.id,
                item.event_key,
                item.url,
                item.attempts,
                error,
            )
