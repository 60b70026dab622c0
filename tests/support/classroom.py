"""What the InteractionService tests share: their own `classmesh up` (or `serve`) on a fresh
database, tokens of an API key of its dev tenant, live classes joined through SessionService,
and background readers of the live feeds.

Presence: participants in these tests do not heartbeat, so the meshes run with a heartbeat
timeout far beyond a test's length (a participant stays `admitted`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
import pytest
from google.protobuf import timestamp_pb2

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import DEFAULT, AccessToken, ClassMeshClient, ClassMeshError
from tests.conftest import ROOT, create_database, drop_database
from tests.support.mesh import MeshProcess, start_mesh

DOMAIN = "classmesh.dev"
Code = grpc.StatusCode
S = session_pb2
CAPS: dict[str, list[str]] = {
    "admin": ["publish", "subscribe", "chat", "moderate", "record", "admin"],
    "instructor": ["publish", "subscribe", "chat", "moderate", "record"],
    "assistant": ["publish", "subscribe", "chat", "moderate"],
    "student": ["publish", "subscribe", "chat"],
    "guest": ["publish", "subscribe", "chat"],
}
#: Presence is SessionService's business; these tests keep everyone present.
QUIET_PRESENCE = {
    "CLASSMESH_HEARTBEAT_INTERVAL_SECONDS": "600",
    "CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS": "3600",
    "CLASSMESH_DB_POOL_SIZE": "10",
}


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def ts(dt: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(dt)
    return out


def scope(session_id: str, room: str = "") -> common_pb2.Scope:
    return common_pb2.Scope(session_id=session_id, breakout_room_id=room)


def kind(event: events_pb2.Event) -> str:
    return event.WhichOneof("payload") or ""


@dataclass
class Mesh:
    """A mesh of our own with an API key of its dev tenant and a pool on its database."""

    proc: MeshProcess
    dsn: str
    key_id: str
    secret: str
    tenant_id: str
    pool: asyncpg.Pool
    env: dict[str, str]
    _clients: list[ClassMeshClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.proc.target

    def token(self, sub: str, role: str = "student", *, name: str | None = None) -> str:
        return (
            AccessToken(self.key_id, self.secret)
            .with_tenant(self.tenant_id)
            .with_identity(sub, name or f"{role} {sub}")
            .with_grants(session="*", role=role, caps=CAPS[role])
            .with_ttl(timedelta(hours=2))
            .to_jwt()
        )

    def client(self, sub: str, role: str = "student", target: str | None = None) -> ClassMeshClient:
        c = ClassMeshClient(target or self.target, token=self.token(sub, role))
        self._clients.append(c)
        return c

    async def close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            await c.close()

    async def cli(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
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


def mesh_env(dsn: str, redis_url: str, data: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "CLASSMESH_DATABASE_URL": dsn,
        "CLASSMESH_REDIS_URL": redis_url,
        "CLASSMESH_REDIS_PREFIX": f"cm_ix_{data.name}",
        "CLASSMESH_DATA_DIR": str(data / "data"),
        **QUIET_PRESENCE,
    }
    env.update(extra or {})
    return env


@asynccontextmanager
async def classroom_mesh(
    admin_database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    extra_env: dict[str, str] | None = None,
    dsn: str | None = None,
) -> AsyncIterator[Mesh]:
    """`classmesh up` on a fresh database (or `dsn`); yields it with an API key."""
    own_db = dsn is None
    dsn = dsn or await create_database(admin_database_url)
    logdir = tmp_path_factory.mktemp(name)
    overrides = mesh_env(dsn, redis_url, logdir, extra_env)
    proc = start_mesh(overrides, str(logdir / "stderr.log"))
    pool: asyncpg.Pool | None = None
    mesh: Mesh | None = None
    try:
        proc.wait_ready()
        async with ClassMeshClient(proc.target, token=proc.token) as c:
            resp = await c.admin.create_api_key(name=f"{name} tests")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=5)
        assert pool is not None
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
        cli_env.update(overrides)
        cli_env["CLASSMESH_DATA_DIR"] = str(logdir / "cli")
        mesh = Mesh(
            proc=proc,
            dsn=dsn,
            key_id=resp.api_key.id,
            secret=resp.secret,
            tenant_id=proc.tenant_id,
            pool=pool,
            env=cli_env,
        )
        yield mesh
    finally:
        if mesh is not None:
            await mesh.close_clients()
        if pool is not None:
            await pool.close()
        if proc.proc.poll() is None:
            proc.terminate()
        proc.kill()
        if own_db:
            await drop_database(admin_database_url, dsn)


# ------------------------------------------------------------------------------ classes


@dataclass
class Klass:
    """A live class: its id, the instructor's client, and joined students' clients."""

    id: str
    teacher: str
    inst: ClassMeshClient
    students: dict[str, ClassMeshClient]


async def join(client: ClassMeshClient, session_id: str) -> session_pb2.Participant:
    resp = await client.sessions.join_session(session_id=session_id)
    return resp.participant


async def live_class(
    mesh: Mesh,
    students: int = 0,
    *,
    settings: session_pb2.SessionSettings | None = None,
    capacity: int = 0,
    kind: int = S.SESSION_KIND_CLASS,
) -> Klass:
    """A class started by a fresh instructor who joined it; `students` joined and admitted
    (the lobby is off, so a student who joins a live class is admitted at once)."""
    teacher = uid("teacher")
    inst = mesh.client(teacher, "instructor")
    start = datetime.now(UTC) + timedelta(minutes=1)
    base = settings or S.SessionSettings(
        lobby_enabled=False, chat_enabled=True, qa_enabled=True, max_breakout_rooms=10
    )
    created = await inst.sessions.create_session(
        title=f"Class {secrets.token_hex(3)}",
        instructor_id=teacher,
        scheduled_start=ts(start),
        scheduled_end=ts(start + timedelta(hours=2)),
        capacity=capacity,
        kind=kind,
        settings=base,
    )
    sid = created.session.id
    if kind == S.SESSION_KIND_CLASS:
        await inst.sessions.start_session(session_id=sid)
    me = await join(inst, sid)
    assert me.status == S.PARTICIPANT_STATUS_ADMITTED, me
    klass = Klass(sid, teacher, inst, {})
    for _ in range(students):
        await add_student(mesh, klass)
    return klass


async def add_student(mesh: Mesh, klass: Klass, user: str | None = None) -> str:
    user = user or uid("student")
    client = mesh.client(user, "student")
    p = await join(client, klass.id)
    assert p.status == S.PARTICIPANT_STATUS_ADMITTED, p
    klass.students[user] = client
    return user


async def open_breakout_room(mesh: Mesh, session_id: str, users: Iterable[str]) -> str:
    """A breakout room with `users` assigned, written to the database directly: BreakoutService
    is not implemented yet, and InteractionService only reads these rows."""
    async with mesh.pool.acquire() as conn:
        tenant = await conn.fetchval(
            "SELECT tenant_id FROM sessions WHERE id = $1", uuid.UUID(session_id)
        )
        room = await conn.fetchval(
            "INSERT INTO breakout_rooms (tenant_id, session_id, name, capacity) "
            "VALUES ($1, $2, $3, 50) RETURNING id",
            tenant,
            uuid.UUID(session_id),
            f"Room {secrets.token_hex(3)}",
        )
        for user in users:
            pid = await conn.fetchval(
                "SELECT id FROM session_participants WHERE session_id = $1 AND user_id = $2",
                uuid.UUID(session_id),
                user,
            )
            assert pid is not None, user
            await conn.execute(
                "INSERT INTO room_assignments (tenant_id, session_id, breakout_room_id, "
                "participant_id, joined_at) VALUES ($1, $2, $3, $4, now())",
                tenant,
                uuid.UUID(session_id),
                room,
                pid,
            )
    return str(room)


# ------------------------------------------------------------------------------ feeds


class Feed:
    """A Subscribe stream read in the background; `wait_for` / `wait_count` look into it.

    With the SDK's default retry a transient failure (UNAVAILABLE when the shared database
    runs out of connections) resumes the stream with `after_seq`, as a real client does:
    the assertions on exactly-once, in-order delivery still hold.
    """

    def __init__(
        self,
        client: ClassMeshClient,
        session_id: str,
        room: str = "",
        *,
        after_seq: int = 0,
        include_session_events: bool = False,
        retry: Any = DEFAULT,
    ) -> None:
        self.client = client
        self.events: list[events_pb2.Event] = []
        self.error: ClassMeshError | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self._request = dict(
            scope=scope(session_id, room),
            after_seq=after_seq,
            include_session_events=include_session_events,
        )
        self.task = asyncio.create_task(self._run(retry))

    async def _run(self, retry: Any) -> None:
        try:
            async for item in self.client.interaction.subscribe(**self._request, retry=retry):
                self.events.append(item.event)
                self._changed.set()
        except ClassMeshError as exc:
            self.error = exc
        finally:
            self.ended = True
            self._changed.set()

    def of(self, *types: str) -> list[events_pb2.Event]:
        return [e for e in self.events if kind(e) in types]

    async def wait_for(
        self, pred: Callable[[events_pb2.Event], bool], timeout: float = 10.0, what: str = "event"
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
                raise AssertionError(f"feed ended ({self.error!r}) before {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no {what} within {timeout} s; got {[kind(e) for e in self.events]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_count(self, type_: str, n: int, timeout: float = 15.0) -> list[events_pb2.Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = self.of(type_)
            if len(got) >= n:
                return got
            if self.ended:
                raise AssertionError(f"feed ended ({self.error!r}) with {len(got)}/{n} {type_}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{len(got)}/{n} {type_} within {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def ready(self) -> None:
        """Give the server a moment to attach the subscription. Only for tests about live
        delivery: a feed replays from `after_seq`, so nothing sent earlier is missed."""
        await asyncio.sleep(0.3)

    async def quiet(self, wait: float = 0.5) -> None:
        await asyncio.sleep(wait)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


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


async def db_events(pool: asyncpg.Pool, session_id: str) -> list[asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT seq, type, payload, breakout_room_id, actor FROM session_events "
        "WHERE session_id = $1 ORDER BY seq",
        uuid.UUID(session_id),
    )
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "seq has gaps"
    return list(rows)
