"""Unary RPC throughput and latency: ClassMesh vs a bare grpc.aio echo server (the raw limit).

Cases, each at 1, 16 and 64 calls in flight, all driven by the same client code (raw
grpc.aio generic calls on one channel, requests serialised before the clock starts, an
`authorization: Bearer <JWT-sized>` header on every call):

* bare      a grpc.aio echo server in a subprocess (generic handler, raw bytes, no
            interceptors): the raw limit of this machine right now;
* get       `classmesh up` AdminService.GetTenant through the full interceptor chain
            (telemetry + errors + auth + rate limit) with the limiter off
            (CLASSMESH_RATE_LIMIT_PER_MINUTE=0): one pooled SELECT per call;
* get+rl    the same with the limiter on at a limit no caller reaches (one Redis EVALSHA
            per call): the difference to `get` is the limiter's cost;
* create    AdminService.CreateApiKey with a unique request_id per call: a full mutation
            (transaction + idempotency row + INSERT + stored response).

Every ClassMesh point is paired with a bare point measured right before it (the echo server
runs throughout), so load from elsewhere on a shared machine moves both. Prints one table
per case, a summary with ratio = ClassMesh / bare at the same concurrency, and one JSON
line. Run: .venv/bin/python bench/bench_unary.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

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

from classmesh.admin.v1 import admin_service_pb2

INFLIGHT = (1, 16, 64)
WARMUP_S = 0.4
MEASURE_S = 2.0
ECHO_METHOD = "/bench.Echo/Echo"
GET_TENANT = "/classmesh.admin.v1.AdminService/GetTenant"
CREATE_API_KEY = "/classmesh.admin.v1.AdminService/CreateApiKey"
BARE_BODY = b""  # what GetTenantRequest() serialises to
# The bare server ignores the token; one of a JWT's size is sent so every case pays the same.
BARE_MD = (("authorization", "Bearer " + "x" * 300),)


@dataclass
class Point:
    case: str
    inflight: int
    rps: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    first_error: str


async def drive(
    channel: grpc.aio.Channel,
    case: str,
    method: str,
    request: Callable[[], bytes],
    metadata: tuple[tuple[str, str], ...],
    inflight: int,
) -> Point:
    """`inflight` workers call back to back; calls that start inside the window count."""
    call = channel.unary_unary(method)  # no serializers: raw bytes in, raw bytes out
    latencies: list[float] = []
    errors = 0
    first_error = ""
    start = time.perf_counter()
    window_start = start + WARMUP_S
    window_end = window_start + MEASURE_S

    async def worker() -> None:
        nonlocal errors, first_error
        while True:
            body = request()
            t0 = time.perf_counter()
            if t0 >= window_end:
                return
            try:
                await call(body, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as err:
                if t0 >= window_start:
                    errors += 1
                    first_error = first_error or f"{err.code().name}: {err.details()}"
                continue
            t1 = time.perf_counter()
            if t0 >= window_start:
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    latencies.sort()
    return Point(
        case=case,
        inflight=inflight,
        rps=len(latencies) / MEASURE_S,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        calls=len(latencies),
        errors=errors,
        first_error=first_error,
    )


async def run_case(
    bare_target: str,
    target: str,
    case: str,
    method: str,
    request: Callable[[], bytes],
    metadata: tuple[tuple[str, str], ...],
) -> list[tuple[Point, Point]]:
    """Each ClassMesh point is paired with a bare-echo point measured just before it, so
    both see the same machine (other load on a shared machine moves both)."""
    pairs: list[tuple[Point, Point]] = []
    async with (
        grpc.aio.insecure_channel(bare_target) as bare_channel,
        grpc.aio.insecure_channel(target) as channel,
    ):
        await bare_channel.channel_ready()
        await channel.channel_ready()
        for n in INFLIGHT:
            bare = await drive(bare_channel, "bare", ECHO_METHOD, lambda: BARE_BODY, BARE_MD, n)
            point = await drive(channel, case, method, request, metadata, n)
            pairs.append((bare, point))
    table = [
        (
            p.inflight,
            p.rps,
            p.p50_ms,
            p.p99_ms,
            b.rps,
            b.p50_ms,
            ratio(p.rps, b.rps),
            p.errors,
            p.first_error[:50],
        )
        for b, p in pairs
    ]
    print_table(
        f"{case}: {method}  (bare = echo measured right before, same client)",
        [
            "in flight",
            "req/s",
            "p50 ms",
            "p99 ms",
            "bare req/s",
            "bare p50",
            "ratio",
            "errors",
            "first error",
        ],
        table,
    )
    return pairs


async def main() -> int:
    get_body = admin_service_pb2.GetTenantRequest().SerializeToString()
    assert get_body == BARE_BODY
    counter = itertools.count()
    run_tag = uuid.uuid4().hex[:8]
    # Serialised up front (more than any run completes); the tail, if ever reached, is built
    # on demand.
    create_bodies = [
        admin_service_pb2.CreateApiKeyRequest(
            request_id=f"bench-{run_tag}-{i}", name=f"bench key {i}"
        ).SerializeToString()
        for i in range(60_000)
    ]

    def create_body() -> bytes:
        i = next(counter)
        if i < len(create_bodies):
            return create_bodies[i]
        return admin_service_pb2.CreateApiKeyRequest(
            request_id=f"bench-{run_tag}-{i}", name=f"bench key {i}"
        ).SerializeToString()

    pairs: list[tuple[Point, Point]] = []
    with tempfile.TemporaryDirectory(prefix="cm_bench_unary_") as tmp_s:
        tmp = Path(tmp_s)
        echo_py = str(ROOT / "bench" / "_echo_server.py")
        echo = await start_server([echo_py], dict(os.environ), tmp / "echo.stderr")
        try:
            async with throwaway_database() as dsn:
                prefix = redis_prefix("unary")
                env_off = mesh_env(dsn, prefix, tmp / "data", CLASSMESH_RATE_LIMIT_PER_MINUTE="0")
                up = ["-m", "classmesh.cli", "up"]
                mesh = await start_server(up, env_off, tmp / "up1.stderr")
                try:
                    md = (("authorization", f"Bearer {mesh.token}"),)
                    pairs += await run_case(
                        echo.target, mesh.target, "get", GET_TENANT, lambda: get_body, md
                    )
                    pairs += await run_case(
                        echo.target, mesh.target, "create", CREATE_API_KEY, create_body, md
                    )
                finally:
                    await mesh.stop()
                # "Huge": no caller reaches it. (Above ~2e8/min the limiter's Lua script
                # computes PX 0 and Redis rejects the SET: every call fails INTERNAL.)
                env_on = mesh_env(
                    dsn,
                    prefix,
                    tmp / "data",
                    CLASSMESH_RATE_LIMIT_PER_MINUTE="100000000",
                    CLASSMESH_RATE_LIMIT_BURST="1000000",
                )
                mesh = await start_server(up, env_on, tmp / "up2.stderr")
                try:
                    md = (("authorization", f"Bearer {mesh.token}"),)
                    pairs += await run_case(
                        echo.target, mesh.target, "get+rl", GET_TENANT, lambda: get_body, md
                    )
                finally:
                    await mesh.stop()
        finally:
            await echo.stop()

    points = [p for pair in pairs for p in pair]
    summary = [
        (p.case, p.inflight, p.rps, b.rps, ratio(p.rps, b.rps), p.p50_ms, b.p50_ms)
        for b, p in pairs
    ]
    print_table(
        "summary (ratio = ClassMesh req/s / bare echo req/s measured right before it)",
        ["case", "in flight", "req/s", "bare req/s", "ratio", "p50 ms", "bare p50 ms"],
        summary,
    )
    get = {p.inflight: p for b, p in pairs if p.case == "get"}
    rl = {p.inflight: p for b, p in pairs if p.case == "get+rl"}
    limiter_cost = {
        "p50_added_ms_at_1": round(rl[1].p50_ms - get[1].p50_ms, 3),
        "throughput_ratio_rl/no_rl_at_64": ratio(rl[64].rps, get[64].rps),
    }
    print(f"rate limiter cost (get+rl vs get): {limiter_cost}")
    print_json(
        "unary",
        {
            "points": [asdict(p) for p in points],
            "ratios": {f"{c}@{n}": r for c, n, _, _, r, _, _ in summary},
            "limiter_cost": limiter_cost,
        },
    )
    return 1 if any(p.calls == 0 for p in points) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
