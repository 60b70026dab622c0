"""JoinSession throughput and latency: ClassMesh through gRPC vs the same transaction as raw SQL.

50 concurrent clients join ONE session (the hot-room case: every join queues on that
session's row lock), each join a new user, so every call takes a seat:

* classmesh  `classmesh up` (subprocess, rate limiter off) SessionService.JoinSession over
             raw grpc.aio generic calls with a per-user JWT: auth (token verify) + the
             capacity transaction (idempotency row, session row lock, participant insert,
             seat count, event append) + publish on Redis after commit + the response;
* raw sql    the same statements hand-written on a plain asyncpg pool of the same size as
             the server's (20) from this process, the seat statement queued in-process per
             room as ClassMesh queues it, plus the Redis PUBLISH: the physical limit of this
             machine for that transaction right now.

Each case first runs one unmeasured warm-up round (pools filled, statements prepared,
caches loaded), then several rounds of 1,000 joins on fresh study rooms of 1,000 seats (no
lobby); the cases alternate round by round, so load from elsewhere on a shared machine
moves both. After every round the seat count is checked against the participant rows
(exact capacity).
Prints joins/s, p50/p95/p99 per case and the ratio ClassMesh / raw, then one JSON line.
Run: .venv/bin/python bench/bench_join.py
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as aioredis
from _common import (
    REDIS_URL,
    mesh_env,
    percentile,
    print_json,
    print_table,
    ratio,
    redis_prefix,
    start_server,
    throwaway_database,
)
from google.protobuf import timestamp_pb2

from classmesh.admin.v1 import admin_service_pb2
from classmesh.core.db import create_pool
from classmesh.session.v1 import session_pb2, session_service_pb2
from classmesh_sdk import AccessToken

CLIENTS = 50
POOL_SIZE = 20  # Config.db_pool_size default, for both cases
SEATS = 1000
ROUNDS = 3
WARMUP = 300  # joins per case before measuring
JOIN = "/classmesh.session.v1.SessionService/JoinSession"
CREATE = "/classmesh.session.v1.SessionService/CreateSession"
CREATE_KEY = "/classmesh.admin.v1.AdminService/CreateApiKey"


@dataclass
class Figure:
    case: str
    joins: int
    seconds: float
    joins_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    first_error: str = ""


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


async def _drive(
    name: str, one: object, users: list[str], latencies: list[float], errors: list[str]
) -> float:
    """CLIENTS workers take users from a queue and join; returns the wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for u in users:
        queue.put_nowait(u)

    async def worker() -> None:
        while True:
            try:
                user = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                await one(user)  # type: ignore[operator]
            except Exception as exc:  # a failed join is counted, never hidden
                errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ classmesh


class Mesh:
    def __init__(self, target: str, admin_token: str, tenant_id: str) -> None:
        self.target = target
        self.admin_md = (("authorization", f"Bearer {admin_token}"),)
        self.tenant_id = tenant_id
        self.channel = grpc.aio.insecure_channel(target)
        self.key: tuple[str, str] = ("", "")
        self.tokens: dict[str, str] = {}

    async def setup(self) -> None:
        call = self.channel.unary_unary(
            CREATE_KEY,
            request_serializer=admin_service_pb2.CreateApiKeyRequest.SerializeToString,
            response_deserializer=admin_service_pb2.CreateApiKeyResponse.FromString,
        )
        created = await call(
            admin_service_pb2.CreateApiKeyRequest(request_id=str(uuid.uuid4()), name="bench"),
            metadata=self.admin_md,
        )
        self.key = (created.api_key.id, created.secret)

    async def room(self) -> str:
        call = self.channel.unary_unary(
            CREATE,
            request_serializer=session_service_pb2.CreateSessionRequest.SerializeToString,
            response_deserializer=session_service_pb2.CreateSessionResponse.FromString,
        )
        start = datetime.now(UTC)
        resp = await call(
            session_service_pb2.CreateSessionRequest(
                request_id=str(uuid.uuid4()),
                title=f"bench room {secrets.token_hex(3)}",
                scheduled_start=_ts(start),
                scheduled_end=_ts(start + timedelta(hours=2)),
                kind=session_pb2.SESSION_KIND_STUDY_ROOM,
                capacity=SEATS,
            ),
            metadata=self.admin_md,
        )
        return str(resp.session.id)

    def mint(self, users: list[str]) -> None:
        key = AccessToken(*self.key).with_tenant(self.tenant_id)
        for u in users:
            self.tokens[u] = (
                key.with_identity(u, u)
                .with_grants(session="*", role="student", caps=["subscribe"])
                .with_ttl(timedelta(minutes=30))
                .to_jwt()
            )

    async def round(
        self, users: list[str], latencies: list[float], errors: list[str]
    ) -> tuple[str, float]:
        sid = await self.room()
        self.mint(users)
        call = self.channel.unary_unary(JOIN)  # raw bytes in and out
        bodies = {
            u: session_service_pb2.JoinSessionRequest(
                request_id=str(uuid.uuid4()), session_id=sid
            ).SerializeToString()
            for u in users
        }

        async def one(user: str) -> None:
            await call(
                bodies[user],
                metadata=(("authorization", f"Bearer {self.tokens[user]}"),),
                timeout=30,
            )

        return sid, await _drive("classmesh", one, users, latencies, errors)


