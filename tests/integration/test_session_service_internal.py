"""SessionService internals through a real in-process grpc.aio server (real PostgreSQL/Redis).

What the end-to-end suites cannot reach from outside a `classmesh up`:

* Two presence sweepers running at once (two instances) disconnect and let go each
  participant exactly once, and the seat count stays exact.
* Heartbeats write `last_seen_at` at most once per touch interval.
* An open WatchSession keeps its participant present without heartbeats.
* A second join replaces the connection id, keeps the participant row and the seat.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from classmesh.core.auth import AccessToken
from classmesh.core.config import Config
from classmesh.core.interceptors import AuthInterceptor, ErrorInterceptor, TelemetryInterceptor
from classmesh.core.runtime import Runtime, open_runtime
from classmesh.core.server import TOKEN_OPTIONAL_METHODS
from classmesh.session.replay import fold_session_events, seats
from classmesh.session.servicer import SessionServicer
from classmesh.session.v1 import session_pb2, session_service_pb2_grpc
from classmesh_sdk import NO_RETRY, ClassMeshClient

S = session_pb2


@dataclass
class Harness:
    runtime: Runtime
    servicer: SessionServicer
    target: str
    tenant_id: str
    key_id: str
    secret: str

    def token(self, sub: str, role: str = "student", session: str = "*") -> str:
        return (
            AccessToken(self.key_id, self.secret)
            .with_tenant(self.tenant_id)
            .with_identity(sub, f"{role} {sub}")
            .with_grants(session=session, role=role, caps=["publish", "subscribe", "chat"])
            .with_ttl(timedelta(hours=1))
            .to_jwt()
        )

    def client(self, sub: str, role: str = "student") -> ClassMeshClient:
        return ClassMeshClient(self.target, token=self.token(sub, role))


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(dt)
    return out


@pytest.fixture(scope="module")
async def harness(
    database_url: str, redis_url: str, redis_prefix: str, pool: asyncpg.Pool
) -> AsyncIterator[Harness]:
    config = Config(
        listen="127.0.0.1:0",
        redis_prefix=f"{redis_prefix}_sess",
        rate_limit_per_minute=0,
        heartbeat_interval_seconds=0.4,
        heartbeat_timeout_seconds=1.0,
        presence_grace_seconds=1.0,
        # The tests drive the sweeper themselves.
        presence_sweep_interval_seconds=3600,
    )
    runtime = await open_runtime(config, database_url=database_url, redis_url=redis_url)
    # The real media client; no MediaService is registered on this server, so StartSession
    # meets UNIMPLEMENTED and goes on (the e2e suites cover real media and a media outage).
    servicer = SessionServicer(runtime)
    servicer.start_background()
    server = grpc.aio.server(
        interceptors=[
            TelemetryInterceptor(),
            ErrorInterceptor(),
            AuthInterceptor(runtime.keys, token_optional_methods=TOKEN_OPTIONAL_METHODS),
        ]
    )
    session_service_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    runtime.bound_target = f"127.0.0.1:{port}"
    await server.start()
    tenant_id = str(
        await pool.fetchval(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"sess-{secrets.token_hex(5)}"
        )
    )
    key_id, secret = f"ck_{secrets.token_hex(8)}", secrets.token_urlsafe(40)
    await pool.execute(
        "INSERT INTO api_keys (id, tenant_id, secret) VALUES ($1, $2, $3)",
        key_id,
        uuid.UUID(tenant_id),
        secret,
    )
    yield Harness(runtime, servicer, f"127.0.0.1:{port}", tenant_id, key_id, secret)
    await server.stop(0)
    await runtime.close()


async def _live_class(h: Harness, capacity: int = 10) -> str:
    teacher = f"t-{secrets.token_hex(3)}"
    async with h.client(teacher, "instructor") as c:
        start = datetime.now(UTC) + timedelta(minutes=1)
        s = await c.sessions.create_session(
            title="internal",
            scheduled_start=_ts(start),
            scheduled_end=_ts(start + timedelta(hours=1)),
            capacity=capacity,
        )
        await c.sessions.start_session(session_id=s.session.id)
        return s.session.id


async def _fold_matches(h: Harness, sid: str) -> dict[str, str]:
    rows = await h.runtime.pool.fetch(
        "SELECT user_id, status::text AS status FROM session_participants WHERE session_id = $1",
        uuid.UUID(sid),
    )
    session = await h.runtime.pool.fetchrow(
        "SELECT status::text AS status, current_occupancy FROM sessions WHERE id = $1",
        uuid.UUID(sid),
    )
    records = await h.runtime.pool.fetch(
        "SELECT seq FROM session_events WHERE session_id = $1 ORDER BY seq", uuid.UUID(sid)
    )
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    from classmesh.core.events import read_events

    events = await read_events(h.runtime.pool, tenant_id=h.tenant_id, session_id=sid, limit=1000)
    status, roster = fold_session_events(events)
    assert session is not None
    assert status == session["status"]
    assert roster == {r["user_id"]: r["status"] for r in rows}
    assert seats(roster) == session["current_occupancy"]
    return roster


# --------------------------------------------------------------------------- presence


async def test_two_sweepers_let_each_participant_go_exactly_once(harness: Harness) -> None:
    h = harness
    sid = await _live_class(h, capacity=40)
    users = [f"s-{i}-{secrets.token_hex(2)}" for i in range(25)]
    for u in users:
        async with h.client(u) as c:
            await c.sessions.join_session(session_id=sid)
    await h.runtime.pool.execute(
        "UPDATE session_participants SET last_seen_at = now() - interval '5 seconds' "
        "WHERE session_id = $1",
        uuid.UUID(sid),
    )
    service = h.servicer.service
    first = await asyncio.gather(service.sweep(h.runtime.pool), service.sweep(h.runtime.pool))
    disconnected = [r for batch in first for r in batch if r.type == "participant_disconnected"]
    assert len(disconnected) == len(users)
    assert len({r.payload["participant"]["user_id"] for r in disconnected}) == len(users)
    roster = await _fold_matches(h, sid)
    assert set(roster.values()) == {"disconnected"}

    await h.runtime.pool.execute(
        "UPDATE session_participants SET disconnected_at = now() - interval '5 seconds' "
        "WHERE session_id = $1",
        uuid.UUID(sid),
    )
    second = await asyncio.gather(*(service.sweep(h.runtime.pool) for _ in range(3)))
    left = [r for batch in second for r in batch if r.type == "participant_left"]
    assert len(left) == len(users)
    assert all(r.payload["grace_expired"] for r in left)
    roster = await _fold_matches(h, sid)
    assert set(roster.values()) == {"left"}
    logs = await h.runtime.pool.fetch(
        "SELECT reason::text AS reason, duration_seconds FROM session_logs WHERE session_id = $1",
        uuid.UUID(sid),
    )
    assert len(logs) == len(users)
    assert {r["reason"] for r in logs} == {"disconnected"}
    assert all(r["duration_seconds"] >= 0 for r in logs)


async def test_heartbeats_write_at_most_once_per_interval(harness: Harness) -> None:
    h = harness
    sid = await _live_class(h)
    async with h.client("hb-user") as c:
        await c.sessions.join_session(session_id=sid)
        first = await h.runtime.pool.fetchval(
            "SELECT last_seen_at FROM session_participants WHERE session_id = $1",
            uuid.UUID(sid),
        )
        for _ in range(5):
            hb = await c.sessions.heartbeat(session_id=sid)
            assert hb.status == S.PARTICIPANT_STATUS_LOBBY
        again = await h.runtime.pool.fetchval(
            "SELECT last_seen_at FROM session_participants WHERE session_id = $1",
            uuid.UUID(sid),
        )
        assert again == first, "beats inside the touch interval must not write"
        await asyncio.sleep(h.servicer.service.touch_interval + 0.1)
        await c.sessions.heartbeat(session_id=sid)
        later = await h.runtime.pool.fetchval(
            "SELECT last_seen_at FROM session_participants WHERE session_id = $1",
            uuid.UUID(sid),
        )
        assert later > first


async def test_an_open_watch_keeps_the_participant_present(harness: Harness) -> None:
    h = harness
    sid = await _live_class(h)
    async with h.client("watcher") as c, h.client("silent") as quiet:
        await c.sessions.join_session(session_id=sid)
        await quiet.sessions.join_session(session_id=sid)

        async def watch() -> None:
            async for _ in c.sessions.watch_session(session_id=sid, retry=NO_RETRY):
                pass

        task = asyncio.create_task(watch())
        try:
            # Three timeouts long, sweeping as the background sweeper would.
            for _ in range(12):
                await asyncio.sleep(0.25)
                await h.servicer.sweeper.run_once()
            rows = {
                r["user_id"]: r["status"]
                for r in await h.runtime.pool.fetch(
                    "SELECT user_id, status::text AS status FROM session_participants "
                    "WHERE session_id = $1",
                    uuid.UUID(sid),
                )
            }
            assert rows["watcher"] == "lobby"
            assert rows["silent"] in ("disconnected", "left")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    await _fold_matches(h, sid)


async def test_second_join_replaces_the_connection(harness: Harness) -> None:
    h = harness
    sid = await _live_class(h, capacity=3)
    async with h.client("tabs") as one, h.client("tabs") as two:
        a = await one.sessions.join_session(session_id=sid)
        b = await two.sessions.join_session(session_id=sid)
    assert a.participant.id == b.participant.id
    assert a.participant.connection_id and b.participant.connection_id
    assert a.participant.connection_id != b.participant.connection_id
    assert not b.reconnected and b.participant.join_count == 1
    row = await h.runtime.pool.fetchrow(
        "SELECT current_occupancy FROM sessions WHERE id = $1", uuid.UUID(sid)
    )
    assert row is not None and row["current_occupancy"] == 1
    await _fold_matches(h, sid)


async def test_guest_token_rejoins_as_the_same_guest(harness: Harness) -> None:
    h = harness
    teacher = "t-guests"
    async with h.client(teacher, "instructor") as c:
        start = datetime.now(UTC) + timedelta(minutes=1)
        s = await c.sessions.create_session(
            title="guests",
            scheduled_start=_ts(start),
            scheduled_end=_ts(start + timedelta(hours=1)),
            settings=S.SessionSettings(allow_guests=True, lobby_enabled=True),
        )
        await c.sessions.start_session(session_id=s.session.id)
        link = s.session.join_link_token
    async with ClassMeshClient(h.target) as anon:
        first = await anon.sessions.join_session(join_link_token=link, display_name="Gus")
        assert first.status == S.PARTICIPANT_STATUS_LOBBY and first.access_token
    async with ClassMeshClient(h.target, token=first.access_token) as guest:
        await guest.sessions.leave_session(session_id=s.session.id)
        again = await guest.sessions.join_session(session_id=s.session.id)
    assert again.participant.id == first.participant.id
    assert again.participant.guest and again.participant.join_count == 2
    # The key that signs guest tokens is the tenant's dedicated one, created once.
    keys = await h.runtime.pool.fetch(
        "SELECT id FROM api_keys WHERE tenant_id = $1 AND description = $2",
        uuid.UUID(h.tenant_id),
        "classmesh guest tokens",
    )
    assert len(keys) == 1
    await _fold_matches(h, s.session.id)


# --------------------------------------------------------------------------- the SDK example


async def test_lms_example_runs_a_whole_class(harness: Harness) -> None:
    """sdk/python/examples/lms_class.py against this server, as a partner would run it."""
    import os
    import sys
    from pathlib import Path

    h = harness
    script = Path(__file__).resolve().parents[2] / "sdk" / "python" / "examples" / "lms_class.py"
    env = {
        **os.environ,
        "CLASSMESH_TARGET": h.target,
        "CLASSMESH_TENANT_ID": h.tenant_id,
        "CLASSMESH_KEY_ID": h.key_id,
        "CLASSMESH_KEY_SECRET": h.secret,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--students",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode() + text
    assert "admitted 2 from the lobby" in text
    assert "class started" in text and "class ended" in text
    assert text.count(": joined") == 2 and text.count(": admitted") == 2
    assert "attendance (2 participants" in text
    sid = text.split()[1]
    await _fold_matches(h, sid)
