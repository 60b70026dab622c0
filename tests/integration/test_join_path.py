"""The first-join fast path of SessionService.join against real PostgreSQL.

A first join claims its seat, takes the next seq, inserts the participant and appends the
event in ONE statement under the session row lock (`SessionStore.join_seat`, the event
part built by `core.events.append_event_cte`), on condition that the session still has
what the join was worked out from. These tests pin what that must never give up:

* the logged ParticipantJoined describes exactly the row the table holds;
* N + K concurrent joins on N seats seat exactly N, also spread over two service
  instances (as over two processes: the in-process queue orders, the row lock decides),
  seq gap-free and in commit order, also mixed with `append_event` appends on the same
  session;
* a join that finds the user's row inserted meanwhile gives the seat and the seq back;
* a session changed while the join waited for the lock is joined by its new state;
* another tenant's session is not found and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf import json_format

from classmesh.core.auth import Principal
from classmesh.core.config import Config
from classmesh.core.db import create_pool, transaction
from classmesh.core.errors import NotFound, ResourceExhausted
from classmesh.core.events import append_event, read_events
from classmesh.events.v1 import events_pb2
from classmesh.session import convert, rules
from classmesh.session.replay import fold_session_events, seats
from classmesh.session.service import SessionService, _SeatQueue
from classmesh.session.store import JoinClaim, SessionRow, SessionStore
from classmesh.session.v1 import session_service_pb2
from tests.support.db import insert_tenant

R = session_service_pb2


class CountingStore(SessionStore):
    """Counts which path each join took."""

    def __init__(self) -> None:
        self.fast = 0
        self.fast_missed = 0
        self.step = 0
        self.released = 0

    async def join_seat(self, conn: asyncpg.Connection, **kw: Any) -> JoinClaim | None:
        claim = await super().join_seat(conn, **kw)
        if claim is None:
            self.fast_missed += 1
        else:
            self.fast += 1
        return claim

    async def claim_seat(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> SessionRow | None:
        self.step += 1
        return await super().claim_seat(conn, tenant_id, session_id)

    async def release_seat(self, conn: asyncpg.Connection, tenant_id: str, session_id: str) -> None:
        self.released += 1
        await super().release_seat(conn, tenant_id, session_id)


@pytest.fixture(scope="module")
async def cm_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool set up like the server's (JSON codecs and its default size).

    The tenants made here go at the end (their sessions, participants and logs with them):
    other suites sweep every session of the shared database for overdue participants.
    """
    pool = await create_pool(database_url, max_size=20)
    yield pool
    await pool.execute("DELETE FROM tenants WHERE id = ANY($1::uuid[])", _TENANTS)
    await pool.close()


_TENANTS: list[uuid.UUID] = []


async def _tenant(pool: asyncpg.Pool) -> str:
    tenant_id = await insert_tenant(pool)
    _TENANTS.append(uuid.UUID(tenant_id))
    return tenant_id


def _principal(tenant_id: str, user: str, role: str = "student") -> Principal:
    return Principal(
        tenant_id=tenant_id,
        subject=user,
        name=f"{role} {user}",
        role=role,
        session_id="*",
        capabilities=frozenset({"publish", "subscribe", "chat"}),
        key_id="k",
        token_id="",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        guest=False,
    )


async def _session(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    capacity: int = 10,
    kind: str = "class",
    status: str = "live",
    settings: dict[str, Any] | None = None,
) -> str:
    start = datetime.now(UTC) - timedelta(minutes=5)
    sid = await pool.fetchval(
        "INSERT INTO sessions (tenant_id, kind, title, instructor_id, scheduled_start, "
        "scheduled_end, status, capacity, join_link_token, settings) VALUES ($1, "
        "$2::session_kind, 'join path', 'teacher', $3, $4, $5::session_status, $6, $7, $8::jsonb) "
        "RETURNING id",
        uuid.UUID(tenant_id),
        kind,
        start,
        start + timedelta(hours=1),
        status,
        capacity,
        secrets.token_urlsafe(48),
        json.dumps(settings if settings is not None else rules.default_settings(kind)),
    )
    return str(sid)


