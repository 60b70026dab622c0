"""A media worker process: aiortc routers and peers with encoded-frame passthrough.

`python -m classmesh.media.engine.worker --fd N --worker-id aiortc-0 ...` is started by the
aiortc back-end (engine/aiortc_backend.py) in the signaling process; it runs one event loop
(uvloop) that terminates participants' peer connections and forwards their media. It
serves the back-end's calls (engine/ipc.py) on the inherited socket `N` and dies with its
parent: PR_SET_PDEATHSIG (SIGKILL) on Linux, and in any case at end of stream on that
socket (the parent's end closes when the parent exits, however it exits).

`WorkerEngine` holds the worker's routers (`engine/router.py` forwarding core) and, per
participant and router, a `WorkerPeer`: the publisher connection (the client offers; its
incoming tracks bind to the producers the service announced, by MediaStreamTrack id, else
by kind) and the subscriber connection (the worker offers after subscriptions change, one
offer outstanding at a time). Calls on one peer run one at a time, in order.

Figures: every `STATS_INTERVAL` s the worker samples each peer's aiortc getStats()
(transport bytes for bitrates, RTCInboundRtpStreamStats for loss and jitter of published
streams, RTCRemoteInboundRtpStreamStats for loss, jitter and RTT the subscriber reports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription, candidate_from_sdp
from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCTransportStats,
)

from classmesh.core.errors import (
    ClassMeshError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from classmesh.core.proc import die_with_parent
from classmesh.media.engine import hooks
from classmesh.media.engine.backend import (
    BackendEvent,
    ParticipantStatsData,
    PeerClosed,
    ProducerSpec,
    RouterStatsData,
    SubscriberOffer,
    Target,
    WorkerStatsData,
)
from classmesh.media.engine.ipc import (
    CALLS,
    Call,
    Failure,
    Notify,
    Result,
    WireError,
    read_message,
    write_message,
)
from classmesh.media.engine.router import FORWARDED_CODECS, AiortcRouter, Consumer, Producer

__all__ = ["STATS_INTERVAL", "WorkerEngine", "WorkerPeer", "main"]

log = logging.getLogger("classmesh.media.worker")

#: Seconds between two getStats() samples of every peer.
STATS_INTERVAL = 2.0
#: Calls whose second argument is a peer id (run one at a time per peer).
_PEER_CALLS = frozenset(
    {
        "add_peer",
        "remove_peer",
        "publisher_offer",
        "add_producer",
        "subscribe",
        "unsubscribe",
        "subscriber_answer",
        "add_ice_candidate",
        "set_consumer_state",
        "set_preferred_layers",
    }
)
#: Calls that carry SDP or ICE text from a client: parse failures are the client's.
_SDP_CALLS = {
    "publisher_offer": "signal.offer.sdp",
    "subscriber_answer": "signal.answer.sdp",
    "add_ice_candidate": "signal.ice_candidate.candidate",
}
_CLOCK = {"audio": 48000, "video": 90000}

Emit = Callable[[str, str, BackendEvent], None]
#: Every peer connection this worker created (closed ones drop out when collected).
_CONNECTIONS: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()


def open_connections() -> int:
    """Peer connections of this worker not closed yet."""
    return sum(1 for pc in list(_CONNECTIONS) if pc.connectionState != "closed")


def _prefer_codec(transceiver: RTCRtpTransceiver, mime_type: str) -> None:
    """Negotiate exactly the producer's codec: passthrough never transcodes."""
    caps = RTCRtpSender.getCapabilities(transceiver.kind)
    codecs = [c for c in caps.codecs if c.mimeType.lower() == mime_type.lower()]
    if codecs:
        transceiver.setCodecPreferences(codecs)


@dataclass
class _Sample:
    at: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    received: int = 0
    lost: int = 0