# ------------------------------------------------------------------------------ raw SQL

_PERMISSIONS = json.dumps(
    {
        "can_publish_audio": True,
        "can_publish_video": True,
        "can_publish_screen": False,
        "can_subscribe": True,
        "can_chat": True,
        "can_draw": False,
        "can_ask_questions": True,
        "can_respond_to_polls": True,
        "can_raise_hand": True,
        "can_moderate": False,
        "can_record": False,
        "can_manage_breakouts": False,
        "can_present": False,
    }
)
_ACTOR = json.dumps({"user_id": "u", "display_name": "u", "role": "ROLE_STUDENT"})


_RAW_JOIN_SEAT = (
    "WITH s AS (UPDATE sessions AS s SET current_occupancy = s.current_occupancy + 1, "
    "last_seq = last_seq + 1 WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS "
    "NULL AND s.current_occupancy < s.capacity AND s.status = $3::session_status AND "
    "s.kind = $4::session_kind AND s.settings = $5::jsonb AND s.scheduled_end = $6 "
    "RETURNING s.*), p AS (INSERT INTO session_participants (id, tenant_id, session_id, "
    "user_id, display_name, role, status, joined_at, visit_started_at, admitted_at, "
    "connected_since, last_seen_at, connection_id, permissions) SELECT $7, s.tenant_id, "
    "s.id, $8::text, $8::text, 'student', 'admitted', $9, $9, $9, $9, $9, $10, "
    "$11::jsonb FROM s ON CONFLICT (session_id, user_id) DO NOTHING RETURNING *), e AS "
    "(INSERT INTO session_events (tenant_id, session_id, seq, type, payload, actor, "
    "request_id) SELECT s.tenant_id, s.id, s.last_seq, 'participant_joined', $12::jsonb "
    "|| jsonb_build_object('current_occupancy', s.current_occupancy), $13::jsonb, $14 "
    "FROM s, p RETURNING *) SELECT s.current_occupancy, s.last_seq, s.title, s.settings, "
    "(SELECT count(*) FROM session_participants lp WHERE lp.tenant_id = s.tenant_id AND "
    "lp.session_id = s.id AND lp.status = 'lobby') AS lobby_count, p.id AS pid, e.seq, "
    "e.payload::text AS payload, e.created_at FROM s LEFT JOIN p ON true LEFT JOIN e ON "
    "true"
)


def _participant_json(pid: uuid.UUID, sid: uuid.UUID, user: str, now: datetime) -> str:
    """A ParticipantJoined payload of the shape ClassMesh logs (protobuf JSON)."""
    at = now.isoformat().replace("+00:00", "Z")
    return json.dumps(
        {
            "participant": {
                "id": str(pid),
                "session_id": str(sid),
                "user_id": user,
                "display_name": user,
                "role": "ROLE_STUDENT",
                "status": "PARTICIPANT_STATUS_ADMITTED",
                "connection_state": "CONNECTION_STATE_CONNECTED",
                "permissions": json.loads(_PERMISSIONS),
                "joined_at": at,
                "admitted_at": at,
                "last_seen_at": at,
                "total_connected": "0s",
                "join_count": 1,
                "connection_id": str(uuid.uuid4()),
            }
        }
    )