async def _join(pool: asyncpg.Pool, service: SessionService, principal: Principal, sid: str) -> Any:
    req = R.JoinSessionRequest(request_id=str(uuid.uuid4()), session_id=sid)
    async with transaction(pool) as conn:
        return await service.join(conn, principal, req)


async def _state(pool: asyncpg.Pool, tenant_id: str, sid: str) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT current_occupancy, last_seq, (SELECT count(*) FROM session_participants p "
        "WHERE p.session_id = s.id AND p.status IN ('lobby', 'admitted', 'disconnected')) AS held "
        "FROM sessions s WHERE id = $1 AND tenant_id = $2",
        uuid.UUID(sid),
        uuid.UUID(tenant_id),
    )
    assert row is not None
    return row["current_occupancy"], row["held"], row["last_seq"]


async def _check_log(pool: asyncpg.Pool, tenant_id: str, sid: str) -> list[Any]:
    """Seq gap-free, in commit order (created_at follows seq), and folding the log gives the
    roster and seat count the tables hold."""
    events = await read_events(pool, tenant_id=tenant_id, session_id=sid, limit=1000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)
    occupancy, held, last = await _state(pool, tenant_id, sid)
    assert last == len(events)
    _, roster = fold_session_events(events)
    rows = await pool.fetch(
        "SELECT user_id, status::text AS status FROM session_participants WHERE session_id = $1",
        uuid.UUID(sid),
    )
    assert roster == {r["user_id"]: r["status"] for r in rows}
    assert seats(roster) == occupancy == held
    return events


async def test_logged_participant_is_the_inserted_row(cm_pool: asyncpg.Pool) -> None:
    tenant = await _tenant(cm_pool)
    sid = await _session(cm_pool, tenant, settings={**rules.default_settings("class")})
    store = CountingStore()
    service = SessionService(Config(), store=store)
    result = await _join(cm_pool, service, _principal(tenant, "ada"), sid)
    assert (store.fast, store.fast_missed, store.step) == (1, 0, 0)

    joined = result.value.participant
    async with cm_pool.acquire() as conn:
        stored = await store.get_participant(conn, tenant, sid, "ada")
    assert stored == joined
    assert joined.status == "lobby"  # a live class with the lobby on
    [event] = result.events
    assert event.type == "participant_joined" and event.seq == 1
    assert event.request_id is not None
    assert event.actor["user_id"] == "ada"
    expected = events_pb2.ParticipantJoined(
        participant=convert.participant_proto(stored, event.created_at), current_occupancy=1
    )
    logged = json_format.ParseDict(dict(event.payload), events_pb2.ParticipantJoined())
    assert logged == expected
    # What was published is what was stored.
    [from_log] = await read_events(cm_pool, tenant_id=tenant, session_id=sid)
    assert from_log == event
    assert result.value.last_seq == 1
    assert result.value.session.current_occupancy == 1
    assert result.value.session.lobby_count == 1
    await _check_log(cm_pool, tenant, sid)


@pytest.mark.parametrize("kind", ["class", "study_room"])
async def test_concurrent_first_joins_are_exact_and_gap_free(
    cm_pool: asyncpg.Pool, kind: str
) -> None:
    tenant = await _tenant(cm_pool)
    capacity, extra = 12, 28
    sid = await _session(cm_pool, tenant, capacity=capacity, kind=kind)
    # Two instances, as two server processes.
    stores = [CountingStore(), CountingStore()]
    services = [SessionService(Config(), store=s) for s in stores]

    async def one(i: int) -> str:
        try:
            await _join(cm_pool, services[i % 2], _principal(tenant, f"u{i}"), sid)
        except ResourceExhausted as exc:
            return exc.reason
        return "joined"

    outcomes = await asyncio.gather(*(one(i) for i in range(capacity + extra)))
    full = "ROOM_FULL" if kind == "study_room" else "SESSION_FULL"
    assert sorted(set(outcomes)) == sorted({"joined", full})
    assert outcomes.count("joined") == capacity
    assert sum(s.fast for s in stores) >= 1
    events = await _check_log(cm_pool, tenant, sid)
    assert [e.payload["current_occupancy"] for e in events] == list(range(1, capacity + 1))
    assert all(not service._seat_queue._locks for service in services)