class WorkerPeer:
    """One participant in one router: publisher and subscriber connections."""

    def __init__(self, router: WorkerRouter, peer_id: str, emit: Emit) -> None:
        self.router = router
        self.id = peer_id
        self.emit = emit
        self.lock = asyncio.Lock()
        self.closed = False
        self.pub_pc = router.engine.new_peer_connection()
        self.sub_pc = router.engine.new_peer_connection()
        self.producers: dict[str, Producer] = {}
        self.pending: list[Producer] = []  # announced, no incoming track bound yet
        self.consumers: dict[str, Consumer] = {}  # producer id -> consumer
        self.sub_offer_pending = False
        self.sub_renegotiate = False
        self.stats = ParticipantStatsData(peer_id=peer_id)
        self._sample = _Sample()
        self._watch(self.pub_pc, "publisher")
        self._watch(self.sub_pc, "subscriber")
        self.pub_pc.on("track", self._on_track)

    def _watch(self, pc: RTCPeerConnection, target: Target) -> None:
        _CONNECTIONS.add(pc)

        def changed() -> None:
            if pc.connectionState == "failed" and not self.closed:
                self.emit(
                    self.router.id,
                    self.id,
                    PeerClosed(reason=f"{target} connection failed", failed=True),
                )

        pc.on("connectionstatechange", changed)

    # ----------------------------------------------------------------- publisher

    def _on_track(self, track: object) -> None:
        receiver = next(
            (t.receiver for t in self.pub_pc.getTransceivers() if t.receiver.track is track),
            None,
        )
        if receiver is None:
            return
        kind = getattr(track, "kind", "")
        track_id = getattr(track, "id", "")
        match = next((p for p in self.pending if p.client_track_id == track_id), None) or next(
            (p for p in self.pending if p.kind == kind), None
        )
        if match is None:
            log.info("unannounced track ignored", extra={"kind": kind, "peer_id": self.id})
            return
        self.pending.remove(match)
        self.router.engine.attach_receiver(match, receiver)

    def add_producer(self, producer: Producer) -> None:
        self.producers[producer.id] = producer
        self.router.engine.add_producer(producer)
        # A track already received and not bound (publish after the offer) binds now.
        bound = {id(p.receiver) for p in self.producers.values() if p.receiver is not None}
        for transceiver in self.pub_pc.getTransceivers():
            receiver = transceiver.receiver
            if (
                transceiver.kind == producer.kind
                and receiver.track is not None
                and id(receiver) not in bound
                and transceiver.currentDirection in ("recvonly", "sendrecv")
            ):
                self.router.engine.attach_receiver(producer, receiver)
                return
        self.pending.append(producer)

    async def answer_publisher(self, sdp: str) -> str:
        """Answer with exactly one forwarded codec per track: the producer's, or when the
        offer lacks it another one we forward that it has (the producer takes it)."""
        offered = {
            m.rtp.muxId: {c.mimeType.lower() for c in m.rtp.codecs}
            for m in SessionDescription.parse(sdp).media
        }
        await self.pub_pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        by_receiver = {id(p.receiver): p for p in self.producers.values() if p.receiver}
        for transceiver in self.pub_pc.getTransceivers():
            bound = by_receiver.get(id(transceiver.receiver))
            choices = FORWARDED_CODECS.get(transceiver.kind, ())
            wanted = bound.mime_type if bound else (choices[0] if choices else "")
            here = offered.get(transceiver.mid or "", set())
            if wanted.lower() not in here:
                other = next((m for m in choices if m.lower() in here), None)
                if other is not None:
                    wanted = other
                    if bound is not None:
                        bound.mime_type = other
            _prefer_codec(transceiver, wanted)
        answer = await self.pub_pc.createAnswer()
        await self.pub_pc.setLocalDescription(answer)
        return str(self.pub_pc.localDescription.sdp)

    # ----------------------------------------------------------------- subscriber

    async def offer_subscriber(self) -> None:
        """Worker-initiated offer on the subscriber connection (one at a time)."""
        if self.sub_offer_pending:
            self.sub_renegotiate = True
            return
        self.sub_offer_pending = True
        self.sub_renegotiate = False
        offer = await self.sub_pc.createOffer()
        await self.sub_pc.setLocalDescription(offer)
        self.emit(self.router.id, self.id, SubscriberOffer(sdp=self.sub_pc.localDescription.sdp))

    async def subscriber_answered(self, sdp: str) -> None:
        if not self.sub_offer_pending:
            raise FailedPrecondition("SDP_INVALID", "no offer is pending on the subscriber")
        await self.sub_pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        self.sub_offer_pending = False
        if self.sub_renegotiate:
            await self.offer_subscriber()

    def add_consumer(self, consumer: Consumer) -> None:
        transceiver = self.sub_pc.addTransceiver(consumer.track, direction="sendonly")
        _prefer_codec(transceiver, consumer.producer.mime_type)
        hooks.on_keyframe_request(transceiver.sender, consumer.producer.request_keyframe)
        self.consumers[consumer.producer.id] = consumer

    async def replace_subscriber(self) -> None:
        """A fresh subscriber connection (after a move): consumers closed, no offer pending."""
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
        old = self.sub_pc
        self.sub_pc = self.router.engine.new_peer_connection()
        self._watch(self.sub_pc, "subscriber")
        self.sub_offer_pending = self.sub_renegotiate = False
        await self.router.engine.close_peer_connection(old)

    # ----------------------------------------------------------------- figures

    async def sample(self) -> None:
        """Bitrates since the last sample; loss, jitter, RTT from aiortc's getStats()."""
        if self.closed:
            return
        pub, sub = await asyncio.gather(self.pub_pc.getStats(), self.sub_pc.getStats())
        now = time.monotonic()
        bytes_in = sum(s.bytesReceived for s in pub.values() if isinstance(s, RTCTransportStats))
        bytes_out = sum(s.bytesSent for s in sub.values() if isinstance(s, RTCTransportStats))
        received = lost = 0
        jitter = 0.0
        for s in pub.values():
            if isinstance(s, RTCInboundRtpStreamStats):
                received += s.packetsReceived
                lost += max(s.packetsLost, 0)
                jitter = max(jitter, s.jitter / _CLOCK.get(s.kind, 90000))
        out_ratio = 0.0
        rtts: list[float] = []
        for s in sub.values():
            if isinstance(s, RTCRemoteInboundRtpStreamStats):
                out_ratio = max(out_ratio, float(s.fractionLost or 0) / 256.0)
                jitter = max(jitter, s.jitter / _CLOCK.get(s.kind, 90000))
                if s.roundTripTime:
                    rtts.append(float(s.roundTripTime))
        last = self._sample
        st = self.stats
        if last.at:
            dt = max(now - last.at, 1e-3)
            st.send_bitrate_bps = int(max(bytes_in - last.bytes_in, 0) * 8 / dt)
            st.receive_bitrate_bps = int(max(bytes_out - last.bytes_out, 0) * 8 / dt)
            d_recv, d_lost = received - last.received, lost - last.lost
            in_ratio = d_lost / (d_recv + d_lost) if d_recv + d_lost > 0 and d_lost > 0 else 0.0
            st.packet_loss_ratio = min(max(in_ratio, out_ratio), 1.0)
        st.packets_lost = lost
        st.jitter_seconds = jitter
        st.rtt_seconds = sum(rtts) / len(rtts) if rtts else 0.0
        self._sample = _Sample(now, bytes_in, bytes_out, received, lost)

    # ----------------------------------------------------------------- close

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
        for producer_id in list(self.producers):
            self.router.remove_producer(producer_id)
        self.pending.clear()
        await asyncio.gather(
            self.router.engine.close_peer_connection(self.pub_pc),
            self.router.engine.close_peer_connection(self.sub_pc),
            return_exceptions=True,
        )


