"""SFU fan-out: CPU per subscriber of the SFU process and delivered fps, passthrough vs relay.

    .venv/bin/python bench/bench_sfu.py [--ns 8,32,64] [--relay-ns 4,8] [--seconds 10]

One publisher (synthetic 640x360 VP8 @ 30 fps, aiortc's encoder) and N subscribers. The SFU
runs in its own process (`--serve`), the publisher and the subscribers in this one, so the
load generator does not share the SFU's CPU. Subscribers count encoded frames at their
jitter buffer (engine hooks, no decoding) to stay cheap. Two SFU modes, measured in the same
run:

* `passthrough`: ClassMesh's engine (`classmesh.media.engine`: tapped receiver -> Producer ->
  bounded Consumer queues -> `av.Packet` to each sender; no decode, no encode);
* `relay`: aiortc's stock `MediaRelay` (decode once, re-encode per subscriber), the raw
  baseline of issue 6, at small N only.

Signaling is a JSON-lines TCP exchange (the gRPC layer is not what is measured). Video only.
Prints per mode and N: SFU CPU (% of one core), CPU per subscriber, fps per subscriber
(min / median), and the load generator's own CPU, so one can see where it became the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "servers"), str(ROOT / "gen" / "python")]

from aiortc import (  # noqa: E402
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.rtcrtpsender import RTCRtpSender  # noqa: E402
from av import VideoFrame  # noqa: E402

from classmesh.media.engine import hooks  # noqa: E402
from classmesh.media.engine.router import AiortcRouter, Producer  # noqa: E402

LOOPBACK = ["127.0.0.1"]


def _pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def _vp8_only(transceiver: Any) -> None:
    caps = RTCRtpSender.getCapabilities("video")
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType == "video/VP8"])


class Pattern(VideoStreamTrack):
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


# ----------------------------------------------------------------------------- SFU process


async def serve(mode: str) -> None:
    from aiortc.contrib.media import MediaRelay

    hooks.pin_ice_hosts(LOOPBACK)
    router = AiortcRouter(queue_size=64)
    relay = MediaRelay()
    state: dict[str, Any] = {}
    pcs: list[RTCPeerConnection] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            reply: dict[str, Any] = {}
            if msg["op"] == "publish":
                pc = _pc()
                pcs.append(pc)
                producer = Producer("p", "video", "pub", "pid", "t", "video/VP8")
                router.add_producer(producer)

                @pc.on("track")
                def on_track(
                    track: Any, pc: RTCPeerConnection = pc, producer: Producer = producer
                ) -> None:
                    receiver = next(t.receiver for t in pc.getTransceivers())
                    if mode == "passthrough":
                        router.attach_receiver(producer, receiver)
                    state["track"] = track

                await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
                for t in pc.getTransceivers():
                    _vp8_only(t)
                await pc.setLocalDescription(await pc.createAnswer())
                reply = {"sdp": pc.localDescription.sdp}
            elif msg["op"] == "subscribe":
                pc = _pc()
                pcs.append(pc)
                state[msg["id"]] = pc
                if mode == "passthrough":
                    consumer = router.consume("p", msg["id"])
                    tr = pc.addTransceiver(consumer.track, direction="sendonly")
                    router.hook_sender(consumer, tr.sender, consumer.producer.request_keyframe)
                else:
                    tr = pc.addTransceiver(relay.subscribe(state["track"]), direction="sendonly")
                _vp8_only(tr)
                await pc.setLocalDescription(await pc.createOffer())
                reply = {"sdp": pc.localDescription.sdp}
            elif msg["op"] == "answer":
                await state[msg["id"]].setRemoteDescription(
                    RTCSessionDescription(msg["sdp"], "answer")
                )
            elif msg["op"] == "stats":
                reply = router.stats()
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


# ----------------------------------------------------------------------------- generator


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, **msg: Any) -> dict[str, Any]:
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        return dict(json.loads(await self.reader.readline()))


async def run_case(mode: str, n: int, seconds: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", mode, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(await proc.stdout.readline())
    link = Link(*await asyncio.open_connection("127.0.0.1", port))
    pcs: list[RTCPeerConnection] = []
    counts = [0] * n
    try:
        pub = _pc()
        pcs.append(pub)
        _vp8_only(pub.addTransceiver(Pattern(), direction="sendonly"))
        await pub.setLocalDescription(await pub.createOffer())
        answer = await link.call(op="publish", sdp=pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        await asyncio.sleep(1.0)
        for i in range(n):
            pc = _pc()
            pcs.append(pc)

            def on_track(track: Any, i: int = i, pc: RTCPeerConnection = pc) -> None:
                receiver = next(t.receiver for t in pc.getTransceivers())

                def count(data: bytes, ts: int, ssrc: int, i: int = i) -> None:
                    counts[i] += 1

                hooks.tap_receiver(receiver, count)

            pc.on("track", on_track)
            offer = await link.call(op="subscribe", id=f"s{i}")
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await link.call(op="answer", id=f"s{i}", sdp=pc.localDescription.sdp)
        await asyncio.sleep(3.0)  # ICE, DTLS, first keyframes
        sfu = psutil.Process(proc.pid)
        me = psutil.Process(os.getpid())
        c0, m0, f0, t0 = (
            sum(sfu.cpu_times()[:2]),
            sum(me.cpu_times()[:2]),
            list(counts),
            time.monotonic(),
        )
        await asyncio.sleep(seconds)
        c1, m1, f1, t1 = (
            sum(sfu.cpu_times()[:2]),
            sum(me.cpu_times()[:2]),
            list(counts),
            time.monotonic(),
        )
        wall = t1 - t0
        fps = sorted((b - a) / wall for a, b in zip(f0, f1, strict=True))
        stats = await link.call(op="stats")
        return {
            "mode": mode,
            "n": n,
            "sfu_cpu_pct": 100 * (c1 - c0) / wall,
            "per_sub_pct": 100 * (c1 - c0) / wall / n,
            "fps_min": fps[0],
            "fps_median": statistics.median(fps),
            "generator_cpu_pct": 100 * (m1 - m0) / wall,
            "dropped": stats.get("dropped_packets", 0),
            "decoded": stats.get("decoded_frames", 0),
        }
    finally:
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        proc.kill()
        await proc.wait()


async def main(args: argparse.Namespace) -> None:
    hooks.pin_ice_hosts(LOOPBACK)
    cases = [("relay", n) for n in args.relay_ns] + [("passthrough", n) for n in args.ns]
    print(
        f"{'mode':<12}{'N':>4}{'SFU %core':>11}{'%/sub':>8}{'fps min':>9}{'fps med':>9}"
        f"{'gen %core':>11}{'dropped':>9}{'decoded':>9}",
        flush=True,
    )
    rows = []
    for mode, n in cases:
        r = await run_case(mode, n, args.seconds)
        rows.append(r)
        print(
            f"{r['mode']:<12}{r['n']:>4}{r['sfu_cpu_pct']:>11.1f}{r['per_sub_pct']:>8.2f}"
            f"{r['fps_min']:>9.1f}{r['fps_median']:>9.1f}{r['generator_cpu_pct']:>11.1f}"
            f"{r['dropped']:>9}{r['decoded']:>9}",
            flush=True,
        )
    relay = [r for r in rows if r["mode"] == "relay"]
    passthrough = [r for r in rows if r["mode"] == "passthrough"]
    if relay and passthrough:
        ratio = relay[-1]["per_sub_pct"] / max(passthrough[0]["per_sub_pct"], 1e-9)
        print(f"relay / passthrough CPU per subscriber: {ratio:.1f}x")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=["passthrough", "relay"])
    parser.add_argument("--ns", type=_ints, default=[8, 32, 64])
    parser.add_argument("--relay-ns", type=_ints, default=[4, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    ns = parser.parse_args()
    if ns.serve:
        asyncio.run(serve(ns.serve))
    else:
        asyncio.run(main(ns))