async def test_seat_queue_serves_in_arrival_order_and_forgets_idle_sessions() -> None:
    queue = _SeatQueue()
    order: list[int] = []

    async def one(i: int) -> None:
        async with queue.turn("s"):
            order.append(i)
            await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert order == list(range(20))
    assert queue._locks == {}
    # A waiter that gives up (deadline) leaves no trace either.
    async with queue.turn("s"):
        waiter = asyncio.ensure_future(one(99))
        await asyncio.sleep(0)
        waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue._locks == {}


async def test_joins_and_other_appends_share_one_gap_free_log(cm_pool: asyncpg.Pool) -> None:
    tenant = await _tenant(cm_pool)
    sid = await _session(cm_pool, tenant, capacity=30, kind="study_room")
    service = SessionService(Config())

    async def chat(n: int) -> None:
        async with transaction(cm_pool) as conn:
            await append_event(
                conn, tenant_id=tenant, session_id=sid, type="chat_message_posted", payload={}
            )

    await asyncio.gather(
        *(_join(cm_pool, service, _principal(tenant, f"s{i}"), sid) for i in range(30)),
        *(chat(n) for n in range(30)),
    )
    events = await _check_log(cm_pool, tenant, sid)
    assert len(events) == 60


async def test_a_row_inserted_meanwhile_gets_seat_and_seq_back(cm_pool: asyncpg.Pool) -> None:
    """Two tabs of one user both read "no participant"; the second's statement conflicts
    under the lock, gives its seat and seq back and takes the rejoin path."""
    tenant = await _tenant(cm_pool)
    sid = await _session(cm_pool, tenant, kind="study_room")
    store = CountingStore()
    async with cm_pool.acquire() as conn:
        seen = await store.read_for_join(conn, tenant, sid, "twin", user=None)
    assert seen is not None and seen.caller_status is None
    service = SessionService(Config(), store=store)

    first_done = asyncio.Event()
    release_first = asyncio.Event()

    async def first_tab() -> None:
        async with transaction(cm_pool) as conn:
            await service.join(
                conn,
                _principal(tenant, "twin"),
                R.JoinSessionRequest(request_id="tab-1", session_id=sid),
            )
            first_done.set()
            await release_first.wait()

    async def second_tab() -> Any:
        await first_done.wait()
        async with transaction(cm_pool) as conn:
            # Read before the first tab commits: no participant yet (the read's snapshot).
            seen2 = await store.read_for_join(conn, tenant, sid, "twin", user=None)
            assert seen2 is not None and seen2.caller_status is None
            claim_task = asyncio.ensure_future(
                store.join_seat(
                    conn,
                    seen=seen2,
                    link=None,
                    participant=_new_participant(seen2, "twin"),
                    event_type="participant_joined",
                    payload={},
                    occupancy_key="current_occupancy",
                    actor={},
                    request_id="tab-2",
                )
            )
            await _wait_for_lock_waiter(cm_pool)
            release_first.set()
            claim = await claim_task
            assert claim is not None and claim.participant is None and claim.event is None
            # The statement took a seat and a seq it cannot use: both go back.
            assert claim.session.current_occupancy == 2 and claim.session.last_seq == 2
            await store.release_seat(conn, tenant, sid)
        return claim

    await asyncio.gather(first_tab(), second_tab())
    assert await _state(cm_pool, tenant, sid) == (1, 1, 1)
    assert store.released == 1
    # And through the service: the second tab replaces the connection, same seat.
    again = await _join(cm_pool, service, _principal(tenant, "twin"), sid)
    assert again.value.participant.status == "admitted"
    events = await _check_log(cm_pool, tenant, sid)
    assert [e.type for e in events] == ["participant_joined", "participant_reconnected"]


