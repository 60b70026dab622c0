"""SFU fan-out through ClassMesh: forwarding CPU and fps per subscriber, aiortc vs Janus.

    .venv/bin/python bench/sfu.py                      # N = 1,4,16,64,100, 20 s each
    .venv/bin/python bench/sfu.py --quick              # N = 1,4, 5 s each (make bench)
    .venv/bin/python bench/sfu.py --ns 1,16 --seconds 10 --backends aiortc

One publisher (synthetic 640x360 VP8 @ 30 fps from aiortc's encoder, video only) and N
subscribers in one class, through the real service: `classmesh up` with
CLASSMESH_MEDIA_BACKEND=aiortc (one media worker: CLASSMESH_MEDIA_WORKERS=1) and, in the
same run, with CLASSMESH_MEDIA_BACKEND=janus against Debian's Janus in a private network
namespace (tests/support/janus.py; needs CAP_NET_ADMIN, else the Janus rows say why they
are missing). Peers are the SDK's MediaSession over gRPC signaling.

Measured per case over `--seconds` after a warm-up:
- forwarding CPU, % of one core, from /proc/<pid>/stat (utime + stime): the aiortc media
  worker processes (pids from GetMediaStats' worker stats), or the Janus process (its pid
  from the harness; all its threads); divided by N = CPU per subscriber;
- fps per subscriber: subscriber 0 decodes (and checks the frame size); the others count
  the encoded frames their receiver reassembles without decoding (engine hooks.tap_receiver),
  so the load generator stays small; min / median over subscribers;
- the generator's own CPU (this process: publisher encoding, N receivers' SRTP + jitter
  buffers, signaling). Above ~90 % of a core it is the limit, and the row says so.

Prints one table with both back-ends and the aiortc / Janus ratio of CPU per subscriber per
N, then one JSON line. The signaling process (gRPC) is not counted: it does no forwarding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from _common import (  # noqa: E402
    mesh_env,
    print_json,
    print_table,
    ratio,
    redis_prefix,
    start_server,
    throwaway_database,
)
from aiortc import VideoStreamTrack  # noqa: E402
from av import VideoFrame  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402

from classmesh.media.engine import hooks  # noqa: E402
from classmesh.media.v1 import media_pb2  # noqa: E402
from classmesh.session.v1 import session_pb2  # noqa: E402
from classmesh_sdk import AccessToken, ClassMeshClient, MediaSession  # noqa: E402

M = media_pb2
S = session_pb2
FULL_NS = [1, 4, 16, 64, 100]
QUICK_NS = [1, 4]
#: Subscribers set up at once (ICE + DTLS handshakes run in this process).
SETUP_BATCH = 10
WARMUP_SECONDS = 3.0
#: Generator CPU (% of a core) above which this process is the bottleneck.
GENERATOR_LIMIT = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET = {
    "CLASSMESH_RATE_LIMIT_PER_MINUTE": "0",
    "CLASSMESH_HEARTBEAT_INTERVAL_SECONDS": "600",
    "CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS": "3600",
    "CLASSMESH_DB_POOL_SIZE": "10",
}


class Pattern(VideoStreamTrack):
    """Synthetic 640x360 video (a moving bar)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=640, height=360, format="yuv420p")
        x = (self.n * 8) % 600
        frame.planes[0].update((bytes(x) + bytes([235]) * 40 + bytes(600 - x)) * 360)
        for plane in frame.planes[1:]:
            plane.update(bytes([128]) * (plane.line_size * plane.height))
        self.n += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Row:
    backend: str
    n: int
    subscribers_up: int
    forwarding_cpu_pct: float
    cpu_per_sub_pct: float
    fps_min: float
    fps_median: float
    decoded_fps: float
    decoded_size: str
    generator_cpu_pct: float
    generator_bound: bool
    note: str = ""


