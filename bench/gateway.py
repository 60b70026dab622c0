"""The grpc-web gateway against direct gRPC, in the same run on the same `classmesh up`.

Unary: AdminService.GetTenant (one pooled SELECT, limiter off) at 1, 16 and 64 calls in
flight, three ways, each point measured right after the others so load from elsewhere moves
all of them:

* direct     grpc.aio generic calls on one channel straight to the mesh port;
* gateway    grpc-web POSTs (aiohttp client, keep-alive, one connection per call in flight)
             to the gateway `classmesh up` runs in the mesh process;
* gw-proc    the same to `classmesh serve gateway` in a process of its own.

ratio = gateway req/s / direct req/s (goal >= 0.55, FINDINGS' aiohttp-proxy baseline).

Stream fan-out: one live class, N subscribers (default 200) on `InteractionService.Subscribe`
(tenant admin tokens: readers need not join), first N direct gRPC streams, then N grpc-web
HTTP/1.1 streams through the gateway; the instructor posts chat messages at RATE per second
whose text carries the send time (monotonic clock, same process); latency = send call
started -> a subscriber parsed the event. p50/p95/p99 per path and deliveries missing after
the drain.

Run: .venv/bin/python bench/gateway.py [--duration S] [--subscribers N] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import grpc
from _common import (
    Server,
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
from classmesh.interaction.v1 import interaction_service_pb2 as RX
from classmesh.session.v1 import session_pb2
from classmesh_sdk import AccessToken, ClassMeshClient

INFLIGHT = (1, 16, 64)
WARMUP_S = 0.4
GET_TENANT = "/classmesh.admin.v1.AdminService/GetTenant"
SUBSCRIBE = "/classmesh.interaction.v1.InteractionService/Subscribe"
SEND_CHAT = "/classmesh.interaction.v1.InteractionService/SendChatMessage"
GRPC_WEB = "application/grpc-web+proto"
STREAMS_PER_CHANNEL = 50
GOAL = 0.55


@dataclass
class Point:
    path: str
    inflight: int
    rps: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int


def _point(path: str, inflight: int, latencies: list[float], errors: int, window: float) -> Point:
    latencies.sort()
    return Point(
        path=path,
        inflight=inflight,
        rps=len(latencies) / window,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        calls=len(latencies),
        errors=errors,
    )


async def _closed_loop(
    inflight: int, window: float, one_call: Callable[[], Awaitable[bool]]
) -> tuple[list[float], int]:
    """`inflight` workers call back to back; calls started inside the window count."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    window_start = start + WARMUP_S
    window_end = window_start + window

    async def worker() -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= window_end:
                return
            ok = await one_call()
            if t0 >= window_start:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return latencies, errors


async def drive_direct(target: str, token: str, inflight: int, window: float) -> Point:
    async with grpc.aio.insecure_channel(target) as ch:
        await ch.channel_ready()
        call = ch.unary_unary(GET_TENANT)
        md = (("authorization", f"Bearer {token}"),)

        async def one() -> bool:
            try:
                await call(b"", metadata=md, timeout=10)
            except grpc.aio.AioRpcError:
                return False
            return True

        lat, errors = await _closed_loop(inflight, window, one)
    return _point("direct", inflight, lat, errors, window)