class Raw:
    """The join transaction as plain statements, in SessionService.join's order.

    Same statements and effects as ClassMesh's first join: BEGIN; idempotency claim; one
    statement reading the session and the caller's participant status and upserting the
    user; ONE statement under the session row lock that claims the seat and the next seq
    (re-checking what the read saw), inserts the participant and appends the event (a
    participant payload of the same shape as ClassMesh's, its seat count filled in by the
    statement); the idempotency response (bytes of the size of a JoinSessionResponse);
    COMMIT; PUBLISH of the event row. The gap to ClassMesh is gRPC, auth, Python and
    protobuf."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, prefix: str, tenant: str) -> None:
        self.pool = pool
        self.redis = redis
        self.prefix = prefix
        self.tenant = uuid.UUID(tenant)
        # One room per round: its seat statements take turns here (SessionService._SeatQueue).
        self.seat_queue = asyncio.Lock()

    async def room(self) -> uuid.UUID:
        now = datetime.now(UTC)
        sid: uuid.UUID = await self.pool.fetchval(
            "INSERT INTO sessions (tenant_id, kind, title, instructor_id, scheduled_start, "
            "scheduled_end, status, capacity, join_link_token) VALUES "
            "($1, 'study_room', $2, 'system', $3, $4, 'live', $5, $6) RETURNING id",
            self.tenant,
            f"raw room {secrets.token_hex(3)}",
            now,
            now + timedelta(hours=2),
            SEATS,
            secrets.token_urlsafe(48),
        )
        return sid

    async def join(self, sid: uuid.UUID, user: str) -> None:
        request_id = str(uuid.uuid4())
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.fetchval(
                "INSERT INTO idempotency_keys (tenant_id, request_id, method, fingerprint, "
                "created_at, expires_at) VALUES ($1, $2, $3, $4, now(), now() + interval "
                "'24 hours') ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING true",
                self.tenant,
                request_id,
                JOIN,
                secrets.token_bytes(32),
            )
            # Before the lock: the session, the caller's participant status, the user.
            seen = await conn.fetchrow(
                "WITH u AS (INSERT INTO users (tenant_id, external_id, display_name, role) "
                "SELECT $2, $3::text, $3::text, 'student' WHERE NOT EXISTS (SELECT 1 FROM "
                "session_participants np WHERE np.tenant_id = $2 AND np.session_id = $1 "
                "AND np.user_id = $3::text) ON CONFLICT (tenant_id, external_id) DO NOTHING) "
                "SELECT s.status::text AS status, s.kind::text AS kind, s.settings::text "
                "AS settings, s.scheduled_end, s.current_occupancy, s.capacity, now() AS now, "
                "(SELECT cp.status::text FROM session_participants cp WHERE cp.tenant_id = "
                "s.tenant_id AND cp.session_id = s.id AND cp.user_id = $3) AS caller_status "
                "FROM sessions s WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS NULL",
                sid,
                self.tenant,
                user,
            )
            if seen is None or seen["caller_status"] is not None:
                raise RuntimeError("no session, or seat taken")
            now: datetime = seen["now"]
            pid = uuid.uuid4()
            participant = _participant_json(pid, sid, user, now)
            # Under the lock: seat + seq + participant + event, one statement.
            async with self.seat_queue:
                r = await conn.fetchrow(
                    _RAW_JOIN_SEAT,
                    sid,
                    self.tenant,
                    seen["status"],
                    seen["kind"],
                    seen["settings"],
                    seen["scheduled_end"],
                    pid,
                    user,
                    now,
                    uuid.uuid4(),
                    _PERMISSIONS,
                    participant,
                    _ACTOR,
                    request_id,
                )
            if r is None or r["pid"] is None:
                raise RuntimeError("room full, or changed")
            response = r["payload"].encode()  # ClassMesh's JoinSessionResponse: ~0.4 KB
            await conn.execute(
                "UPDATE idempotency_keys SET response = $3 WHERE tenant_id = $1 "
                "AND request_id = $2 AND response IS NULL",
                self.tenant,
                request_id,
                response,
            )
        await self.redis.publish(
            f"{self.prefix}:session:{sid}",
            json.dumps({"seq": r["seq"], "payload": r["payload"], "at": str(r["created_at"])}),
        )

    async def round(
        self, users: list[str], latencies: list[float], errors: list[str]
    ) -> tuple[str, float]:
        sid = await self.room()

        async def one(user: str) -> None:
            await self.join(sid, user)

        return str(sid), await _drive("raw", one, users, latencies, errors)


# ------------------------------------------------------------------------------ main


async def _check_seats(pool: asyncpg.Pool, sid: str, expected: int) -> None:
    row = await pool.fetchrow(
        "SELECT current_occupancy, capacity, (SELECT count(*) FROM session_participants p "
        "WHERE p.session_id = s.id AND p.status IN ('lobby', 'admitted', 'disconnected')) AS held "
        "FROM sessions s WHERE id = $1",
        uuid.UUID(sid),
    )
    assert row is not None
    if not (row["current_occupancy"] == row["held"] == expected <= row["capacity"]):
        raise AssertionError(f"seat count drifted in {sid}: {dict(row)} expected {expected}")


def _figure(case: str, latencies: list[float], seconds: float, errors: list[str]) -> Figure:
    latencies.sort()
    return Figure(
        case=case,
        joins=len(latencies),
        seconds=round(seconds, 3),
        joins_per_s=len(latencies) / seconds if seconds else 0.0,
        p50_ms=percentile(latencies, 50) * 1000,
        p95_ms=percentile(latencies, 95) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        errors=len(errors),
        first_error=errors[0] if errors else "",
    )


async def main() -> int:
    lat: dict[str, list[float]] = {"classmesh": [], "raw": []}
    secs: dict[str, float] = {"classmesh": 0.0, "raw": 0.0}
    errs: dict[str, list[str]] = {"classmesh": [], "raw": []}
    with tempfile.TemporaryDirectory(prefix="cm_bench_join_") as tmp_s:
        tmp = Path(tmp_s)
        async with throwaway_database() as dsn:
            prefix = redis_prefix("join")
            env = mesh_env(dsn, prefix, tmp / "data", CLASSMESH_RATE_LIMIT_PER_MINUTE="0")
            server = await start_server(["-m", "classmesh.cli", "up"], env, tmp / "up.stderr")
            pool = await create_pool(dsn, max_size=POOL_SIZE)
            redis = aioredis.from_url(REDIS_URL)
            try:
                mesh = Mesh(server.target, server.token, server.tenant_id)
                await mesh.setup()
                raw = Raw(pool, redis, prefix, server.tenant_id)
                for case, runner in (("classmesh", mesh), ("raw", raw)):
                    users = [f"{case[0]}w-{i}-{secrets.token_hex(3)}" for i in range(WARMUP)]
                    warm_errors: list[str] = []
                    sid, _ = await runner.round(users, [], warm_errors)
                    if warm_errors:
                        raise RuntimeError(warm_errors[0])
                    await _check_seats(pool, sid, WARMUP)
                for n in range(ROUNDS):
                    for case in ("classmesh", "raw") if n % 2 == 0 else ("raw", "classmesh"):
                        users = [f"{case[0]}{n}-{i}-{secrets.token_hex(3)}" for i in range(SEATS)]
                        runner = mesh if case == "classmesh" else raw
                        sid, took = await runner.round(users, lat[case], errs[case])
                        secs[case] += took
                        if errs[case]:
                            raise RuntimeError(errs[case][0])
                        await _check_seats(pool, sid, SEATS)
            finally:
                await redis.aclose()
                await pool.close()
                await server.stop()
                await mesh.channel.close()

    figures = [_figure(c, lat[c], secs[c], errs[c]) for c in ("classmesh", "raw")]
    print_table(
        f"JoinSession, {CLIENTS} concurrent clients on one session, {ROUNDS} x {SEATS} joins "
        f"(after {WARMUP} warm-up joins each)",
        ["case", "joins", "joins/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
        [(f.case, f.joins, f.joins_per_s, f.p50_ms, f.p95_ms, f.p99_ms, f.errors) for f in figures],
    )
    cm, rw = figures
    r = ratio(cm.joins_per_s, rw.joins_per_s)
    print(f"ratio ClassMesh/raw (joins/s): {r}   goal: p95 < 200 ms and ratio >= 0.5")
    for f in figures:
        if f.first_error:
            print(f"first {f.case} error: {f.first_error}")
    print_json("join", {"figures": [asdict(f) for f in figures], "ratio": r})
    return 1 if cm.errors or rw.errors else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
