"""Seed 000 STR-006 end to end through the SDK against a real `classmesh up`.

schedule -> start 5 min early -> 3 students join the lobby -> admit all -> remove 1 -> end,
with the database checked after every step; starting 11 minutes early fails with TOO_EARLY.
Also the guest join of seed 004 (join link, no account, short-lived session-scoped token).

The first half of this module holds the helpers every session e2e module shares (its own
mesh on its own throwaway database, API key, token minting, error and database checks):
the session test modules import them from here, so there is one copy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, AccessToken, ClassMeshClient, ClassMeshError
from tests.conftest import ROOT, create_database, drop_database
from tests.support.mesh import MeshProcess, start_mesh

# ============================================================================ shared helpers

DOMAIN = "classmesh.dev"
S = session_pb2
CLASS = S.SESSION_KIND_CLASS
STUDY_ROOM = S.SESSION_KIND_STUDY_ROOM
ALL_CAPS = ["publish", "subscribe", "chat", "moderate", "record", "admin"]
CAPS: dict[str, list[str]] = {
    "admin": ALL_CAPS,
    "instructor": ["publish", "subscribe", "chat", "moderate", "record"],
    "assistant": ["publish", "subscribe", "chat", "moderate"],
    "student": ["publish", "subscribe", "chat"],
    "guest": ["publish", "subscribe", "chat"],
}
#: Participant statuses that hold a seat (agreed rule: lobby, admitted, disconnected in grace).
SEATED = ("lobby", "admitted", "disconnected")
Code = grpc.StatusCode


@dataclass
class SessionMesh:
    """A `classmesh up` of our own: its DSN, an API key of its dev tenant, open clients."""

    proc: MeshProcess
    dsn: str
    redis_url: str
    key_id: str
    secret: str
    tenant_id: str
    logdir: Path
    pool: asyncpg.Pool
    env: dict[str, str]
    _clients: list[ClassMeshClient] = field(default_factory=list)

    def __repr__(self) -> str:  # short: hypothesis prints fixtures of failing examples
        return f"SessionMesh({self.target}, tenant={self.tenant_id})"

    @property
    def target(self) -> str:
        return self.proc.target

    def token(
        self,
        sub: str,
        role: str = "student",
        *,
        session: str = "*",
        caps: Iterable[str] | None = None,
        name: str | None = None,
        ttl: timedelta = timedelta(hours=1),
        key: tuple[str, str, str] | None = None,
    ) -> str:
        key_id, secret, tenant = key or (self.key_id, self.secret, self.tenant_id)
        return (
            AccessToken(key_id, secret)
            .with_tenant(tenant)
            .with_identity(sub, name or f"{role} {sub}")
            .with_grants(
                session=session, role=role, caps=list(CAPS[role] if caps is None else caps)
            )
            .with_ttl(ttl)
            .to_jwt()
        )

    def client(self, token: str | None) -> ClassMeshClient:
        c = ClassMeshClient(self.target, token=token)
        self._clients.append(c)
        return c

    def as_user(self, sub: str, role: str = "student", **kw: Any) -> ClassMeshClient:
        return self.client(self.token(sub, role, **kw))

    def admin(self, sub: str = "admin-1") -> ClassMeshClient:
        return self.as_user(sub, "admin")

    async def close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            await c.close()

    async def cli(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run `classmesh <args>` against this mesh's database and Redis."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "classmesh.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=str(ROOT),
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def other_tenant(self) -> tuple[str, str, str]:
        """A second tenant with its first key: (key_id, secret, tenant_id)."""
        rc, out, err = await self.cli("tenant", "create", f"other-{secrets.token_hex(4)}")
        assert rc == 0, err
        fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        return fields["key_id"], fields["secret"], fields["tenant_id"]


def mesh_env(dsn: str, redis_url: str, logdir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {
        "CLASSMESH_DATABASE_URL": dsn,
        "CLASSMESH_REDIS_URL": redis_url,
        "CLASSMESH_REDIS_PREFIX": f"cm_sess_{logdir.name}",
        "CLASSMESH_DATA_DIR": str(logdir / "data"),
    }
    env.update(extra)
    return env


@asynccontextmanager
async def session_mesh(
    admin_database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[SessionMesh]:
    """Start `classmesh up` on a fresh database; yield it with an API key of its dev tenant."""
    dsn = await create_database(admin_database_url)
    logdir = tmp_path_factory.mktemp(name)
    overrides = mesh_env(dsn, redis_url, logdir, extra_env or {})
    proc = start_mesh(overrides, str(logdir / "stderr.log"))
    pool: asyncpg.Pool | None = None
    sm: SessionMesh | None = None
    try:
        proc.wait_ready()
        async with ClassMeshClient(proc.target, token=proc.token) as c:
            resp = await c.admin.create_api_key(name=f"{name} tests")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
        assert pool is not None
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
        cli_env.update(overrides)
        cli_env["CLASSMESH_DATA_DIR"] = str(logdir / "cli")
        sm = SessionMesh(
            proc=proc,
            dsn=dsn,
            redis_url=redis_url,
            key_id=resp.api_key.id,
            secret=resp.secret,
            tenant_id=proc.tenant_id,
            logdir=logdir,
            pool=pool,
            env=cli_env,
        )
        yield sm
    finally:
        if sm is not None:
            await sm.close_clients()
        if pool is not None:
            await pool.close()
        if proc.proc.poll() is None:
            proc.terminate()
        proc.kill()
        await drop_database(admin_database_url, dsn)


def ts(dt: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(dt)
    return out


def dur(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def now() -> datetime:
    return datetime.now(UTC)


def time_range(start: datetime | None = None, end: datetime | None = None) -> Any:
    tr = common_pb2.TimeRange()
    if start is not None:
        tr.start_time.CopyFrom(ts(start))
    if end is not None:
        tr.end_time.CopyFrom(ts(end))
    return tr


async def create_session(
    client: ClassMeshClient,
    *,
    instructor_id: str = "",
    start_in: timedelta = timedelta(minutes=5),
    length: timedelta = timedelta(hours=1),
    kind: int = CLASS,
    capacity: int = 0,
    title: str | None = None,
    settings: session_pb2.SessionSettings | None = None,
    **fields: Any,
) -> session_pb2.Session:
    start = now() + start_in
    kw: dict[str, Any] = dict(
        title=title or f"Class {secrets.token_hex(3)}",
        instructor_id=instructor_id,
        scheduled_start=ts(start),
        scheduled_end=ts(start + length),
        kind=kind,
        capacity=capacity,
        **fields,
    )
    if settings is not None:
        kw["settings"] = settings
    resp = await client.sessions.create_session(**kw)
    return resp.session


async def live_class(
    sm: SessionMesh,
    *,
    instructor: str | None = None,
    capacity: int = 0,
    settings: session_pb2.SessionSettings | None = None,
    length: timedelta = timedelta(hours=1),
) -> tuple[session_pb2.Session, str, ClassMeshClient]:
    """A LIVE class of a fresh instructor: (session, instructor_id, instructor client)."""
    teacher = instructor or f"teacher-{secrets.token_hex(4)}"
    admin = sm.admin()
    s = await create_session(
        admin,
        instructor_id=teacher,
        start_in=timedelta(minutes=1),
        capacity=capacity,
        settings=settings,
        length=length,
    )
    inst = sm.as_user(teacher, "instructor")
    started = await inst.sessions.start_session(session_id=s.id)
    assert started.session.status == S.SESSION_STATUS_LIVE
    return started.session, teacher, inst


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | Iterable[str]
) -> ClassMeshError:
    """Await a call that must fail with `code` and ErrorInfo `reason` (or one of several)."""
    try:
        result = await call
    except ClassMeshError as exc:
        reasons = {reason} if isinstance(reason, str) else set(reason)
        assert (exc.code, exc.reason in reasons) == (code, True), (
            f"expected {code.name} {sorted(reasons)}, got {exc.code.name} {exc.reason!r}: "
            f"{exc.message}"
        )
        assert exc.domain == DOMAIN, exc
        return exc
    raise AssertionError(f"expected {code.name} {reason}, the call succeeded: {result}")


async def db_session(pool: asyncpg.Pool, session_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM sessions WHERE id = $1", uuid.UUID(session_id))
    assert row is not None, f"no sessions row {session_id}"
    return row


async def db_participants(pool: asyncpg.Pool, session_id: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT * FROM session_participants WHERE session_id = $1", uuid.UUID(session_id)
    )
    return {r["user_id"]: r for r in rows}


async def db_seated(pool: asyncpg.Pool, session_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM session_participants WHERE session_id = $1 "
            "AND status::text = ANY($2::text[])",
            uuid.UUID(session_id),
            list(SEATED),
        )
    )


async def db_event_types(pool: asyncpg.Pool, session_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT seq, type FROM session_events WHERE session_id = $1 ORDER BY seq",
        uuid.UUID(session_id),
    )
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "seq has gaps"
    return [r["type"] for r in rows]


async def db_audit(pool: asyncpg.Pool, session_id: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT * FROM audit_logs WHERE session_id = $1 ORDER BY created_at, id",
            uuid.UUID(session_id),
        )
    )


async def all_events(client: ClassMeshClient, session_id: str) -> list[events_pb2.Event]:
    """The whole event log through ListSessionEvents, every page."""
    out: list[events_pb2.Event] = []
    token = ""
    while True:
        resp = await client.sessions.list_session_events(
            session_id=session_id, page_size=500, page_token=token
        )
        out.extend(resp.events)
        token = resp.next_page_token
        if not token:
            return out


def event_type(e: events_pb2.Event) -> str:
    return e.WhichOneof("payload") or ""


async def participants(
    client: ClassMeshClient, session_id: str, *statuses: int
) -> dict[str, session_pb2.Participant]:
    resp = await client.sessions.list_participants(
        session_id=session_id, page_size=500, statuses=list(statuses)
    )
    assert not resp.next_page_token
    return {p.user_id: p for p in resp.participants}


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Watcher:
    """A WatchSession stream read in the background; `wait_for` finds events in it."""

    def __init__(self, client: ClassMeshClient, session_id: str, after_seq: int = 0) -> None:
        self.client = client
        self.session_id = session_id
        self.events: list[events_pb2.Event] = []
        self.error: ClassMeshError | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(after_seq))

    async def _run(self, after_seq: int) -> None:
        try:
            async for item in self.client.sessions.watch_session(
                session_id=self.session_id, after_seq=after_seq, retry=NO_RETRY
            ):
                self.events.append(item.event)
                self._changed.set()
        except ClassMeshError as exc:
            self.error = exc
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(
        self, pred: Any, timeout: float = 10.0, what: str = "event"
    ) -> events_pb2.Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if pred(e):
                    return e
            seen = len(self.events)
            if self.ended:
                raise AssertionError(f"stream ended ({self.error!r}) before {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                types = [event_type(e) for e in self.events]
                raise AssertionError(f"no {what} within {timeout} s; saw {types}")
            self._changed.clear()
            if len(self.events) > seen or self.ended:
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_ended(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def about(user_id: str, *types: str) -> Any:
    """Predicate: an event of one of `types` whose participant is `user_id`."""

    def pred(e: events_pb2.Event) -> bool:
        kind = event_type(e)
        if kind not in types:
            return False
        return getattr(e, kind).participant.user_id == user_id

    return pred


# ============================================================================ fixtures


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(admin_database_url, redis_url, tmp_path_factory, "lifecycle") as m:
        yield m


# ============================================================================ STR-006


async def run_str006(
    sm: SessionMesh,
    *,
    checks: bool = True,
    on_step: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """The STR-006 scenario; with `checks`, asserts the database after every step.

    `on_step(session_id)` runs after every step (the replay module snapshots the tables
    there). Returns the session id.
    """

    async def step() -> None:
        if on_step is not None:
            await on_step(sid)

    pool = sm.pool
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    students = [uid("student") for _ in range(3)]
    stud = {s: sm.as_user(s, "student") for s in students}

    # 1. The instructor schedules the class (instructor_id defaults to the caller).
    start_at = now() + timedelta(minutes=5)
    created = (
        await inst.sessions.create_session(
            title="STR-006 lifecycle",
            scheduled_start=ts(start_at),
            scheduled_end=ts(start_at + timedelta(hours=1)),
            capacity=30,
        )
    ).session
    sid = created.id
    if checks:
        assert created.status == S.SESSION_STATUS_SCHEDULED
        assert created.kind == CLASS
        assert created.instructor_id == teacher
        assert created.tenant_id == sm.tenant_id
        assert len(created.join_link_token) == 64
        row = await db_session(pool, sid)
        assert row["status"] == "scheduled"
        assert row["instructor_id"] == teacher
        assert str(row["tenant_id"]) == sm.tenant_id
        assert row["capacity"] == 30
        assert row["current_occupancy"] == 0
        assert row["join_link_token"] == created.join_link_token
        assert row["actual_start"] is None and row["deleted_at"] is None
        assert await db_event_types(pool, sid) == ["session_created"]

    await step()

    # 2. Start 5 minutes early: allowed.
    started = await inst.sessions.start_session(session_id=sid)
    if checks:
        assert started.session.status == S.SESSION_STATUS_LIVE
        assert started.session.HasField("actual_start")
        row = await db_session(pool, sid)
        assert row["status"] == "live"
        assert row["actual_start"] is not None
        assert abs((row["actual_start"] - now()).total_seconds()) < 30
        assert (await db_event_types(pool, sid))[-1] == "session_started"

    await step()

    # The instructor joins: admitted directly.
    joined = await inst.sessions.join_session(session_id=sid)
    if checks:
        assert joined.status == S.PARTICIPANT_STATUS_ADMITTED
        assert joined.participant.role == common_pb2.ROLE_INSTRUCTOR
        p = (await db_participants(pool, sid))[teacher]
        assert (p["status"], p["role"]) == ("admitted", "instructor")
        assert p["admitted_at"] is not None

    # 3. Three students join: each lands in the lobby (and holds a seat there).
    for n, s in enumerate(students, start=1):
        resp = await stud[s].sessions.join_session(session_id=sid)
        if checks:
            assert resp.status == S.PARTICIPANT_STATUS_LOBBY
            assert resp.participant.status == S.PARTICIPANT_STATUS_LOBBY
            assert resp.participant.user_id == s
            assert resp.participant.role == common_pb2.ROLE_STUDENT
            rows = await db_participants(pool, sid)
            assert (rows[s]["status"], rows[s]["role"]) == ("lobby", "student")
            assert rows[s]["admitted_at"] is None
            assert (await db_session(pool, sid))["current_occupancy"] == 1 + n
        await step()
    if checks:
        got = (await inst.sessions.get_session(session_id=sid)).session
        assert (got.lobby_count, got.current_occupancy, got.available_spots) == (3, 4, 26)
        lobby = await participants(inst, sid, S.PARTICIPANT_STATUS_LOBBY)
        assert set(lobby) == set(students)
        types = await db_event_types(pool, sid)
        assert types[-4:] == ["participant_joined"] * 4

    await step()

    # 4. Admit all.
    admitted = await inst.sessions.admit_participants(session_id=sid, all=True)
    if checks:
        assert {p.user_id for p in admitted.admitted} == set(students)
        assert all(p.status == S.PARTICIPANT_STATUS_ADMITTED for p in admitted.admitted)
        assert list(admitted.skipped_user_ids) == []
        assert list(admitted.capacity_skipped_user_ids) == []
        assert admitted.current_occupancy == 4
        rows = await db_participants(pool, sid)
        for s in students:
            assert rows[s]["status"] == "admitted", s
            assert rows[s]["admitted_at"] is not None
        assert (await db_session(pool, sid))["current_occupancy"] == 4
        got = (await inst.sessions.get_session(session_id=sid)).session
        assert (got.lobby_count, got.current_occupancy) == (0, 4)
        assert (await db_event_types(pool, sid))[-3:] == ["participant_admitted"] * 3
        # Each admitted student sees it on their own heartbeat.
        hb = await stud[students[0]].sessions.heartbeat(session_id=sid)
        assert hb.status == S.PARTICIPANT_STATUS_ADMITTED

    await step()

    # 5. Remove one student mid-session.
    gone = students[1]
    removed = await inst.sessions.remove_participant(
        session_id=sid, user_id=gone, reason="disruptive"
    )
    if checks:
        assert removed.participant.status == S.PARTICIPANT_STATUS_REMOVED
        assert removed.participant.removal_reason == "disruptive"
        rows = await db_participants(pool, sid)
        assert rows[gone]["status"] == "removed"
        assert rows[gone]["left_at"] is not None
        assert rows[gone]["removed_reason"] == "disruptive"
        assert (await db_session(pool, sid))["current_occupancy"] == 3
        assert (await db_event_types(pool, sid))[-1] == "participant_removed"
        audit = [a for a in await db_audit(pool, sid) if a["action"] == "participant_removed"]
        assert len(audit) == 1
        assert (audit[0]["actor_id"], audit[0]["target_id"]) == (teacher, gone)
        assert audit[0]["reason"] == "disruptive"
        # The removed student's token no longer works for this session.
        await expect_error(
            stud[gone].sessions.join_session(session_id=sid, retry=NO_RETRY),
            Code.PERMISSION_DENIED,
            "PARTICIPANT_REMOVED",
        )
        await expect_error(
            stud[gone].sessions.get_session(session_id=sid, retry=NO_RETRY),
            Code.PERMISSION_DENIED,
            "PARTICIPANT_REMOVED",
        )
        assert (await db_session(pool, sid))["current_occupancy"] == 3

    await step()

    # 6. End.
    ended = await inst.sessions.end_session(session_id=sid, reason="class over")
    if checks:
        assert ended.session.status == S.SESSION_STATUS_ENDED
        assert ended.session.HasField("actual_end")
        assert ended.session.current_occupancy == 0
        row = await db_session(pool, sid)
        assert row["status"] == "ended"
        assert row["actual_end"] is not None and row["actual_end"] >= row["actual_start"]
        assert row["current_occupancy"] == 0
        rows = await db_participants(pool, sid)
        assert rows[gone]["status"] == "removed"
        for u in [teacher, students[0], students[2]]:
            assert rows[u]["status"] == "left", u
            assert rows[u]["left_at"] is not None, u
        assert (await db_event_types(pool, sid))[-1] == "session_ended"
        assert "session_ended" in [a["action"] for a in await db_audit(pool, sid)]
        # Joining an ended session is refused.
        await expect_error(
            stud[students[0]].sessions.join_session(session_id=sid, retry=NO_RETRY),
            Code.FAILED_PRECONDITION,
            "SESSION_ENDED",
        )
    await step()
    return sid


async def test_str006_lifecycle_end_to_end(sm: SessionMesh) -> None:
    sid = await run_str006(sm)
    # The log through the API is the log in the table, in seq order without gaps.
    events = await all_events(sm.admin(), sid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [event_type(e) for e in events] == await db_event_types(sm.pool, sid)
    assert all(e.session_id == sid for e in events)
    # Session snapshots in events never carry the join link token.
    for e in events:
        kind = event_type(e)
        snap = getattr(getattr(e, kind), "session", None)
        if isinstance(snap, session_pb2.Session):
            assert snap.join_link_token == "", kind


async def test_start_eleven_minutes_early_is_too_early(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    s = await create_session(inst, start_in=timedelta(minutes=11))
    err = await expect_error(
        inst.sessions.start_session(session_id=s.id, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "TOO_EARLY",
    )
    assert "10 minutes" in err.message or "early" in err.message.lower()
    row = await db_session(sm.pool, s.id)
    assert (row["status"], row["actual_start"]) == ("scheduled", None)
    assert await db_event_types(sm.pool, s.id) == ["session_created"]
    # Nine minutes early is inside the window.
    s2 = await create_session(inst, start_in=timedelta(minutes=9))
    ok = await inst.sessions.start_session(session_id=s2.id)
    assert ok.session.status == S.SESSION_STATUS_LIVE
    assert (await db_session(sm.pool, s2.id))["status"] == "live"


async def test_guest_joins_through_the_join_link_without_an_account(sm: SessionMesh) -> None:
    settings = session_pb2.SessionSettings(
        lobby_enabled=True, allow_guests=True, chat_enabled=True, mute_on_entry=True
    )
    s, teacher, inst = await live_class(sm, settings=settings)
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    assert len(link) == 64
    anon = sm.client(None)
    before = now()
    resp = await anon.sessions.join_session(join_link_token=link, display_name="Visiting Vera")
    assert resp.access_token
    assert resp.participant.guest
    assert resp.participant.display_name == "Visiting Vera"
    assert resp.participant.role == common_pb2.ROLE_GUEST
    assert resp.status in (S.PARTICIPANT_STATUS_LOBBY, S.PARTICIPANT_STATUS_ADMITTED)
    # Short-lived and session-scoped: <= 2 h, <= scheduled_end + 15 min.
    claims = jwt.decode(resp.access_token, options={"verify_signature": False})
    assert claims["grants"]["session"] == s.id
    assert claims["grants"]["role"] == "guest"
    assert claims["tenant"] == sm.tenant_id
    assert claims["sub"] == resp.participant.user_id
    exp = datetime.fromtimestamp(claims["exp"], UTC)
    assert abs((resp.access_token_expire_time.ToDatetime(UTC) - exp).total_seconds()) < 1
    assert exp <= before + timedelta(hours=2, seconds=5)
    assert exp <= s.scheduled_end.ToDatetime(UTC) + timedelta(minutes=15, seconds=1)
    assert exp > before
    # The guest token works for this session and no other.
    guest = sm.client(resp.access_token)
    hb = await guest.sessions.heartbeat(session_id=s.id)
    assert hb.session_status == S.SESSION_STATUS_LIVE
    got = (await guest.sessions.get_session(session_id=s.id)).session
    assert got.join_link_token == ""  # only instructors/assistants/admins see it
    other = await create_session(sm.admin(), instructor_id=teacher)
    await expect_error(
        guest.sessions.get_session(session_id=other.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    rows = await db_participants(sm.pool, s.id)
    g = rows[resp.participant.user_id]
    assert (g["role"], g["is_guest"], g["display_name"]) == ("guest", True, "Visiting Vera")
    tokens = await sm.pool.fetch(
        "SELECT * FROM guest_tokens WHERE session_id = $1", uuid.UUID(s.id)
    )
    assert len(tokens) == 1
    assert abs((tokens[0]["expires_at"] - exp).total_seconds()) < 1


async def test_same_user_joining_twice_keeps_one_participant_and_one_seat(
    sm: SessionMesh,
) -> None:
    s, _, inst = await live_class(sm, capacity=5)
    student = uid("student")
    c1 = sm.as_user(student, "student")
    c2 = sm.as_user(student, "student")  # a second tab
    first = await c1.sessions.join_session(session_id=s.id)
    second = await c2.sessions.join_session(session_id=s.id)
    assert second.participant.id == first.participant.id
    # The newer join replaces the old connection.
    assert second.participant.connection_id
    assert second.participant.connection_id != first.participant.connection_id
    rows = await db_participants(sm.pool, s.id)
    assert list(rows) == [student]
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 1
    got = (await inst.sessions.get_session(session_id=s.id)).session
    assert (got.current_occupancy, got.available_spots) == (1, 4)
    joins = [
        e
        for e in await all_events(inst, s.id)
        if event_type(e) == "participant_joined"
        and e.participant_joined.participant.user_id == student
    ]
    assert len(joins) == 1


async def test_list_sessions_filters_and_paging(sm: SessionMesh) -> None:
    admin = sm.admin()
    course = f"course-{secrets.token_hex(3)}"
    t1, t2 = uid("teacher"), uid("teacher")
    made = []
    for i, (teacher, kind) in enumerate(
        [(t1, CLASS), (t1, CLASS), (t2, CLASS), (t2, STUDY_ROOM), (t1, CLASS)]
    ):
        made.append(
            await create_session(
                admin,
                instructor_id=teacher,
                kind=kind,
                start_in=timedelta(days=30, hours=i),
                lms_course_ref=course,
            )
        )
    # Make one live (start window relative to its own schedule) and cancel another.
    live = await create_session(
        admin, instructor_id=t1, start_in=timedelta(minutes=1), lms_course_ref=course
    )
    await admin.sessions.start_session(session_id=live.id)
    await admin.sessions.cancel_session(session_id=made[1].id)

    async def ids(**kw: Any) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            resp = await admin.sessions.list_sessions(
                lms_course_ref=course, page_size=2, page_token=token, **kw
            )
            assert len(resp.sessions) <= 2
            out.extend(x.id for x in resp.sessions)
            token = resp.next_page_token
            if not token:
                return out

    everything = await ids()
    assert sorted(everything) == sorted([x.id for x in made] + [live.id])
    assert len(everything) == len(set(everything))  # paging: no duplicates
    # Newest scheduled_start first.
    starts = {x.id: x.scheduled_start.ToDatetime() for x in [*made, live]}
    assert everything == sorted(everything, key=lambda i: starts[i], reverse=True)
    assert set(await ids(instructor_id=t2)) == {made[2].id, made[3].id}
    assert await ids(kind=STUDY_ROOM) == [made[3].id]
    # (Whether a fresh study room is SCHEDULED or LIVE is tested on its own below.)
    db_live = {
        str(r["id"])
        for r in await sm.pool.fetch(
            "SELECT id FROM sessions WHERE lms_course_ref = $1 AND status = 'live'", course
        )
    }
    assert live.id in db_live
    assert set(await ids(statuses=[S.SESSION_STATUS_LIVE])) == db_live
    assert await ids(statuses=[S.SESSION_STATUS_CANCELLED]) == [made[1].id]
    window = time_range(
        now() + timedelta(days=30, minutes=30), now() + timedelta(days=30, hours=2, minutes=30)
    )
    assert set(await ids(scheduled_start_range=window)) == {made[1].id, made[2].id}
    first = await admin.sessions.list_sessions(lms_course_ref=course, page_size=2)
    assert first.total_size == len(everything)
    # Soft-deleted sessions disappear unless an admin asks for them.
    await admin.sessions.delete_session(session_id=made[4].id)
    assert made[4].id not in await ids()
    assert made[4].id in await ids(show_deleted=True)


async def test_update_session_rules(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    s = await create_session(inst, start_in=timedelta(hours=3))
    mask = field_mask_pb2.FieldMask
    new_start = now() + timedelta(hours=4)
    upd = await inst.sessions.update_session(
        session=session_pb2.Session(
            id=s.id,
            title="Moved",
            scheduled_start=ts(new_start),
            scheduled_end=ts(new_start + timedelta(hours=2)),
            capacity=42,
        ),
        update_mask=mask(paths=["title", "scheduled_start", "scheduled_end", "capacity"]),
    )
    assert (upd.session.title, upd.session.capacity) == ("Moved", 42)
    row = await db_session(sm.pool, s.id)
    assert (row["title"], row["capacity"]) == ("Moved", 42)
    assert abs((row["scheduled_start"] - new_start).total_seconds()) < 1
    assert (await db_event_types(sm.pool, s.id))[-1] == "session_updated"
    # Fields outside the mask are untouched.
    upd = await inst.sessions.update_session(
        session=session_pb2.Session(id=s.id, title="ignored", description="only this"),
        update_mask=mask(paths=["description"]),
    )
    assert (upd.session.title, upd.session.description) == ("Moved", "only this")
    # Moving the end before the start is invalid.
    err = await expect_error(
        inst.sessions.update_session(
            session=session_pb2.Session(id=s.id, scheduled_end=ts(new_start - timedelta(hours=1))),
            update_mask=mask(paths=["scheduled_end"]),
            retry=NO_RETRY,
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert any(f.endswith("scheduled_end") for f, _ in err.field_violations), err
    # An ended session is read-only.
    live, _, owner = await live_class(sm, instructor=teacher)
    await owner.sessions.end_session(session_id=live.id)
    await expect_error(
        owner.sessions.update_session(
            session=session_pb2.Session(id=live.id, title="late edit"),
            update_mask=mask(paths=["title"]),
            retry=NO_RETRY,
        ),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )
    assert (await db_session(sm.pool, live.id))["title"] != "late edit"


async def test_students_cannot_join_after_end_plus_grace(sm: SessionMesh) -> None:
    s, teacher, inst = await live_class(sm)
    await sm.pool.execute(
        "UPDATE sessions SET scheduled_start = now() - interval '2 hours', "
        "scheduled_end = now() - interval '16 minutes' WHERE id = $1",
        uuid.UUID(s.id),
    )
    await expect_error(
        sm.as_user(uid("student")).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "TOO_LATE",
    )
    # The instructor may still join a class that runs over.
    ok = await inst.sessions.join_session(session_id=s.id)
    assert ok.status == S.PARTICIPANT_STATUS_ADMITTED
    assert teacher in await db_participants(sm.pool, s.id)


async def test_guest_token_lifetime_follows_the_setting(sm: SessionMesh) -> None:
    settings = session_pb2.SessionSettings(
        lobby_enabled=True, allow_guests=True, guest_token_ttl=dur(600)
    )
    s, _, inst = await live_class(sm, settings=settings)
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    before = now()
    resp = await sm.client(None).sessions.join_session(join_link_token=link, display_name="G")
    exp = resp.access_token_expire_time.ToDatetime(UTC)
    assert before + timedelta(seconds=595) <= exp <= now() + timedelta(seconds=605)
    # The guest can be removed like anyone else; their token stops working here.
    guest = sm.client(resp.access_token)
    await inst.sessions.remove_participant(session_id=s.id, user_id=resp.participant.user_id)
    await expect_error(
        guest.sessions.heartbeat(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )


async def test_join_is_idempotent_and_a_class_rejoin_goes_back_to_the_lobby(
    sm: SessionMesh,
) -> None:
    s, _, inst = await live_class(sm, capacity=5)
    student = uid("student")
    c = sm.as_user(student)
    rid = str(uuid.uuid4())
    first = await c.sessions.join_session(session_id=s.id, request_id=rid)
    again = await c.sessions.join_session(session_id=s.id, request_id=rid)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert (await db_event_types(sm.pool, s.id)).count("participant_joined") == 1
    # A lobby participant learns of admission from Heartbeat.
    assert (await c.sessions.heartbeat(session_id=s.id)).status == S.PARTICIPANT_STATUS_LOBBY
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[student])
    assert (await c.sessions.heartbeat(session_id=s.id)).status == S.PARTICIPANT_STATUS_ADMITTED
    left = await c.sessions.leave_session(session_id=s.id)
    assert left.participant.status == S.PARTICIPANT_STATUS_LEFT
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 0
    # After leaving, a class rejoin waits in the lobby again (and takes a seat again).
    back = await c.sessions.join_session(session_id=s.id)
    assert back.status == S.PARTICIPANT_STATUS_LOBBY
    assert back.participant.id == first.participant.id
    assert back.participant.join_count == 2
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 1


async def test_a_new_study_room_is_scheduled_until_someone_joins(sm: SessionMesh) -> None:
    """session.proto SessionStatus: "Study rooms stay SCHEDULED until someone joins or an
    admin starts them"."""
    room = await create_session(sm.admin(), kind=STUDY_ROOM, start_in=timedelta(days=2))
    assert room.status == S.SESSION_STATUS_SCHEDULED
    row = await db_session(sm.pool, room.id)
    assert (row["status"], row["actual_start"]) == ("scheduled", None)
    joined = await sm.as_user(uid("early")).sessions.join_session(session_id=room.id)
    assert joined.status == S.PARTICIPANT_STATUS_ADMITTED
    assert joined.session.status == S.SESSION_STATUS_LIVE
    assert (await db_session(sm.pool, room.id))["status"] == "live"


async def test_lobby_switched_off_admits_students_once_live(sm: SessionMesh) -> None:
    settings = session_pb2.SessionSettings(lobby_enabled=False, chat_enabled=True)
    teacher = uid("teacher")
    s = await create_session(
        sm.admin(), instructor_id=teacher, start_in=timedelta(minutes=1), settings=settings
    )
    early, late = uid("early"), uid("late")
    # Before the start nobody is in the class: even without a lobby, students wait.
    first = await sm.as_user(early).sessions.join_session(session_id=s.id)
    assert first.status == S.PARTICIPANT_STATUS_LOBBY
    await sm.as_user(teacher, "instructor").sessions.start_session(session_id=s.id)
    rows = await db_participants(sm.pool, s.id)
    assert rows[early]["status"] == "admitted"
    second = await sm.as_user(late).sessions.join_session(session_id=s.id)
    assert second.status == S.PARTICIPANT_STATUS_ADMITTED
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 2