async def drive_gateway(path: str, url: str, token: str, inflight: int, window: float) -> Point:
    body = b"\0\0\0\0\0"  # one empty GetTenantRequest frame
    headers = {"content-type": GRPC_WEB, "x-grpc-web": "1", "authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> bool:
            try:
                async with http.post(url + GET_TENANT, data=body, headers=headers) as resp:
                    data = await resp.read()
                    return resp.status == 200 and b"grpc-status: 0\r\n" in data
            except aiohttp.ClientError:
                return False

        lat, errors = await _closed_loop(inflight, window, one)
    return _point(path, inflight, lat, errors, window)


# ------------------------------------------------------------------------- fan-out


def _token(key_id: str, secret: str, tenant: str, sub: str, role: str) -> str:
    caps = ["subscribe", "chat", "moderate"] if role != "student" else ["subscribe", "chat"]
    return (
        AccessToken(key_id, secret)
        .with_tenant(tenant)
        .with_identity(sub, sub)
        .with_grants(session="*", role=role, caps=caps)
        .with_ttl(timedelta(hours=2))
        .to_jwt()
    )


@dataclass
class FanoutFigure:
    path: str
    subscribers: int
    messages: int
    delivered: int
    missing: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


class Receivers:
    """Latencies of tagged chat messages as subscribers parse them."""

    def __init__(self, phase: str) -> None:
        #: Tags of this phase's messages: earlier phases' messages replay and are skipped.
        self.measure, self.warm = f"m-{phase}", f"w-{phase}"
        self.latencies: list[float] = []
        #: Subscribers (by index) that saw a warm-up message.
        self.ready: set[int] = set()

    def on_message(self, idx: int, raw: bytes) -> None:
        now = time.monotonic()
        event = RX.SubscribeResponse.FromString(raw).event
        if event.WhichOneof("payload") != "chat_message_posted":
            return
        tag, _, sent = event.chat_message_posted.message.text.partition(" ")
        if tag == self.measure:
            self.latencies.append(now - float(sent))
        elif tag == self.warm:
            self.ready.add(idx)


async def _direct_subscriber(
    idx: int, ch: grpc.aio.Channel, request: bytes, token: str, rx: Receivers
) -> None:
    call = ch.unary_stream(SUBSCRIBE)(request, metadata=(("authorization", f"Bearer {token}"),))
    try:
        async for raw in call:
            rx.on_message(idx, raw)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        call.cancel()


async def _gateway_subscriber(
    idx: int, http: aiohttp.ClientSession, url: str, request: bytes, token: str, rx: Receivers
) -> None:
    headers = {"content-type": GRPC_WEB, "x-grpc-web": "1", "authorization": f"Bearer {token}"}
    body = struct.pack(">BI", 0, len(request)) + request
    try:
        async with http.post(url + SUBSCRIBE, data=body, headers=headers) as resp:
            content = resp.content
            while True:
                head = await content.readexactly(5)
                flag, length = struct.unpack(">BI", head)
                payload = await content.readexactly(length)
                if flag & 0x80:
                    return
                rx.on_message(idx, payload)
    except (aiohttp.ClientError, asyncio.IncompleteReadError, asyncio.CancelledError):
        return


async def run_fanout(
    path: str,
    open_streams: Callable[[Receivers], Awaitable[list[asyncio.Task[None]]]],
    send: Callable[[str], Awaitable[None]],
    n: int,
    rate: float,
    duration: float,
) -> FanoutFigure:
    rx = Receivers(path)
    tasks = await open_streams(rx)
    # Ready when every subscriber saw a warm-up message.
    deadline = time.monotonic() + 60
    while len(rx.ready) < n:
        assert time.monotonic() < deadline, f"{path}: only {len(rx.ready)} of {n} ready"
        await send(rx.warm)
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)  # let the last warm-up messages drain
    messages = max(1, int(rate * duration))
    start = time.monotonic()
    sends = []
    for i in range(messages):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(send(rx.measure)))
    await asyncio.gather(*sends)
    drain_end = time.monotonic() + 3.0
    while len(rx.latencies) < messages * n and time.monotonic() < drain_end:
        await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(rx.latencies)
    return FanoutFigure(
        path=path,
        subscribers=n,
        messages=messages,
        delivered=len(lat),
        missing=messages * n - len(lat),
        p50_ms=percentile(lat, 50) * 1000,
        p95_ms=percentile(lat, 95) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
    )