@dataclass
class Mesh:
    client: ClassMeshClient
    key_id: str
    secret: str
    tenant_id: str
    ice_hosts: list[str]
    client_target: str
    janus_pid: int = 0

    def user(self, sub: str, role: str) -> ClassMeshClient:
        caps = ["publish", "subscribe", "moderate"] if role == "instructor" else ["subscribe"]
        token = (
            AccessToken(self.key_id, self.secret)
            .with_tenant(self.tenant_id)
            .with_identity(sub, sub)
            .with_grants(session="*", role=role, caps=caps)
            .with_ttl(timedelta(hours=2))
            .to_jwt()
        )
        return ClassMeshClient(self.client_target, token=token)


@contextlib.asynccontextmanager
async def mesh(backend: str, tmp: Path, extra: dict[str, str]) -> AsyncIterator[Mesh]:
    async with throwaway_database() as dsn:
        overrides = {
            "CLASSMESH_MEDIA_BACKEND": backend,
            "CLASSMESH_MEDIA_WORKERS": "1",
            **QUIET,
            **extra,
        }
        env = mesh_env(dsn, redis_prefix(f"sfu_{backend}"), tmp / f"data-{backend}", **overrides)
        server = await start_server(
            ["-m", "classmesh.cli", "up"], env, tmp / f"mesh-{backend}.log", timeout=90
        )
        try:
            admin = ClassMeshClient(server.target, token=server.token)
            key = await admin.admin.create_api_key(name="sfu bench")
            ice = extra.get("CLASSMESH_MEDIA_ICE_HOSTS", "127.0.0.1").split(",")
            yield Mesh(
                client=admin,
                key_id=key.api_key.id,
                secret=key.secret,
                tenant_id=server.tenant_id,
                ice_hosts=ice,
                client_target=server.target,
            )
            await admin.close()
        finally:
            await server.stop()


async def live_class(m: Mesh, n: int) -> tuple[str, ClassMeshClient, list[ClassMeshClient]]:
    teacher = f"teacher-{os.urandom(3).hex()}"
    inst = m.user(teacher, "instructor")
    start = datetime.now(UTC) + timedelta(minutes=1)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(start)
    end = timestamp_pb2.Timestamp()
    end.FromDatetime(start + timedelta(hours=2))
    created = await inst.sessions.create_session(
        title="sfu bench",
        instructor_id=teacher,
        scheduled_start=stamp,
        scheduled_end=end,
        capacity=max(n + 10, 20),
        kind=S.SESSION_KIND_CLASS,
        settings=S.SessionSettings(lobby_enabled=False),
    )
    sid = created.session.id
    await inst.sessions.start_session(session_id=sid)
    await inst.sessions.join_session(session_id=sid)
    students = [m.user(f"student-{i}-{os.urandom(3).hex()}", "student") for i in range(n)]
    for i in range(0, n, SETUP_BATCH):
        await asyncio.gather(
            *(c.sessions.join_session(session_id=sid) for c in students[i : i + SETUP_BATCH])
        )
    return sid, inst, students


async def worker_pids(m: Mesh, sid: str) -> list[int]:
    if m.janus_pid:
        return [m.janus_pid]
    stats = await m.client.media.get_media_stats(session_id=sid)
    pids = [w.pid for w in stats.workers if w.pid and w.alive]
    if not pids:
        raise RuntimeError("GetMediaStats reports no media worker pid")
    return pids


