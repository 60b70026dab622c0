"""Chat fan-out end to end: one class with 500 subscribers, senders at a rising rate through
`SendChatMessage`, against a bare grpc.aio fan-out server with the same subscribers.

* classmesh  `classmesh up` on a throwaway database: 500 students joined through
             SessionService.JoinSession, each with its own `InteractionService.Subscribe`
             stream; senders call `SendChatMessage` (auth, validation, per-user chat limit on
             Redis, transaction + event log, Redis publish, bus fan-out, per-subscriber view).
* bare       the raw limit: `_fanout_server.py`, a grpc.aio server whose `Send` puts the
             bytes it gets into every subscriber's queue and whose `Subscribe` streams them
             (no auth, database, Redis or protobuf work on the server). The sender sends a
             serialized `SubscribeResponse` of the same shape and size as ClassMesh's.

The subscribers live in WORKERS client processes (the same code reads both systems, parsing
every message as a `SubscribeResponse`); the machine also runs the server and the sender,
as FINDINGS' figures were measured. Every message carries its send time (monotonic clock,
shared by the processes on Linux); latency = send call started -> a subscriber parsed it.
For each offered rate (messages/s, open loop, STEP_S seconds; the two systems alternate step
by step, so load from elsewhere on the machine moves both) the table shows the delivered
messages per second (deliveries / time from the first send to the last receipt), p50/p95/p99
latency, and deliveries missing after the drain. Summary: per system, the highest delivered
rate sustained with p95 < 100 ms (that step and every lower one), and their ratio (goal:
ClassMesh >= 0.7 x bare).

Run: .venv/bin/python bench/bench_fanout_chat.py   (about 3 minutes)
Options: --subscribers N (500), --workers N (4), --rates 4,8,... (messages/s), --step S (4).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from _common import (
    ROOT,
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

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh.interaction.v1 import interaction_pb2, interaction_service_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import AccessToken, ClassMeshClient

RX = interaction_service_pb2
SUBSCRIBE = "/classmesh.interaction.v1.InteractionService/Subscribe"
SEND = "/classmesh.interaction.v1.InteractionService/SendChatMessage"
BARE_SUBSCRIBE = "/bench.Fanout/Subscribe"
BARE_SEND = "/bench.Fanout/Send"
RATES = (4, 8, 12, 16, 18, 20, 22, 24, 28, 32)
STEP_S = 4.0
DRAIN_S = 3.0
SENDERS = 10
STREAMS_PER_CHANNEL = 50
GOAL_P95_MS = 100.0


# ================================================================================ worker


async def worker(args: argparse.Namespace) -> None:
    """Open `count` subscriptions, record every message, report on 'stop'."""
    tokens = json.loads(Path(args.tokens).read_text())[args.offset : args.offset + args.count]
    bare = args.system == "bare"
    steps: dict[str, list[float]] = {}
    last_recv: dict[str, float] = {}
    disorder = 0
    warm: set[int] = set()
    ready_printed = False
    channels = [
        grpc.aio.insecure_channel(args.target)
        for _ in range((len(tokens) + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    request = RX.SubscribeRequest(
        scope=common_pb2.Scope(session_id=args.session), after_seq=args.after_seq
    ).SerializeToString()

    async def stream(i: int, token: str) -> None:
        nonlocal disorder, ready_printed
        channel = channels[i // STREAMS_PER_CHANNEL]
        call = channel.unary_stream(
            BARE_SUBSCRIBE if bare else SUBSCRIBE,
            request_serializer=None,
            response_deserializer=RX.SubscribeResponse.FromString,
        )(request, metadata=(("authorization", f"Bearer {token}"),))
        last_seq = 0
        async for response in call:
            now = time.monotonic()
            event = response.event
            if event.seq <= last_seq:
                disorder += 1
            last_seq = event.seq
            if event.WhichOneof("payload") != "chat_message_posted":
                continue
            text = event.chat_message_posted.message.text
            tag, _, sent = text.partition(" ")
            if tag == "w":
                if i not in warm:
                    warm.add(i)
                    if len(warm) == len(tokens) and not ready_printed:
                        ready_printed = True
                        print("ready", flush=True)
                continue
            steps.setdefault(tag, []).append(round((now - float(sent)) * 1000, 3))
            last_recv[tag] = max(last_recv.get(tag, 0.0), now)

    tasks = [asyncio.create_task(stream(i, t)) for i, t in enumerate(tokens)]
    print("subscribed", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
    errors = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close()
    print(
        json.dumps({"steps": steps, "last": last_recv, "disorder": disorder, "errors": errors}),
        flush=True,
    )


# ================================================================================ driver


@dataclass
class Figure:
    system: str
    offered_msgs_per_s: int
    delivered_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    deliveries: int
    missing: int


class Workers:
    """WORKERS subprocesses holding the subscriptions of one system."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(
        self, system: str, target: str, session: str, after_seq: int, tokens: Path, n: int, w: int
    ) -> None:
        per = (n + w - 1) // w
        for i in range(w):
            count = min(per, n - i * per)
            if count <= 0:
                break
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--system", system,
                "--target", target,
                "--session", session,
                "--after-seq", str(after_seq),
                "--tokens", str(tokens),
                "--offset", str(i * per),
                "--count", str(count),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=str(ROOT),
                limit=1 << 28,  # the report is one long JSON line
            )  # fmt: skip
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.strip() == b"subscribed", line

    async def wait_ready(self, warm: Any) -> None:
        """Send warm-up messages until every subscription of every worker saw one."""
        pending = [asyncio.create_task(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]
        async with asyncio.timeout(120):
            while not all(t.done() for t in pending):
                await warm()
                await asyncio.wait(pending, timeout=0.5)
        for t in pending:
            assert t.result().strip() == b"ready", t.result()

    async def stop(self) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            out.append(json.loads(line))
            await proc.wait()
        self.procs = []
        return out


def _event_bytes(session: str, seq: int, text: str) -> bytes:
    """A SubscribeResponse shaped like ClassMesh's chat_message_posted (for the bare server)."""
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    actor = common_pb2.Actor(
        user_id="sender-0001",
        display_name="student sender-0001",
        role=common_pb2.ROLE_STUDENT,
        kind=common_pb2.ACTOR_KIND_USER,
        participant_id=str(uuid.uuid4()),
    )
    event = events_pb2.Event(seq=seq, session_id=session, actor=actor, request_id=str(uuid.uuid4()))
    event.time.CopyFrom(now)
    msg = event.chat_message_posted.message
    msg.id = str(uuid.uuid4())
    msg.scope.session_id = session
    msg.sender.CopyFrom(actor)
    msg.text = text
    msg.type = interaction_pb2.CHAT_MESSAGE_TYPE_TEXT
    msg.send_time.CopyFrom(now)
    msg.seq = seq
    return RX.SubscribeResponse(event=event).SerializeToString()


class System:
    """One system under test: how to send, who subscribes, what was sent when."""

    def __init__(self, name: str, send: Any, workers: Workers) -> None:
        self.name = name
        self.send = send
        self.workers = workers
        self.first_send: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.failures: list[str] = []
        self.inflight: set[asyncio.Task[None]] = set()

    async def _one(self, tag: str) -> None:
        try:
            await self.send(tag)
        except Exception as exc:  # a refused send shows up as missing deliveries
            self.failures.append(repr(exc))

    async def step(self, tag: str, rate: int) -> None:
        """Open loop: `rate` sends a second for STEP_S seconds, then DRAIN_S to settle."""
        interval = 1.0 / rate
        start = time.monotonic()
        self.first_send[tag] = start
        n = 0
        while start + n * interval < start + STEP_S:
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(tag))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            n += 1
        self.sent[tag] = n
        await asyncio.sleep(DRAIN_S)

    async def figures(
        self, rates: list[int], subscribers: int
    ) -> tuple[list[Figure], dict[str, Any]]:
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=30)
        results = await self.workers.stop()
        out = []
        for step, rate in enumerate(rates):
            tag = f"s{step}"
            lat = sorted(x for r in results for x in r["steps"].get(tag, []))
            last = max((r["last"].get(tag, 0.0) for r in results), default=0.0)
            span = max(last - self.first_send[tag], STEP_S) if lat else STEP_S
            out.append(
                Figure(
                    system=self.name,
                    offered_msgs_per_s=rate,
                    delivered_per_s=round(len(lat) / span, 1),
                    p50_ms=round(percentile(lat, 50), 2),
                    p95_ms=round(percentile(lat, 95), 2),
                    p99_ms=round(percentile(lat, 99), 2),
                    deliveries=len(lat),
                    missing=self.sent[tag] * subscribers - len(lat),
                )
            )
        checks = {
            "out_of_order": sum(r["disorder"] for r in results),
            "errors": ([e for r in results for e in r["errors"]] + self.failures)[:3],
        }
        return out, checks