def _gateway_url(server: Server) -> str:
    for line in server.lines:
        if line.startswith("gateway: "):
            return line.split(" ", 1)[1]
    raise RuntimeError("no gateway line: " + "\n".join(server.lines))


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cm_bench_gateway_"))
    window = args.duration
    async with throwaway_database() as dsn:
        env = mesh_env(
            dsn,
            redis_prefix("gateway"),
            tmp / "data",
            CLASSMESH_RATE_LIMIT_PER_MINUTE="0",
            CLASSMESH_CHAT_MESSAGES_PER_MINUTE="1000000",
            CLASSMESH_HEARTBEAT_INTERVAL_SECONDS="600",
            CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS="7200",
            CLASSMESH_LOG_LEVEL="WARNING",
        )
        mesh = await start_server(["-m", "classmesh.cli", "up"], env, tmp / "mesh.log")
        gw_env = {**env, "CLASSMESH_PEER_TARGET": mesh.target}
        proc_gw = await start_server(
            ["-m", "classmesh.cli", "serve", "gateway"], gw_env, tmp / "gateway.log"
        )
        try:
            gw_url, proc_url = _gateway_url(mesh), _gateway_url(proc_gw)
            print(f"# mesh {mesh.target}, gateway {gw_url} (in up), {proc_url} (own process)")
            # ------------------------------------------------------------------ unary
            points: list[Point] = []
            for n in INFLIGHT:
                points.append(await drive_direct(mesh.target, mesh.token, n, window))
                points.append(await drive_gateway("gateway", gw_url, mesh.token, n, window))
                points.append(await drive_gateway("gw-proc", proc_url, mesh.token, n, window))
            direct = {p.inflight: p for p in points if p.path == "direct"}
            rows = [
                (
                    p.path,
                    p.inflight,
                    p.rps,
                    p.p50_ms,
                    p.p99_ms,
                    ratio(p.rps, direct[p.inflight].rps),
                    p.errors,
                )
                for p in points
            ]
            print_table(
                "unary AdminService.GetTenant (ratio = req/s / direct req/s at the same "
                f"concurrency; goal >= {GOAL})",
                ["path", "in flight", "req/s", "p50 ms", "p99 ms", "ratio", "errors"],
                rows,
            )
            # ---------------------------------------------------------------- fan-out
            async with ClassMeshClient(mesh.target, token=mesh.token) as admin:
                key = await admin.admin.create_api_key(name="bench gateway")
            kid, secret, tenant = key.api_key.id, key.secret, mesh.tenant_id
            teacher = _token(kid, secret, tenant, "teacher", "instructor")
            reader = _token(kid, secret, tenant, "reader", "admin")
            async with ClassMeshClient(mesh.target, token=teacher) as t:
                start = datetime.now(UTC) + timedelta(minutes=1)
                s = await t.sessions.create_session(
                    title="gateway bench",
                    scheduled_start=timestamp_pb2.Timestamp(seconds=int(start.timestamp())),
                    scheduled_end=timestamp_pb2.Timestamp(seconds=int(start.timestamp()) + 7200),
                    capacity=1000,
                    settings=session_pb2.SessionSettings(lobby_enabled=False, chat_enabled=True),
                )
                sid = s.session.id
                await t.sessions.start_session(session_id=sid)
                joined = await t.sessions.join_session(session_id=sid)
            subscribe = RX.SubscribeRequest(
                scope=common_pb2.Scope(session_id=sid), after_seq=joined.last_seq
            ).SerializeToString()
            send_ch = grpc.aio.insecure_channel(mesh.target)
            send_call = send_ch.unary_unary(
                SEND_CHAT,
                request_serializer=RX.SendChatMessageRequest.SerializeToString,
                response_deserializer=RX.SendChatMessageResponse.FromString,
            )

            async def send(tag: str) -> None:
                req = RX.SendChatMessageRequest(
                    request_id=str(uuid.uuid4()),
                    scope=common_pb2.Scope(session_id=sid),
                    text=f"{tag} {time.monotonic():.6f}",
                )
                await send_call(req, metadata=(("authorization", f"Bearer {teacher}"),))

            n = args.subscribers
            channels: list[grpc.aio.Channel] = []
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

            async def open_direct(rx: Receivers) -> list[asyncio.Task[None]]:
                for _ in range((n + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL):
                    channels.append(grpc.aio.insecure_channel(mesh.target))
                return [
                    asyncio.create_task(
                        _direct_subscriber(
                            i, channels[i // STREAMS_PER_CHANNEL], subscribe, reader, rx
                        )
                    )
                    for i in range(n)
                ]

            async def open_gateway(rx: Receivers) -> list[asyncio.Task[None]]:
                return [
                    asyncio.create_task(_gateway_subscriber(i, http, gw_url, subscribe, reader, rx))
                    for i in range(n)
                ]

            try:
                fan = [
                    await run_fanout("direct", open_direct, send, n, args.rate, args.fanout_s),
                    await run_fanout("gateway", open_gateway, send, n, args.rate, args.fanout_s),
                ]
            finally:
                await http.close()
                for ch in channels:
                    await ch.close()
                await send_ch.close()
            print_table(
                f"fan-out: {n} subscribers, {args.rate:g} chat messages/s for {args.fanout_s:g} s "
                "(latency = send started -> event parsed by a subscriber)",
                ["path", "subs", "msgs", "delivered", "missing", "p50 ms", "p95 ms", "p99 ms"],
                [
                    (
                        f.path,
                        f.subscribers,
                        f.messages,
                        f.delivered,
                        f.missing,
                        f.p50_ms,
                        f.p95_ms,
                        f.p99_ms,
                    )
                    for f in fan
                ],
            )
        finally:
            await proc_gw.stop()
            await mesh.stop()
    ratios = {
        f"{p.path}@{p.inflight}": ratio(p.rps, direct[p.inflight].rps)
        for p in points
        if p.path != "direct"
    }
    print(f"gateway/direct unary ratios: {ratios}")
    print(
        "fan-out p95 ms: direct {:.1f}, gateway {:.1f} (x{:.2f})".format(
            fan[0].p95_ms, fan[1].p95_ms, ratio(fan[1].p95_ms, fan[0].p95_ms)
        )
    )
    print_json(
        "gateway",
        {
            "unary": [asdict(p) for p in points],
            "ratios": ratios,
            "fanout": [asdict(f) for f in fan],
        },
    )
    failed = any(p.calls == 0 for p in points) or any(f.delivered == 0 for f in fan)
    return 1 if failed else 0


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=2.0, help="seconds per unary point")
    p.add_argument("--subscribers", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="chat messages per second")
    p.add_argument("--fanout-s", type=float, default=4.0, help="seconds of fan-out per path")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_args())))