async def test_same_user_racing_tabs_keep_one_seat(cm_pool: asyncpg.Pool) -> None:
    tenant = await _tenant(cm_pool)
    sid = await _session(cm_pool, tenant, capacity=50, kind="study_room")
    service = SessionService(Config())
    users = [f"tab-user-{i}" for i in range(10)]
    await asyncio.gather(
        *(_join(cm_pool, service, _principal(tenant, u), sid) for u in users for _ in range(3))
    )
    events = await _check_log(cm_pool, tenant, sid)
    assert await _state(cm_pool, tenant, sid) == (10, 10, 30)
    assert (
        sorted(e.type for e in events)
        == ["participant_joined"] * 10 + ["participant_reconnected"] * 20
    )


async def test_session_changed_while_waiting_is_joined_as_it_is_now(
    cm_pool: asyncpg.Pool,
) -> None:
    """The join read the lobby switched off; the lobby is switched on while it waits for
    the lock: the seat statement sees the change, nothing is taken, and the step-by-step
    path puts the student in the lobby."""
    tenant = await _tenant(cm_pool)
    settings = {**rules.default_settings("class"), "lobby_enabled": False}
    sid = await _session(cm_pool, tenant, settings=settings)
    store = CountingStore()
    service = SessionService(Config(), store=store)

    async with transaction(cm_pool) as other:
        await other.execute(
            "UPDATE sessions SET settings = settings || '{\"lobby_enabled\": true}'::jsonb "
            "WHERE id = $1",
            uuid.UUID(sid),
        )
        joining = asyncio.ensure_future(_join(cm_pool, service, _principal(tenant, "bo"), sid))
        await _wait_for_lock_waiter(cm_pool)
    result = await joining
    assert (store.fast, store.fast_missed, store.step) == (0, 1, 1)
    assert result.value.participant.status == "lobby"
    [event] = result.events
    assert event.payload["participant"]["status"] == "PARTICIPANT_STATUS_LOBBY"
    await _check_log(cm_pool, tenant, sid)


async def test_another_tenants_session_is_not_found(cm_pool: asyncpg.Pool) -> None:
    tenant, intruder = await _tenant(cm_pool), await _tenant(cm_pool)
    sid = await _session(cm_pool, tenant, kind="study_room")
    with pytest.raises(NotFound):
        await _join(cm_pool, SessionService(Config()), _principal(intruder, "eve"), sid)
    assert await _state(cm_pool, tenant, sid) == (0, 0, 0)
    assert (
        await cm_pool.fetchval(
            "SELECT count(*) FROM users WHERE tenant_id = $1", uuid.UUID(intruder)
        )
        == 0
    )


# --------------------------------------------------------------------------- helpers


def _new_participant(seen: SessionRow, user: str) -> Any:
    from classmesh.session.store import NewParticipant

    now = seen.db_now
    return NewParticipant(
        id=uuid.uuid4(),
        user_id=user,
        display_name=user,
        role="student",
        status="admitted",
        is_guest=False,
        audio_muted=False,
        permissions=rules.default_permissions("student", seen.settings),
        joined_at=now,
        connection_id=uuid.uuid4(),
        last_seen_at=now,
        visit_started_at=now,
        admitted_at=now,
        connected_since=now,
        study_session_id=None,
        email=None,
    )


async def _wait_for_lock_waiter(pool: asyncpg.Pool) -> None:
    """Until some backend of this database waits on a lock (a row lock, here)."""
    async with asyncio.timeout(10):
        while not await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ):
            await asyncio.sleep(0.005)