async def run_case(m: Mesh, backend: str, n: int, seconds: float) -> Row:
    hooks.pin_ice_hosts(m.ice_hosts)
    sid, inst, students = await live_class(m, n)
    sessions: list[MediaSession] = []
    counts = [0] * n
    decoded = {"frames": 0, "size": ""}
    stop = asyncio.Event()
    readers: list[asyncio.Task[None]] = []
    try:
        pub = MediaSession(inst, sid, ice_hosts=m.ice_hosts)
        sessions.append(pub)
        await pub.start()
        (track,) = await pub.publish(Pattern())

        async def decode(remote: Any) -> None:
            while not stop.is_set():
                frame = await remote.recv()
                decoded["frames"] += 1
                decoded["size"] = f"{frame.width}x{frame.height}"

        async def subscriber(i: int, client: ClassMeshClient) -> None:
            sub = MediaSession(client, sid, ice_hosts=m.ice_hosts)
            sessions.append(sub)
            if i > 0:

                def tap(remote: Any, i: int = i, sub: MediaSession = sub) -> None:
                    receiver = next(
                        t.receiver
                        for t in sub.sub_pc.getTransceivers()
                        if t.receiver.track is remote
                    )

                    def count(data: bytes, ts: int, ssrc: int) -> None:
                        counts[i] += 1

                    hooks.tap_receiver(receiver, count)

                sub.sub_pc.on("track", tap)
            await sub.start()
            await sub.wait_tracks(1, timeout=30)
            await sub.subscribe([track.id])
            remote = await sub.next_remote_track(timeout=30)
            if i == 0:
                readers.append(asyncio.get_running_loop().create_task(decode(remote)))

        for i in range(0, n, SETUP_BATCH):
            await asyncio.gather(
                *(subscriber(j, students[j]) for j in range(i, min(i + SETUP_BATCH, n)))
            )
        await asyncio.sleep(WARMUP_SECONDS)
        pids = await worker_pids(m, sid)
        me = os.getpid()
        c0 = sum(cpu_seconds(p) for p in pids)
        g0 = cpu_seconds(me)
        f0, d0, t0 = list(counts), decoded["frames"], time.monotonic()
        await asyncio.sleep(seconds)
        c1 = sum(cpu_seconds(p) for p in pids)
        g1 = cpu_seconds(me)
        f1, d1, t1 = list(counts), decoded["frames"], time.monotonic()
        wall = t1 - t0
        dfps = (d1 - d0) / wall
        fps = sorted([dfps] + [(b - a) / wall for a, b in list(zip(f0, f1, strict=True))[1:]])
        cpu = 100 * (c1 - c0) / wall
        gen = 100 * (g1 - g0) / wall
        return Row(
            backend=backend,
            n=n,
            subscribers_up=sum(1 for f in fps if f > 0),
            forwarding_cpu_pct=round(cpu, 1),
            cpu_per_sub_pct=round(cpu / n, 3),
            fps_min=round(fps[0], 1),
            fps_median=round(statistics.median(fps), 1),
            decoded_fps=round(dfps, 1),
            decoded_size=str(decoded["size"]),
            generator_cpu_pct=round(gen, 1),
            generator_bound=gen >= GENERATOR_LIMIT,
        )
    finally:
        stop.set()
        for task in readers:
            task.cancel()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        with contextlib.suppress(Exception):
            await inst.sessions.end_session(session_id=sid)
        await asyncio.gather(*(c.close() for c in [inst, *students]), return_exceptions=True)