def _token(key_id: str, secret: str, tenant: str, sub: str, role: str) -> str:
    caps = ["subscribe", "chat", "moderate"] if role == "instructor" else ["subscribe", "chat"]
    return (
        AccessToken(key_id, secret)
        .with_tenant(tenant)
        .with_identity(sub, sub)
        .with_grants(session="*", role=role, caps=caps)
        .with_ttl(timedelta(hours=2))
        .to_jwt()
    )


async def driver(args: argparse.Namespace) -> None:
    n = args.subscribers
    rates = [int(r) for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cm_fanout_chat_"))
    async with throwaway_database() as dsn:
        env = mesh_env(
            dsn,
            redis_prefix("fanout_chat"),
            tmp / "data",
            CLASSMESH_CHAT_MESSAGES_PER_MINUTE="1000000",
            CLASSMESH_RATE_LIMIT_PER_MINUTE="0",
            CLASSMESH_HEARTBEAT_INTERVAL_SECONDS="600",
            CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS="7200",
            CLASSMESH_LOG_LEVEL="WARNING",
        )
        mesh = await start_server(["-m", "classmesh.cli", "up"], env, tmp / "mesh.log")
        bare = await start_server(
            [str(ROOT / "bench" / "_fanout_server.py")], dict(os.environ), tmp / "bare.log"
        )
        try:
            # ---------------------------------------------------------------- the class
            async with ClassMeshClient(mesh.target, token=mesh.token) as admin:
                key = await admin.admin.create_api_key(name="bench fanout chat")
            kid, secret, tenant = key.api_key.id, key.secret, mesh.tenant_id
            teacher_tok = _token(kid, secret, tenant, "teacher", "instructor")
            async with ClassMeshClient(mesh.target, token=teacher_tok) as teacher:
                start = datetime.now(UTC) + timedelta(minutes=1)
                s = await teacher.sessions.create_session(
                    title="fan-out bench",
                    scheduled_start=timestamp_pb2.Timestamp(seconds=int(start.timestamp())),
                    scheduled_end=timestamp_pb2.Timestamp(seconds=int(start.timestamp()) + 7200),
                    capacity=1000,
                    settings=session_pb2.SessionSettings(lobby_enabled=False, chat_enabled=True),
                )
                sid = s.session.id
                await teacher.sessions.start_session(session_id=sid)
                await teacher.sessions.join_session(session_id=sid)
            subs = [_token(kid, secret, tenant, f"sub-{i:04d}", "student") for i in range(n)]
            senders = [
                _token(kid, secret, tenant, f"sender-{i:02d}", "student") for i in range(SENDERS)
            ]
            sem = asyncio.Semaphore(50)

            async def join(tok: str) -> int:
                async with sem, ClassMeshClient(mesh.target, token=tok) as c:
                    return int((await c.sessions.join_session(session_id=sid)).last_seq)

            t0 = time.monotonic()
            after = max(await asyncio.gather(*(join(t) for t in [*subs, *senders])))
            print(
                f"# {n + SENDERS} participants joined in {time.monotonic() - t0:.1f} s", flush=True
            )
            tokens = tmp / "tokens.json"
            tokens.write_text(json.dumps(subs))

            figures: list[Figure] = []
            checks: dict[str, Any] = {}

            # ---------------------------------------------------------------- bare
            bare_ch = grpc.aio.insecure_channel(bare.target)
            bare_send = bare_ch.unary_unary(
                BARE_SEND, request_serializer=None, response_deserializer=None
            )
            seq = 0

            async def send_bare(tag: str) -> None:
                nonlocal seq
                seq += 1
                await bare_send(_event_bytes(sid, seq, f"{tag} {time.monotonic():.6f}"), timeout=30)

            # ---------------------------------------------------------------- classmesh
            mesh_ch = grpc.aio.insecure_channel(mesh.target)
            cm_send = mesh_ch.unary_unary(
                SEND,
                request_serializer=RX.SendChatMessageRequest.SerializeToString,
                response_deserializer=RX.SendChatMessageResponse.FromString,
            )
            turn = 0

            async def send_cm(tag: str) -> None:
                nonlocal turn
                turn += 1
                token = senders[turn % SENDERS]
                sent = time.monotonic()
                req = RX.SendChatMessageRequest(
                    request_id=str(uuid.uuid4()),
                    scope=common_pb2.Scope(session_id=sid),
                    text=f"{tag} {sent:.6f}",
                )
                await cm_send(req, metadata=(("authorization", f"Bearer {token}"),), timeout=30)

            # Both systems' subscribers stay connected throughout and the steps alternate
            # (bare at rate r, then ClassMesh at rate r): load from elsewhere on the machine
            # moves both.
            systems = [
                System("bare", send_bare, Workers()),
                System("classmesh", send_cm, Workers()),
            ]
            await systems[0].workers.start("bare", bare.target, sid, 0, tokens, n, args.workers)
            await systems[0].workers.wait_ready(lambda: send_bare("w"))
            await systems[1].workers.start(
                "classmesh", mesh.target, sid, after, tokens, n, args.workers
            )
            await systems[1].workers.wait_ready(lambda: send_cm("w"))
            for step, rate in enumerate(rates):
                for system in systems:
                    await system.step(f"s{step}", rate)
            for system in systems:
                got, checks[system.name] = await system.figures(rates, n)
                figures += got
            await bare_ch.close()
            await mesh_ch.close()
        finally:
            await mesh.stop()
            await bare.stop()

    # -------------------------------------------------------------------- report
    headers = ["offered msg/s", "delivered/s", "p50 ms", "p95 ms", "p99 ms", "missing"]
    for system in ("bare", "classmesh"):
        rows = [
            [f.offered_msgs_per_s, f.delivered_per_s, f.p50_ms, f.p95_ms, f.p99_ms, f.missing]
            for f in figures
            if f.system == system
        ]
        print_table(f"{system}: {n} subscribers in {args.workers} client processes", headers, rows)

    def best(system: str) -> Figure | None:
        """The highest step that kept p95 < 100 ms with nothing missing, as did every lower
        step (a lucky step above a failing one does not count)."""
        out = None
        for f in (f for f in figures if f.system == system):
            if f.p95_ms >= GOAL_P95_MS or f.missing:
                break
            out = f
        return out

    b, c = best("bare"), best("classmesh")
    bare_rate = b.delivered_per_s if b else 0.0
    cm_rate = c.delivered_per_s if c else 0.0
    print_table(
        f"summary: highest rate sustained with p95 < {GOAL_P95_MS:.0f} ms, nothing missing",
        ["system", "delivered/s", "p50 ms", "p95 ms", "p99 ms", "at offered msg/s"],
        [
            [s, f.delivered_per_s, f.p50_ms, f.p95_ms, f.p99_ms, f.offered_msgs_per_s]
            for s, f in (("bare", b), ("classmesh", c))
            if f is not None
        ],
    )
    print(f"ratio classmesh / bare = {ratio(cm_rate, bare_rate)} (goal >= 0.7)")
    print(f"checks: {checks}")
    print_json(
        "fanout_chat",
        {
            "subscribers": n,
            "workers": args.workers,
            "ratio": ratio(cm_rate, bare_rate),
            "best": {"bare": asdict(b) if b else None, "classmesh": asdict(c) if c else None},
            "figures": [asdict(f) for f in figures],
            "checks": checks,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--system", default="classmesh")
    p.add_argument("--target", default="")
    p.add_argument("--session", default="")
    p.add_argument("--after-seq", type=int, default=0)
    p.add_argument("--tokens", default="")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--subscribers", type=int, default=500)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rates", default=",".join(str(r) for r in RATES))
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(worker(args) if args.worker else driver(args))


if __name__ == "__main__":
    main()
