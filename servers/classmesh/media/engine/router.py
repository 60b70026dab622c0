"""The forwarding core of one aiortc router (runs in a media worker): encoded-frame passthrough.

A router owns producers (published tracks) and consumers (subscriptions); the worker
(engine/worker.py) terminates each participant's two peer connections (publisher: the
client offers; subscriber: the server offers). A publisher's reassembled encoded frames
(hooks.tap_receiver) become one `av.Packet` each (pts = RTP timestamp, time base 1/90000
video, 1/48000 audio), shared by every consumer's `PassthroughTrack`; aiortc's sender only
re-packetizes it. Nothing on this path decodes or encodes.

Keyframes: a new (or resumed, or overflowed) video consumer drops frames until a keyframe
(VP8: bit 0 of the first payload byte clear; H.264: an IDR or SPS NAL unit in the access
unit) and asks the producer for one; subscriber
PLI/FIR is forwarded to the publisher as RTCP PLI, at most once per `PLI_INTERVAL`.
Each consumer queue is bounded: when full, a video consumer empties it and waits for the
next keyframe; an audio consumer drops its oldest packet. Slow subscribers never slow the
producer or other consumers.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from classmesh.media.engine import hooks

__all__ = [
    "FORWARDED_CODECS",
    "AiortcRouter",
    "Consumer",
    "PassthroughTrack",
    "Producer",
    "is_h264_keyframe",
    "is_keyframe",
    "is_vp8_keyframe",
]

log = logging.getLogger("classmesh.media.engine")

#: Least time between two PLIs sent to one publisher (s).
PLI_INTERVAL = 0.5
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_TIME_BASE = fractions.Fraction(1, 48000)


def is_vp8_keyframe(data: bytes) -> bool:
    """A VP8 frame is a keyframe when bit 0 of its first byte is clear (RFC 6386 9.1)."""
    return bool(data) and not data[0] & 0x01


#: Codecs the passthrough forwards, per kind, the default first (a subscriber always gets
#: the publisher's codec: nothing is transcoded).
FORWARDED_CODECS: dict[str, tuple[str, ...]] = {
    "audio": ("audio/opus",),
    "video": ("video/VP8", "video/H264"),
}

#: H.264 NAL unit types that start a decodable picture: IDR slice (5), SPS (7).
_H264_KEY_NALS = frozenset({5, 7})


def is_h264_keyframe(data: bytes) -> bool:
    """An Annex-B access unit (aiortc's depayloader output, 00 00 01 / 00 00 00 01 start
    codes) is a keyframe when one of its NAL units is an IDR slice or an SPS."""
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        if data[i + 3] & 0x1F in _H264_KEY_NALS:
            return True
        i = data.find(b"\x00\x00\x01", i + 3)
    return False


def is_keyframe(mime_type: str, data: bytes) -> bool:
    if mime_type.lower() == "video/h264":
        return is_h264_keyframe(data)
    return is_vp8_keyframe(data)


class PassthroughTrack(MediaStreamTrack):
    """The track a subscriber's sender reads: `av.Packet`s from one producer, bounded."""

    def __init__(self, kind: str, queue_size: int) -> None:
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self.queue.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        return packet

    def end(self) -> None:
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


@dataclass
class Consumer:
    """One subscription of one peer to one producer."""

    id: str
    producer: Producer
    peer_id: str
    track: PassthroughTrack
    paused: bool = False
    #: Audio-only mode: a video consumer forwards nothing.
    audio_only: bool = False
    waiting_keyframe: bool = True
    sent_packets: int = 0
    sent_bytes: int = 0
    dropped_packets: int = 0

    @property
    def kind(self) -> str:
        return self.producer.kind

    def push(self, packet: Any, keyframe: bool) -> None:
        if self.paused or (self.audio_only and self.kind == "video"):
            return
        if self.kind == "video" and self.waiting_keyframe:
            if not keyframe:
                self.dropped_packets += 1
                self.producer.request_keyframe()
                return
            self.waiting_keyframe = False
        q = self.track.queue
        if q.full():
            if self.kind == "video":
                self.dropped_packets += q.qsize() + 1
                while not q.empty():
                    q.get_nowait()
                self.waiting_keyframe = not keyframe
                if not keyframe:
                    self.producer.request_keyframe()
                    return
            else:
                q.get_nowait()
                self.dropped_packets += 1
        q.put_nowait(packet)
        self.sent_packets += 1
        self.sent_bytes += packet.size

    def restart(self) -> None:
        """After a pause: wait for (and ask for) a keyframe."""
        if self.kind == "video":
            self.waiting_keyframe = True
            self.producer.request_keyframe()

    def close(self) -> None:
        self.producer.consumers.pop(self.id, None)
        self.track.end()