class WorkerRouter:
    def __init__(self, router_id: str, queue_size: int) -> None:
        self.id = router_id
        self.engine = AiortcRouter(router_id, queue_size=queue_size)
        self.peers: dict[str, WorkerPeer] = {}

    def remove_producer(self, producer_id: str) -> None:
        producer = self.engine.producers.get(producer_id)
        if producer is None:
            return
        owner = self.peers.get(producer.peer_id)
        if owner is not None:
            owner.producers.pop(producer_id, None)
            if producer in owner.pending:
                owner.pending.remove(producer)
        for peer in self.peers.values():
            peer.consumers.pop(producer_id, None)
        self.engine.remove_producer(producer_id)

    def stats(self, node_id: str) -> RouterStatsData:
        producers = list(self.engine.producers.values())
        consumers = [c for p in producers for c in p.consumers.values()]
        out = RouterStatsData(
            router_id=self.id,
            node_id=node_id,
            producers=len(producers),
            consumers=len(consumers),
            forwarded_frames=sum(c.sent_packets for c in consumers),
            forwarded_bytes=sum(c.sent_bytes for c in consumers),
            dropped_frames=sum(c.dropped_packets for c in consumers),
            received_frames=sum(p.frames_in for p in producers),
        )
        for peer in self.peers.values():
            mine = [c for c in consumers if c.peer_id == peer.id]
            own = [p for p in producers if p.peer_id == peer.id]
            st = peer.stats
            row = ParticipantStatsData(
                peer_id=peer.id,
                producers=len(own),
                consumers=len(mine),
                forwarded_frames=sum(c.sent_packets for c in mine),
                forwarded_bytes=sum(c.sent_bytes for c in mine),
                dropped_frames=sum(c.dropped_packets for c in mine),
                received_frames=sum(p.frames_in for p in own),
                send_bitrate_bps=st.send_bitrate_bps,
                receive_bitrate_bps=st.receive_bitrate_bps,
                packets_lost=st.packets_lost,
                packet_loss_ratio=st.packet_loss_ratio,
                jitter_seconds=st.jitter_seconds,
                rtt_seconds=st.rtt_seconds,
            )
            out.ingress_bitrate_bps += row.send_bitrate_bps
            out.egress_bitrate_bps += row.receive_bitrate_bps
            out.participants.append(row)
        return out

    async def close(self) -> None:
        peers = list(self.peers.values())
        self.peers.clear()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
        await self.engine.close()