async def run_backend(backend: str, ns: Sequence[int], seconds: float, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    if backend == "aiortc":
        async with mesh("aiortc", tmp, {"CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1"}) as m:
            for n in ns:
                rows.append(await run_case(m, backend, n, seconds))
                _print_row(rows[-1])
        return rows
    from tests.support.janus import janus_in_netns
    from tests.support.netns import NetnsUnavailable

    try:
        with janus_in_netns(tmp / "janus", debug_level=3) as janus:
            async with mesh("janus", tmp, janus.env()) as m:
                m.ice_hosts = [janus.netns.outside_ip]
                m.janus_pid = janus.pid
                for n in ns:
                    rows.append(await run_case(m, backend, n, seconds))
                    _print_row(rows[-1])
    except NetnsUnavailable as exc:
        print(f"janus: not measured: {exc}", flush=True)
        rows.extend(
            Row("janus", n, 0, 0, 0, 0, 0, 0, "", 0, False, note=f"not measured: {exc}") for n in ns
        )
    return rows


def _print_row(r: Row) -> None:
    flag = " (generator-bound)" if r.generator_bound else ""
    print(
        f"  {r.backend:<6} N={r.n:<4} forwarding {r.forwarding_cpu_pct:5.1f} % "
        f"({r.cpu_per_sub_pct:.3f} %/sub)  fps min/med {r.fps_min}/{r.fps_median}  "
        f"decoded {r.decoded_fps} fps {r.decoded_size}  generator {r.generator_cpu_pct} %{flag}",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    ns: list[int] = QUICK_NS if args.quick and args.ns is None else (args.ns or FULL_NS)
    seconds: float = args.seconds or (5.0 if args.quick else 20.0)
    with tempfile.TemporaryDirectory(prefix="classmesh-sfu-") as tmpdir:
        tmp = Path(tmpdir)
        rows: list[Row] = []
        for backend in args.backends:
            print(f"{backend}: N = {ns}, {seconds:.0f} s each", flush=True)
            rows += await run_backend(backend, ns, seconds, tmp)
    by = {(r.backend, r.n): r for r in rows}
    table = []
    for n in ns:
        a, j = by.get(("aiortc", n)), by.get(("janus", n))
        for r in (a, j):
            if r is None:
                continue
            table.append(
                [
                    r.backend,
                    n,
                    r.subscribers_up,
                    r.forwarding_cpu_pct,
                    f"{r.cpu_per_sub_pct:.3f}",
                    r.fps_min,
                    r.fps_median,
                    f"{r.decoded_fps} {r.decoded_size}",
                    f"{r.generator_cpu_pct}{' LIMIT' if r.generator_bound else ''}",
                    f"{ratio(a.cpu_per_sub_pct, j.cpu_per_sub_pct):.2f}"
                    if r is a and a and j and j.cpu_per_sub_pct
                    else "",
                ]
            )
    print()
    print_table(
        "SFU fan-out, 1 publisher 640x360 VP8 @ 30 fps (forwarding CPU in % of one core)",
        [
            "backend",
            "N",
            "subs up",
            "fwd CPU %",
            "%/sub",
            "fps min",
            "fps med",
            "decoded",
            "generator %",
            "aiortc/janus",
        ],
        table,
    )
    # The per-subscriber figure at small N carries the publisher's ingest; the cost of one
    # more subscriber is the slope between the smallest and the largest N.
    slopes: dict[str, float] = {}
    for backend in ("aiortc", "janus"):
        measured = sorted(
            (r for r in rows if r.backend == backend and r.subscribers_up), key=lambda r: r.n
        )
        if len(measured) >= 2 and measured[-1].n > measured[0].n:
            lo, hi = measured[0], measured[-1]
            slopes[backend] = (hi.forwarding_cpu_pct - lo.forwarding_cpu_pct) / (hi.n - lo.n)
            print(
                f"{backend}: one more subscriber costs {slopes[backend]:.3f} % of a core "
                f"(N {lo.n} -> {hi.n})"
            )
    if slopes.get("aiortc") and slopes.get("janus"):
        print(f"aiortc/janus per added subscriber: {slopes['aiortc'] / slopes['janus']:.2f}")
    print_json(
        "sfu",
        {"seconds": seconds, "rows": [asdict(r) for r in rows], "per_added_subscriber": slopes},
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    for name in names:
        if name not in ("aiortc", "janus"):
            raise argparse.ArgumentTypeError(f"unknown back-end {name!r}")
    return names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--ns", type=_ints, default=None, help="subscriber counts")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per case")
    parser.add_argument("--quick", action="store_true", help="N = 1,4 for 5 s (make bench)")
    parser.add_argument("--backends", type=_names, default=["aiortc", "janus"])
    asyncio.run(main(parser.parse_args()))