@dataclass
class Producer:
    """A published track: frames in from one receiver, out to every consumer."""

    id: str
    kind: str  # "audio" | "video"
    peer_id: str
    client_track_id: str
    mime_type: str
    receiver: RTCRtpReceiver | None = None
    muted: bool = False
    paused: bool = False
    moderator_muted: bool = False
    consumers: dict[str, Consumer] = field(default_factory=dict)
    ssrc: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    keyframes_in: int = 0
    plis_sent: int = 0
    _last_pli: float = 0.0

    @property
    def forwarding(self) -> bool:
        return not (self.muted or self.paused or self.moderator_muted)

    def on_frame(self, data: bytes, timestamp: int, ssrc: int) -> None:
        self.ssrc = ssrc
        self.frames_in += 1
        self.bytes_in += len(data)
        keyframe = self.kind == "video" and is_keyframe(self.mime_type, data)
        if keyframe:
            self.keyframes_in += 1
        if not self.forwarding or not self.consumers:
            return
        packet = av.Packet(data)
        packet.pts = timestamp
        packet.dts = timestamp
        packet.time_base = VIDEO_TIME_BASE if self.kind == "video" else AUDIO_TIME_BASE
        for consumer in list(self.consumers.values()):
            consumer.push(packet, keyframe)

    def request_keyframe(self) -> None:
        """PLI to the publisher, throttled to one per PLI_INTERVAL."""
        if self.kind != "video" or self.receiver is None or not self.ssrc:
            return
        now = time.monotonic()
        if now - self._last_pli < PLI_INTERVAL:
            return
        self._last_pli = now
        self.plis_sent += 1
        try:
            hooks.send_pli(self.receiver, self.ssrc)
        except RuntimeError:  # no running loop (closing)
            pass

    def set_moderator_muted(self, muted: bool) -> None:
        self.moderator_muted = muted
        if not muted:
            for consumer in self.consumers.values():
                consumer.restart()

    def close(self) -> None:
        for consumer in list(self.consumers.values()):
            consumer.close()


class AiortcRouter:
    """One room's producers and consumers (passthrough, in the worker's event loop)."""

    backend = "aiortc"

    def __init__(self, router_id: str | None = None, *, queue_size: int = 64) -> None:
        self.id = router_id or str(uuid.uuid4())
        self.queue_size = queue_size
        self.producers: dict[str, Producer] = {}
        self.peer_connections: set[RTCPeerConnection] = set()
        self.closed = False

    def new_peer_connection(self) -> RTCPeerConnection:
        from aiortc import RTCConfiguration

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peer_connections.add(pc)
        return pc

    async def close_peer_connection(self, pc: RTCPeerConnection) -> None:
        self.peer_connections.discard(pc)
        await pc.close()

    def attach_receiver(self, producer: Producer, receiver: RTCRtpReceiver) -> None:
        producer.receiver = receiver
        hooks.tap_receiver(receiver, producer.on_frame)

    def add_producer(self, producer: Producer) -> None:
        self.producers[producer.id] = producer

    def remove_producer(self, producer_id: str) -> Producer | None:
        producer = self.producers.pop(producer_id, None)
        if producer is not None:
            producer.close()
        return producer

    def consume(self, producer_id: str, peer_id: str, *, audio_only: bool = False) -> Consumer:
        producer = self.producers[producer_id]
        consumer = Consumer(
            id=str(uuid.uuid4()),
            producer=producer,
            peer_id=peer_id,
            track=PassthroughTrack(producer.kind, self.queue_size),
            audio_only=audio_only,
            waiting_keyframe=producer.kind == "video",
        )
        producer.consumers[consumer.id] = consumer
        producer.request_keyframe()
        return consumer

    def hook_sender(self, consumer: Consumer, sender: object, on_pli: Callable[[], None]) -> None:
        hooks.on_keyframe_request(sender, on_pli)  # type: ignore[arg-type]

    def stats(self) -> dict[str, int]:
        consumers = [c for p in self.producers.values() for c in p.consumers.values()]
        return {
            "producers": len(self.producers),
            "consumers": len(consumers),
            "frames_in": sum(p.frames_in for p in self.producers.values()),
            "forwarded_packets": sum(c.sent_packets for c in consumers),
            "dropped_packets": sum(c.dropped_packets for c in consumers),
            "decoded_frames": sum(
                max(hooks.decoder_frames(p.receiver), 0)
                for p in self.producers.values()
                if p.receiver is not None
            ),
        }

    async def close(self) -> None:
        self.closed = True
        for producer in list(self.producers.values()):
            producer.close()
        self.producers.clear()
        pcs = list(self.peer_connections)
        self.peer_connections.clear()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
