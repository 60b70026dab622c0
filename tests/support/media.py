"""Media test helpers: a synthetic camera, publishers and subscribers through the SDK's
MediaSession on loopback, and what a media worker process holds (from /proc)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from aiortc import AudioStreamTrack, VideoStreamTrack
from av import VideoFrame

from classmesh_sdk import MediaSession

LOOPBACK = ["127.0.0.1"]
WORKER_MODULE = "classmesh.media.engine.worker"


class Pattern(VideoStreamTrack):
    """Synthetic 640x360 video (a moving bar), encoded by aiortc's VP8 encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=640, height=360, format="yuv420p")
        x = (self.n * 8) % 600
        row = bytes(x) + bytes([235]) * 40 + bytes(600 - x)
        frame.planes[0].update(row * 360)
        for plane in frame.planes[1:]:
            plane.update(bytes([128]) * (plane.line_size * plane.height))
        self.n += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


async def remote(media: MediaSession, count: int, timeout: float = 10) -> dict[str, Any]:
    """The next `count` remote tracks of `media`, by kind."""
    out: dict[str, Any] = {}
    for _ in range(count):
        track = await media.next_remote_track(timeout=timeout)
        out[track.kind] = track
    return out


async def video_frame(track: Any, timeout: float) -> VideoFrame:
    frame = await asyncio.wait_for(track.recv(), timeout)
    assert isinstance(frame, VideoFrame)
    return frame


async def publisher(client: Any, session_id: str, **kw: Any) -> tuple[MediaSession, list[Any]]:
    """A MediaSession of `client` publishing the pattern and a tone."""
    pub = MediaSession(client, session_id, ice_hosts=LOOPBACK, **kw)
    await pub.start()
    tracks = await pub.publish(Pattern(), AudioStreamTrack())
    return pub, tracks


async def subscriber(
    client: Any, session_id: str, audio_only: bool = False, count: int = 2
) -> tuple[MediaSession, dict[str, Any]]:
    """A MediaSession of `client` subscribed to the first `count` tracks announced."""
    sub = MediaSession(client, session_id, ice_hosts=LOOPBACK)
    await sub.start()
    tracks = await sub.wait_tracks(count)
    await sub.subscribe([t.id for t in tracks], audio_only=audio_only)
    return sub, await remote(sub, count)


# ------------------------------------------------------------------------------ /proc


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def media_workers_of(pid: int) -> list[int]:
    """Live child processes of `pid` that run the media worker module."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if parent_of(int(entry)) != pid:
                continue
        except OSError:
            continue
        if WORKER_MODULE.encode() in cmd and alive(int(entry)):
            out.append(int(entry))
    return sorted(out)


def udp_sockets(pid: int) -> int:
    """UDP sockets open in process `pid` (ICE candidates of its peer connections)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    udp: set[str] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        udp |= {line.split()[9] for line in lines if len(line.split()) > 9}
    return len(inodes & udp)