class WorkerEngine:
    """The routers of one worker; its public methods are the calls it serves."""

    def __init__(self, worker_id: str, emit: Emit, *, queue_size: int = 64) -> None:
        self.worker_id = worker_id
        self.emit = emit
        self.queue_size = queue_size
        self.routers: dict[str, WorkerRouter] = {}
        self._sampler: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lookups

    def _router(self, router_id: str) -> WorkerRouter:
        router = self.routers.get(router_id)
        if router is None:
            raise NotFound("router", router_id, reason="ROUTER_NOT_FOUND")
        return router

    def _peer(self, router_id: str, peer_id: str) -> WorkerPeer:
        peer = self._router(router_id).peers.get(peer_id)
        if peer is None or peer.closed:
            raise NotFound("peer", peer_id, reason="ROUTER_NOT_FOUND")
        return peer

    def peer_lock(self, peer_id: str) -> asyncio.Lock:
        for router in self.routers.values():
            peer = router.peers.get(peer_id)
            if peer is not None:
                return peer.lock
        return asyncio.Lock()

    # ----------------------------------------------------------------- routers

    async def open_router(self, router_id: str) -> str:
        if router_id not in self.routers:
            self.routers[router_id] = WorkerRouter(router_id, self.queue_size)
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
        return self.worker_id

    async def close_router(self, router_id: str) -> None:
        router = self.routers.pop(router_id, None)
        if router is not None:
            await router.close()

    async def add_peer(self, router_id: str, peer_id: str) -> None:
        router = self._router(router_id)
        current = router.peers.get(peer_id)
        if current is None or current.closed:
            router.peers[peer_id] = WorkerPeer(router, peer_id, self.emit)

    async def remove_peer(self, router_id: str, peer_id: str) -> None:
        router = self.routers.get(router_id)
        peer = router.peers.pop(peer_id, None) if router else None
        if peer is not None:
            await peer.close()

    async def move_peer(
        self,
        from_router_id: str,
        to_router_id: str,
        peer_id: str,
        producers: Sequence[tuple[str, ProducerSpec]],
    ) -> bool:
        old = self._router(from_router_id)
        new = self._router(to_router_id)
        peer = old.peers.pop(peer_id, None)
        if peer is None or peer.closed:
            raise NotFound("peer", peer_id, reason="ROUTER_NOT_FOUND")
        receivers = {pid: p.receiver for pid, p in peer.producers.items() if p.receiver is not None}
        for producer_id in list(peer.producers):
            old.remove_producer(producer_id)
        peer.pending.clear()
        old.engine.peer_connections.discard(peer.pub_pc)
        new.engine.peer_connections.add(peer.pub_pc)
        peer.router = new
        stale = new.peers.get(peer_id)
        if stale is not None and stale is not peer:
            await stale.close()
        new.peers[peer_id] = peer
        await peer.replace_subscriber()
        for old_id, spec in producers:
            producer = _producer(spec, peer_id)
            peer.producers[producer.id] = producer
            new.engine.add_producer(producer)
            receiver = receivers.get(old_id)
            if receiver is not None:
                new.engine.attach_receiver(producer, receiver)
            else:
                peer.pending.append(producer)
        return True

    # ----------------------------------------------------------------- publishing

    async def publisher_offer(
        self, router_id: str, peer_id: str, sdp: str, producers: Sequence[ProducerSpec]
    ) -> str:
        return await self._peer(router_id, peer_id).answer_publisher(sdp)

    async def add_producer(self, router_id: str, peer_id: str, spec: ProducerSpec) -> None:
        peer = self._peer(router_id, peer_id)
        if spec.producer_id in peer.producers:
            return
        peer.add_producer(_producer(spec, peer_id))

    async def remove_producer(self, router_id: str, producer_id: str) -> None:
        router = self.routers.get(router_id)
        if router is not None:
            router.remove_producer(producer_id)

    async def set_producer_state(
        self, router_id: str, producer_id: str, *, paused: bool, moderator_muted: bool
    ) -> None:
        producer = self._router(router_id).engine.producers.get(producer_id)
        if producer is None:
            raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        was = producer.forwarding
        producer.paused = paused
        producer.moderator_muted = moderator_muted
        if producer.forwarding and not was:
            for consumer in producer.consumers.values():
                consumer.restart()

    # ----------------------------------------------------------------- subscribing

    async def subscribe(
        self,
        router_id: str,
        peer_id: str,
        producer_ids: Sequence[str],
        *,
        audio_only: bool = False,
        spatial_layer: int = 2,
        temporal_layer: int = 2,
    ) -> None:
        router = self._router(router_id)
        peer = self._peer(router_id, peer_id)
        for producer_id in producer_ids:
            if producer_id not in router.engine.producers:
                raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        added = False
        for producer_id in dict.fromkeys(producer_ids):
            existing = peer.consumers.get(producer_id)
            if existing is not None:
                _set_audio_only(existing, audio_only)
                continue
            consumer = router.engine.consume(producer_id, peer_id, audio_only=audio_only)
            peer.add_consumer(consumer)
            added = True
        if added:
            await peer.offer_subscriber()

    async def unsubscribe(self, router_id: str, peer_id: str, producer_ids: Sequence[str]) -> None:
        peer = self._peer(router_id, peer_id)
        for producer_id in producer_ids:
            gone = peer.consumers.pop(producer_id, None)
            if gone is not None:
                gone.close()

    async def subscriber_answer(self, router_id: str, peer_id: str, sdp: str) -> None:
        await self._peer(router_id, peer_id).subscriber_answered(sdp)

    async def add_ice_candidate(
        self,
        router_id: str,
        peer_id: str,
        target: Target,
        candidate: str,
        sdp_mid: str,
        sdp_mline_index: int,
    ) -> None:
        peer = self._peer(router_id, peer_id)
        parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        parsed.sdpMid = sdp_mid or None
        parsed.sdpMLineIndex = sdp_mline_index
        pc = peer.sub_pc if target == "subscriber" else peer.pub_pc
        await pc.addIceCandidate(parsed)

    async def set_consumer_state(
        self, router_id: str, peer_id: str, producer_id: str, *, paused: bool, audio_only: bool
    ) -> None:
        consumer = self._peer(router_id, peer_id).consumers.get(producer_id)
        if consumer is None:
            raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        was = consumer.paused or (consumer.audio_only and consumer.kind == "video")
        consumer.paused = paused
        _set_audio_only(consumer, audio_only)
        if was and not paused and not (audio_only and consumer.kind == "video"):
            consumer.restart()

    async def set_preferred_layers(
        self, router_id: str, peer_id: str, producer_id: str, spatial: int, temporal: int
    ) -> None:
        self._peer(router_id, peer_id)
        raise FailedPrecondition(
            "LAYERS_NOT_SUPPORTED",
            "the aiortc back-end cannot receive simulcast (one encoding per track); "
            "layer preferences work on routers of the janus back-end",
            metadata={"backend": "aiortc", "supportedBy": "janus"},
        )

    # ----------------------------------------------------------------- figures

    async def stats(self, router_id: str) -> RouterStatsData:
        return self._router(router_id).stats(self.worker_id)

    async def worker_stats(self) -> WorkerStatsData:
        out = WorkerStatsData(
            worker_id=self.worker_id, pid=os.getpid(), connections=open_connections()
        )
        for router in self.routers.values():
            st = router.stats(self.worker_id)
            out.routers += 1
            out.peers += len(router.peers)
            out.producers += st.producers
            out.consumers += st.consumers
            out.forwarded_frames += st.forwarded_frames
            out.forwarded_bytes += st.forwarded_bytes
            out.dropped_frames += st.dropped_frames
            out.received_frames += st.received_frames
        return out

    def live_objects(self) -> dict[str, int]:
        """What the worker holds (tests: nothing may remain after a session closes)."""
        routers = list(self.routers.values())
        return {
            "routers": len(routers),
            "peers": sum(len(r.peers) for r in routers),
            "peer_connections": sum(len(r.engine.peer_connections) for r in routers),
            "producers": sum(len(r.engine.producers) for r in routers),
        }

    async def _sample_forever(self) -> None:
        while self.routers:
            await asyncio.sleep(STATS_INTERVAL)
            peers = [p for r in list(self.routers.values()) for p in list(r.peers.values())]
            results = await asyncio.gather(*(p.sample() for p in peers), return_exceptions=True)
            for err in results:
                if isinstance(err, Exception):
                    log.debug("stats sample failed", extra={"detail": str(err)})

    async def close(self) -> None:
        routers = list(self.routers.values())
        self.routers.clear()
        await asyncio.gather(*(r.close() for r in routers), return_exceptions=True)
        if self._sampler is not None:
            self._sampler.cancel()

    # ----------------------------------------------------------------- dispatch

    async def call(self, call: Call) -> Any:
        """Run one call (per-peer calls one at a time); errors as ClassMeshError."""
        if call.method not in CALLS or call.method == "shutdown":
            raise InvalidArgument([("method", f"{call.method!r} is not a worker call")])
        method = getattr(self, call.method)
        try:
            if call.method in _PEER_CALLS and len(call.args) >= 2:
                async with self.peer_lock(str(call.args[1])):
                    return await method(*call.args, **call.kwargs)
            if call.method == "move_peer" and len(call.args) >= 3:
                async with self.peer_lock(str(call.args[2])):
                    return await method(*call.args, **call.kwargs)
            return await method(*call.args, **call.kwargs)
        except ClassMeshError:
            raise
        except (ValueError, AttributeError, RuntimeError, KeyError, IndexError, TypeError) as exc:
            field = _SDP_CALLS.get(call.method)
            if field is None:
                raise
            log.info("signal could not be applied", extra={"call": call.method, "detail": str(exc)})
            raise InvalidArgument(
                [(field, f"could not be applied: {exc}"[:300])], reason="SDP_INVALID"
            ) from exc


def _producer(spec: ProducerSpec, peer_id: str) -> Producer:
    return Producer(
        id=spec.producer_id,
        kind=spec.kind,
        peer_id=peer_id,
        client_track_id=spec.client_track_id,
        mime_type=spec.mime_type,
        paused=spec.paused,
        moderator_muted=spec.moderator_muted,
    )


def _set_audio_only(consumer: Consumer, audio_only: bool) -> None:
    was = consumer.audio_only
    consumer.audio_only = audio_only
    if was and not audio_only and not consumer.paused:
        consumer.restart()


# --------------------------------------------------------------------- process


async def serve(fd: int, worker_id: str, queue_size: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    engine = WorkerEngine(
        worker_id,
        lambda router_id, peer_id, event: write_message(writer, Notify(router_id, peer_id, event)),
        queue_size=queue_size,
    )
    tasks: set[asyncio.Task[None]] = set()

    async def run(call: Call) -> None:
        try:
            value = await engine.call(call)
            write_message(writer, Result(call.id, value))
        except ClassMeshError as err:
            write_message(writer, Failure(call.id, WireError.of(err)))
        except Exception:
            log.exception("media worker call failed", extra={"call": call.method})
            write_message(writer, Failure(call.id, WireError.of(Internal())))

    try:
        while True:
            message = await read_message(reader)
            if message is None:  # the parent is gone: so are we
                break
            if not isinstance(message, Call):
                continue
            if message.method == "shutdown":
                write_message(writer, Result(message.id, True))
                break
            task = asyncio.get_running_loop().create_task(run(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await engine.close()
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="classmesh-media-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--ice-hosts", default="")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 0  # the parent died before we could ask to die with it
    from classmesh.core.logs import configure_logging

    configure_logging(args.log_level)
    hooks.check_internals()
    hooks.pin_ice_hosts([h.strip() for h in args.ice_hosts.split(",")])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (Ctrl-C reaches us too)
    try:
        import uvloop

        uvloop.run(serve(args.fd, args.worker_id, args.queue_size))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve(args.fd, args.worker_id, args.queue_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
