"""Rules of MediaService: routers per room, participants' peers, signaling, moderation.

State lives in this process (routers, peers, producers, consumers are live objects): this
slice runs forwarding in the signaling process (no media workers yet). A participant's
`Peer` in a router holds two aiortc peer connections (publisher: the client offers;
subscriber: the server offers) and a signal buffer: every ServerSignal for the participant
(replies included, correlated by signal_id) gets the next `seq` and is kept for 60 s / the
last 1000, so `Signal` (bidi) = `SendSignal` + `ReceiveSignals(after_seq)`.

Per session one watcher follows the session's event feed: participant_removed/left closes
that user's peers at once (well within 1 s), session_ended/cancelled closes the routers,
participant_muted/unmuted stops/restarts forwarding of that user's producers (moderator
mute: the publisher keeps sending, the server forwards nothing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiortc import RTCRtpTransceiver, RTCSessionDescription
from aiortc.codecs import CODECS, HEADER_EXTENSIONS
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import candidate_from_sdp

from classmesh.common.v1 import common_pb2
from classmesh.core.auth import Principal, require
from classmesh.core.breaker import CircuitBreaker
from classmesh.core.db import connection
from classmesh.core.errors import (
    ClassMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
    Validator,
    to_rpc_status,
)
from classmesh.core.events import last_seq
from classmesh.core.feeds import event_feed
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.paging import decode_page_token, encode_page_token, page_size
from classmesh.core.runtime import Runtime
from classmesh.core.sessionguard import (
    ParticipantRef,
    require_live_session,
    require_participant,
)
from classmesh.core.timeutil import to_timestamp
from classmesh.core.turn import mint_ice_servers
from classmesh.media import store
from classmesh.media.engine.router import AiortcRouter, Consumer, Producer
from classmesh.media.v1 import media_pb2

__all__ = ["MediaService", "Peer", "RouterEntry"]

log = logging.getLogger("classmesh.media")
M = media_pb2

#: Routers per session (main + 49 breakouts).
MAX_ROUTERS = 50
SIGNAL_BUFFER = 1000
SIGNAL_BUFFER_SECONDS = 60.0
STAFF = frozenset({"instructor", "assistant", "admin"})
WATCHED = frozenset(
    {
        "participant_removed",
        "participant_left",
        "participant_muted",
        "participant_unmuted",
        "session_ended",
        "session_cancelled",
    }
)
_KIND = {M.TRACK_KIND_AUDIO: "audio", M.TRACK_KIND_VIDEO: "video"}
_KIND_ENUM = {"audio": M.TRACK_KIND_AUDIO, "video": M.TRACK_KIND_VIDEO}
#: TURN credential lifetimes a caller may ask for (s).
TURN_TTL_MIN, TURN_TTL_MAX = 60, 86400
_MIME = {"audio": "audio/opus", "video": "video/VP8"}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RouterEntry:
    engine: AiortcRouter
    tenant_id: str
    session_id: str
    breakout_room_id: str
    create_time: datetime = field(default_factory=_now)
    close_time: datetime | None = None
    peers: dict[str, Peer] = field(default_factory=dict)  # user id -> peer
    tracks: dict[str, M.Track] = field(default_factory=dict)  # producer id -> track

    def proto(self) -> M.Router:
        router = M.Router(
            id=self.engine.id,
            session_id=self.session_id,
            breakout_room_id=self.breakout_room_id,
            backend=M.MEDIA_BACKEND_AIORTC,
            node_id="local",
            status=M.ROUTER_STATUS_CLOSED if self.close_time else M.ROUTER_STATUS_OPEN,
            participant_count=len(self.peers),
            producer_count=len(self.engine.producers),
            consumer_count=sum(len(p.consumers) for p in self.engine.producers.values()),
        )
        router.create_time.CopyFrom(to_timestamp(self.create_time))
        if self.close_time:
            router.close_time.CopyFrom(to_timestamp(self.close_time))
        return router


class Peer:
    """One participant in one router: two peer connections and a signal buffer."""

    def __init__(self, router: RouterEntry, me: ParticipantRef) -> None:
        self.router = router
        self.user_id = me.user_id
        self.participant_id = me.id
        self.seq = 0
        self.buffer: collections.deque[tuple[float, M.ServerSignal]] = collections.deque()
        self.changed = asyncio.Condition()
        self.closed = False
        self.close_error: ClassMeshError | None = None
        self.pub_pc = router.engine.new_peer_connection()
        self.sub_pc = router.engine.new_peer_connection()
        self.producers: dict[str, Producer] = {}
        self.consumers: dict[str, Consumer] = {}  # producer id -> consumer
        self.pending: list[Producer] = []  # published, receiver not attached yet
        self.sub_offer_pending = False
        self.sub_renegotiate = False
        self.audio_only = False
        self.pub_pc.on("track", self._on_track)

    # ----------------------------------------------------------------- signals out

    def push(self, signal: M.ServerSignal) -> M.ServerSignal:
        self.seq += 1
        signal.seq = self.seq
        signal.time.GetCurrentTime()
        now = time.monotonic()
        self.buffer.append((now, signal))
        while len(self.buffer) > SIGNAL_BUFFER or (
            self.buffer and now - self.buffer[0][0] > SIGNAL_BUFFER_SECONDS
        ):
            self.buffer.popleft()
        asyncio.get_running_loop().create_task(self._notify())
        return signal

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def signals(self, after_seq: int) -> AsyncIterator[M.ServerSignal]:
        """Buffered signals with seq > after_seq, then live; ends when the peer closes."""
        if after_seq > self.seq:
            raise InvalidArgument([("after_seq", f"is beyond the newest signal ({self.seq})")])
        cursor = after_seq
        while True:
            batch = [s for _, s in self.buffer if s.seq > cursor]
            for signal in batch:
                cursor = signal.seq
                yield signal
            if self.closed:
                if self.close_error is not None:
                    raise self.close_error
                return
            async with self.changed:
                if self.seq == cursor and not self.closed:
                    await self.changed.wait()

    # ----------------------------------------------------------------- media

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
            log.info("unannounced track ignored", extra={"kind": kind, "user_id": self.user_id})
            return
        self.pending.remove(match)
        self.router.engine.attach_receiver(match, receiver)

    async def answer_publisher(self, sdp: str) -> str:
        await self.pub_pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for transceiver in self.pub_pc.getTransceivers():
            _prefer_codec(transceiver)
        answer = await self.pub_pc.createAnswer()
        await self.pub_pc.setLocalDescription(answer)
        return self.pub_pc.localDescription.sdp

    async def offer_subscriber(self) -> None:
        """Server-initiated offer on the subscriber connection (one at a time)."""
        if self.sub_offer_pending:
            self.sub_renegotiate = True
            return
        self.sub_offer_pending = True
        self.sub_renegotiate = False
        offer = await self.sub_pc.createOffer()
        await self.sub_pc.setLocalDescription(offer)
        self.push(
            M.ServerSignal(
                offer=M.SessionDescription(
                    type=M.SDP_TYPE_OFFER,
                    sdp=self.sub_pc.localDescription.sdp,
                    target=M.PEER_CONNECTION_TARGET_SUBSCRIBER,
                )
            )
        )

    async def subscriber_answered(self, sdp: str) -> None:
        if not self.sub_offer_pending:
            raise FailedPrecondition("SDP_INVALID", "no offer is pending on the subscriber")
        await self.sub_pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        self.sub_offer_pending = False
        if self.sub_renegotiate:
            await self.offer_subscriber()

    def add_consumer(self, consumer: Consumer) -> None:
        transceiver = self.sub_pc.addTransceiver(consumer.track, direction="sendonly")
        _prefer_codec(transceiver)
        sender = transceiver.sender
        self.router.engine.hook_sender(consumer, sender, consumer.producer.request_keyframe)
        self.consumers[consumer.producer.id] = consumer

    async def close(self, error: ClassMeshError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
        await asyncio.gather(
            self.router.engine.close_peer_connection(self.pub_pc),
            self.router.engine.close_peer_connection(self.sub_pc),
            return_exceptions=True,
        )
        await self._notify()


def _prefer_codec(transceiver: RTCRtpTransceiver) -> None:
    """Only VP8 / Opus: subscribers must get the publisher's codec (no transcoding)."""
    caps = RTCRtpSender.getCapabilities(transceiver.kind)
    wanted = _MIME.get(transceiver.kind, "").lower()
    codecs = [c for c in caps.codecs if c.mimeType.lower() == wanted]
    if codecs:
        transceiver.setCodecPreferences(codecs)


def _error_signal(signal_id: str, err: ClassMeshError) -> M.ServerSignal:
    status = common_pb2.RpcStatus.FromString(to_rpc_status(err).SerializeToString())
    return M.ServerSignal(signal_id=signal_id, error=status)


class MediaService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.routers: dict[str, RouterEntry] = {}  # router id -> entry (closed ones too)
        self.open: dict[tuple[str, str, str], RouterEntry] = {}  # (tenant, session, room)
        self.watchers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.queue_size = runtime.config.media_consumer_queue_size
        self._lock = asyncio.Lock()
        #: Seed 000 STR-032: 5 failed router creations in 60 s open it; half-open after 30 s.
        self.breaker = CircuitBreaker("media router creation", reason="MEDIA_UNAVAILABLE")

    # ------------------------------------------------------------------ checks

    @staticmethod
    def check_token(principal: Principal, session_id: str) -> None:
        if not principal.has_session(session_id):
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "the token is not valid for this session",
                metadata={"sessionId": session_id},
            )

    @staticmethod
    def check_staff(principal: Principal) -> None:
        if principal.role not in STAFF and not principal.can("moderate"):
            raise PermissionDenied("PERMISSION_MISSING", "only staff may manage media routers")

    async def require_signaler(
        self, principal: Principal, session_id: str, room_id: str
    ) -> ParticipantRef:
        self.check_token(principal, session_id)
        async with connection(self.runtime.pool) as conn:
            await require_live_session(conn, principal.tenant_id, session_id, live=True)
            me = await require_participant(
                conn, principal.tenant_id, session_id, principal.subject, admitted=True
            )
            if room_id:
                await store.require_breakout_room(conn, principal.tenant_id, session_id, room_id)
        return me

    # ------------------------------------------------------------------ routers

    async def create_router(
        self, principal: Principal, session_id: str, room_id: str, *, check_session: bool = True
    ) -> tuple[RouterEntry, bool]:
        if check_session:
            self.check_token(principal, session_id)
            self.check_staff(principal)
            async with connection(self.runtime.pool) as conn:
                await require_live_session(conn, principal.tenant_id, session_id)
                if room_id:
                    await store.require_breakout_room(
                        conn, principal.tenant_id, session_id, room_id
                    )
        async with self._lock:
            key = (principal.tenant_id, session_id, room_id)
            entry = self.open.get(key)
            if entry is not None:
                return entry, False
            count = sum(1 for k in self.open if k[:2] == key[:2])
            if count >= MAX_ROUTERS:
                raise ResourceExhausted(
                    "ROUTER_LIMIT_REACHED",
                    0,
                    f"a session has at most {MAX_ROUTERS} routers",
                )
            async with self.breaker.guard():
                engine = AiortcRouter(queue_size=self.queue_size)
            entry = RouterEntry(
                engine=engine,
                tenant_id=principal.tenant_id,
                session_id=session_id,
                breakout_room_id=room_id,
            )
            self.open[key] = entry
            self.routers[entry.engine.id] = entry
            self._watch(principal.tenant_id, session_id)
            return entry, True

    def get_router(self, principal: Principal, router_id: str) -> RouterEntry:
        entry = self.routers.get(router_id)
        if entry is None or entry.tenant_id != principal.tenant_id:
            raise NotFound("router", router_id, reason="ROUTER_NOT_FOUND")
        self.check_token(principal, entry.session_id)
        return entry

    def find_router(self, principal: Principal, session_id: str, room_id: str) -> RouterEntry:
        self.check_token(principal, session_id)
        entry = self.open.get((principal.tenant_id, session_id, room_id))
        if entry is None:
            raise NotFound("router", room_id or session_id, reason="ROUTER_NOT_FOUND")
        return entry

    async def close_router(self, entry: RouterEntry, reason: str = "router closed") -> None:
        if entry.close_time is not None:
            return
        entry.close_time = _now()
        self.open.pop((entry.tenant_id, entry.session_id, entry.breakout_room_id), None)
        error = FailedPrecondition("SESSION_ENDED", reason) if reason == "session ended" else None
        await asyncio.gather(
            *(peer.close(error) for peer in entry.peers.values()), return_exceptions=True
        )
        await entry.engine.close()
        if not any(k[:2] == (entry.tenant_id, entry.session_id) for k in self.open):
            task = self.watchers.pop((entry.tenant_id, entry.session_id), None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def close_all(self) -> None:
        for entry in list(self.open.values()):
            await self.close_router(entry)
        for task in self.watchers.values():
            task.cancel()

    # ------------------------------------------------------------------ peers

    async def peer(self, principal: Principal, session_id: str, room_id: str) -> Peer:
        """The caller's peer in the room's router (router and peer created on first use)."""
        me = await self.require_signaler(principal, session_id, room_id)
        entry, _ = await self.create_router(principal, session_id, room_id, check_session=False)
        peer = entry.peers.get(me.user_id)
        if peer is None or peer.closed:
            peer = Peer(entry, me)
            entry.peers[me.user_id] = peer
            for track in entry.tracks.values():
                if track.user_id != me.user_id:
                    peer.push(M.ServerSignal(track_published=track))
        return peer

    async def disconnect_user(
        self, tenant_id: str, session_id: str, user_id: str, error: ClassMeshError | None
    ) -> list[str]:
        unpublished: list[str] = []
        for key, entry in list(self.open.items()):
            if key[:2] != (tenant_id, session_id):
                continue
            peer = entry.peers.pop(user_id, None)
            if peer is None:
                continue
            await peer.close(error)
            for producer_id in list(peer.producers):
                await self._unpublish(entry, peer, producer_id, None)
                unpublished.append(producer_id)
        return unpublished

    # ------------------------------------------------------------------ moves

    async def move_participant(
        self, principal: Principal, session_id: str, user_id: str, to_room: str
    ) -> tuple[str, RouterEntry]:
        """Move a participant's media to the router of `to_room` ("" = main room)."""
        self.check_token(principal, session_id)
        self.check_staff(principal)
        async with connection(self.runtime.pool) as conn:
            await require_live_session(conn, principal.tenant_id, session_id, live=True)
            await require_participant(conn, principal.tenant_id, session_id, user_id)
            if to_room:
                await store.require_breakout_room(conn, principal.tenant_id, session_id, to_room)
        target, _ = await self.create_router(principal, session_id, to_room, check_session=False)
        current = next(
            (
                e
                for k, e in self.open.items()
                if k[:2] == (principal.tenant_id, session_id)
                and user_id in e.peers
                and not e.peers[user_id].closed
            ),
            None,
        )
        if current is None:
            return "", target
        if current is not target:
            await self._move(principal, current.peers[user_id], current, target)
        return current.engine.id, target

    async def _move(
        self, principal: Principal, peer: Peer, old: RouterEntry, new: RouterEntry
    ) -> None:
        """Close the peer's consumers and producers in `old`, re-create its producers in `new`
        on the same receivers (the publisher connection stays), replace the subscriber
        connection (the client renegotiates on RouterMoved: the server offers again when it
        subscribes) and announce the new room's tracks."""
        old.peers.pop(peer.user_id, None)
        for consumer in peer.consumers.values():
            consumer.close()
        peer.consumers.clear()
        moved: list[tuple[Producer, M.Track | None]] = []
        for producer_id, producer in list(peer.producers.items()):
            moved.append((producer, old.tracks.get(producer_id)))
            await self._unpublish(old, peer, producer_id, principal)
        pending = {p.id for p in peer.pending}
        peer.pending = []
        old.engine.peer_connections.discard(peer.pub_pc)
        new.engine.peer_connections.add(peer.pub_pc)
        await old.engine.close_peer_connection(peer.sub_pc)
        peer.sub_pc = new.engine.new_peer_connection()
        peer.sub_offer_pending = peer.sub_renegotiate = False
        peer.router = new
        stale = new.peers.get(peer.user_id)
        if stale is not None and stale is not peer:
            await stale.close()
        new.peers[peer.user_id] = peer
        peer.push(
            M.ServerSignal(
                router_moved=M.RouterMoved(
                    from_router_id=old.engine.id,
                    to_router_id=new.engine.id,
                    breakout_room_id=new.breakout_room_id,
                )
            )
        )
        for track in new.tracks.values():
            if track.user_id != peer.user_id:
                peer.push(M.ServerSignal(track_published=track))
        for producer, old_track in moved:
            fresh = Producer(
                id=str(uuid.uuid4()),
                kind=producer.kind,
                user_id=producer.user_id,
                participant_id=producer.participant_id,
                client_track_id=producer.client_track_id,
                mime_type=producer.mime_type,
                muted=producer.muted,
                paused=producer.paused,
                moderator_muted=producer.moderator_muted,
                ssrc=producer.ssrc,
            )
            track = M.Track()
            if old_track is not None:
                track.CopyFrom(old_track)
            track.id = fresh.id
            track.router_id = new.engine.id
            track.breakout_room_id = new.breakout_room_id
            track.publish_time.GetCurrentTime()
            with contextlib.suppress(ClassMeshError):
                await self._log_track(principal, track, published=True)
            new.engine.add_producer(fresh)
            new.tracks[fresh.id] = track
            peer.producers[fresh.id] = fresh
            if producer.id in pending or producer.receiver is None:
                peer.pending.append(fresh)
            else:
                new.engine.attach_receiver(fresh, producer.receiver)
            for other in list(new.peers.values()):
                if other is not peer and not other.closed:
                    other.push(M.ServerSignal(track_published=track))

    # ------------------------------------------------------------------ signals in

    async def handle(
        self, principal: Principal, signal: M.ClientSignal, peer: Peer | None = None
    ) -> tuple[Peer | None, M.ServerSignal]:
        """Apply one client signal; returns the caller's peer and the (pushed) reply."""
        v = Validator()
        v.require_len("signal.signal_id", signal.signal_id, 1, 64)
        session_id = v.require_uuid("signal.session_id", signal.session_id)
        room_id = ""
        if signal.breakout_room_id:
            room_id = v.require_uuid("signal.breakout_room_id", signal.breakout_room_id)
        kind = signal.WhichOneof("message")
        v.check(kind is not None, "signal.message", "one signal is required")
        v.raise_if_any()
        if (
            peer is None
            or peer.closed
            or (peer.router.session_id, peer.router.breakout_room_id)
            != (
                session_id,
                room_id,
            )
        ):
            peer = await self.peer(principal, session_id, room_id)
        else:
            await self.require_signaler(principal, session_id, room_id)
        try:
            reply = await self._apply(principal, peer, signal)
        except ClassMeshError as err:
            reply = _error_signal(signal.signal_id, err)
        except (ValueError, AttributeError, RuntimeError) as exc:
            log.info("signal failed", extra={"kind": kind, "detail": str(exc)})
            reply = _error_signal(
                signal.signal_id,
                InvalidArgument(
                    [(f"signal.{kind}", f"could not be applied: {exc}"[:300])],
                    reason="SDP_INVALID",
                ),
            )
        reply.signal_id = signal.signal_id
        if peer.closed:
            return peer, reply
        return peer, peer.push(reply)

    async def _apply(
        self, principal: Principal, peer: Peer, signal: M.ClientSignal
    ) -> M.ServerSignal:
        kind = signal.WhichOneof("message")
        entry = peer.router
        ack = M.ServerSignal(ack=M.SignalAck())
        if kind in ("offer", "publish"):
            require(principal, capability="publish")
        elif kind == "subscribe":
            require(principal, capability="subscribe")
        if kind == "offer":
            desc = signal.offer
            _check_sdp(desc, M.SDP_TYPE_OFFER, "offer")
            if desc.target == M.PEER_CONNECTION_TARGET_SUBSCRIBER:
                raise FailedPrecondition(
                    "SDP_INVALID", "the server offers on the subscriber connection"
                )
            sdp = await peer.answer_publisher(desc.sdp)
            return M.ServerSignal(
                answer=M.SessionDescription(
                    type=M.SDP_TYPE_ANSWER, sdp=sdp, target=M.PEER_CONNECTION_TARGET_PUBLISHER
                )
            )
        if kind == "answer":
            desc = signal.answer
            _check_sdp(desc, M.SDP_TYPE_ANSWER, "answer")
            await peer.subscriber_answered(desc.sdp)
            return ack
        if kind == "ice_candidate":
            cand = signal.ice_candidate
            v = Validator()
            v.require_len("signal.ice_candidate.candidate", cand.candidate, 0, 1024)
            v.require_len("signal.ice_candidate.sdp_mid", cand.sdp_mid, 0, 64)
            v.require_range("signal.ice_candidate.sdp_mline_index", cand.sdp_mline_index, 0, 1023)
            v.raise_if_any()
            if cand.candidate:
                text = cand.candidate.removeprefix("candidate:")
                parsed = candidate_from_sdp(text)
                parsed.sdpMid = cand.sdp_mid or None
                parsed.sdpMLineIndex = cand.sdp_mline_index
                pc = (
                    peer.sub_pc
                    if cand.target == M.PEER_CONNECTION_TARGET_SUBSCRIBER
                    else peer.pub_pc
                )
                await pc.addIceCandidate(parsed)
            return ack
        if kind == "publish":
            return await self._publish(principal, peer, signal.publish)
        if kind == "unpublish":
            track_id = signal.unpublish.track_id
            if track_id not in peer.producers:
                raise NotFound("track", track_id, reason="TRACK_NOT_FOUND")
            await self._unpublish(entry, peer, track_id, principal)
            return ack
        if kind == "subscribe":
            sub = signal.subscribe
            v = Validator()
            v.check(1 <= len(sub.track_ids) <= 100, "signal.subscribe.track_ids", "1-100 ids")
            v.require_range("signal.subscribe.spatial_layer", sub.spatial_layer, 0, 2)
            v.require_range("signal.subscribe.temporal_layer", sub.temporal_layer, 0, 2)
            v.raise_if_any()
            for track_id in sub.track_ids:
                if track_id not in entry.engine.producers:
                    raise NotFound("track", track_id, reason="TRACK_NOT_FOUND")
            peer.audio_only = sub.audio_only
            added = False
            for track_id in dict.fromkeys(sub.track_ids):
                if track_id in peer.consumers:
                    peer.consumers[track_id].audio_only = sub.audio_only
                    continue
                consumer = entry.engine.consume(track_id, peer.user_id, audio_only=sub.audio_only)
                peer.add_consumer(consumer)
                added = True
            if added:
                await peer.offer_subscriber()
            return ack
        if kind == "unsubscribe":
            for track_id in signal.unsubscribe.track_ids:
                gone = peer.consumers.pop(track_id, None)
                if gone is not None:
                    gone.close()
            return ack
        if kind in ("pause", "resume"):
            msg = signal.pause if kind == "pause" else signal.resume
            paused = kind == "pause"
            if msg.producer:
                producer = peer.producers.get(msg.track_id)
                if producer is None:
                    raise NotFound("track", msg.track_id, reason="TRACK_NOT_FOUND")
                producer.paused = paused
                if not paused:
                    producer.set_moderator_muted(producer.moderator_muted)
                self._broadcast_pause(entry, producer, paused, M.PAUSE_REASON_PRODUCER)
            else:
                mine = peer.consumers.get(msg.track_id)
                if mine is None:
                    raise NotFound("track", msg.track_id, reason="TRACK_NOT_FOUND")
                mine.paused = paused
                if not paused:
                    mine.restart()
            return ack
        if kind == "leave":
            entry.peers.pop(peer.user_id, None)
            for producer_id in list(peer.producers):
                await self._unpublish(entry, peer, producer_id, principal)
            reply = peer.push(M.ServerSignal(signal_id=signal.signal_id, ack=M.SignalAck()))
            await peer.close()
            return reply
        raise Unimplemented("UNIMPLEMENTED", f"{kind} is not implemented yet")

    async def _publish(
        self, principal: Principal, peer: Peer, pub: M.PublishTrack
    ) -> M.ServerSignal:
        v = Validator()
        v.require_len("signal.publish.client_track_id", pub.client_track_id, 1, 128)
        v.require_enum("signal.publish.kind", pub.kind, list(_KIND))
        v.require_len("signal.publish.name", pub.name, 0, 100)
        v.check(len(pub.layers) <= 3, "signal.publish.layers", "at most 3 encodings")
        v.raise_if_any()
        kind = _KIND[pub.kind]
        if pub.preferred_codec and pub.preferred_codec.lower() != _MIME[kind].lower():
            raise InvalidArgument(
                [("signal.publish.preferred_codec", f"only {_MIME[kind]} is supported")],
                reason="SDP_INVALID",
            )
        entry = peer.router
        producer = Producer(
            id=str(uuid.uuid4()),
            kind=kind,
            user_id=peer.user_id,
            participant_id=peer.participant_id,
            client_track_id=pub.client_track_id,
            mime_type=_MIME[kind],
            muted=pub.muted,
        )
        source = pub.source or (
            M.TRACK_SOURCE_MICROPHONE if kind == "audio" else M.TRACK_SOURCE_CAMERA
        )
        track = M.Track(
            id=producer.id,
            router_id=entry.engine.id,
            session_id=entry.session_id,
            breakout_room_id=entry.breakout_room_id,
            participant_id=peer.participant_id,
            user_id=peer.user_id,
            kind=pub.kind,
            source=source,
            name=pub.name,
            mime_type=producer.mime_type,
            muted=pub.muted,
            client_track_id=pub.client_track_id,
        )
        track.publish_time.GetCurrentTime()
        await self._log_track(principal, track, published=True)
        entry.engine.add_producer(producer)
        entry.tracks[producer.id] = track
        peer.producers[producer.id] = producer
        peer.pending.append(producer)
        for other in list(entry.peers.values()):
            if other is not peer and not other.closed:
                other.push(M.ServerSignal(track_published=track))
        return M.ServerSignal(
            publish_accepted=M.PublishAccepted(client_track_id=pub.client_track_id, track=track)
        )

    async def _unpublish(
        self, entry: RouterEntry, peer: Peer, producer_id: str, principal: Principal | None
    ) -> None:
        peer.producers.pop(producer_id, None)
        entry.engine.remove_producer(producer_id)
        track = entry.tracks.pop(producer_id, None)
        if track is None:
            return
        for other in list(entry.peers.values()):
            other.consumers.pop(producer_id, None)
            if other is not peer and not other.closed:
                other.push(M.ServerSignal(track_unpublished=track))
        with contextlib.suppress(ClassMeshError):
            await self._log_track(principal, track, published=False)

    async def _log_track(
        self, principal: Principal | None, track: M.Track, *, published: bool
    ) -> None:
        tenant_id = principal.tenant_id if principal else self._tenant_of(track.router_id)
        actor = (
            common_pb2.Actor(
                kind=common_pb2.ACTOR_KIND_USER,
                user_id=principal.subject,
                display_name=principal.name,
            )
            if principal
            else common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM)
        )

        async def logged(conn: object) -> Outcome[M.Track]:
            record = await store.append_track_event(
                conn,  # type: ignore[arg-type]
                tenant_id=tenant_id,
                track=track,
                published=published,
                actor=actor,
            )
            return Outcome(track, [record])

        if principal is None:
            principal = _system_principal(tenant_id)
        await run_mutation(
            self.runtime,
            principal,
            "/classmesh.media.v1.MediaService/Signal",
            M.Track(),
            M.Track,
            logged,
        )

    def _tenant_of(self, router_id: str) -> str:
        entry = self.routers.get(router_id)
        return entry.tenant_id if entry else ""

    def _broadcast_pause(
        self, entry: RouterEntry, producer: Producer, paused: bool, reason: Any
    ) -> None:
        for other in entry.peers.values():
            if producer.id in other.consumers and not other.closed:
                other.push(
                    M.ServerSignal(
                        consumer_paused=M.ConsumerPaused(track_id=producer.id, reason=reason)
                    )
                    if paused
                    else M.ServerSignal(consumer_resumed=M.ConsumerResumed(track_id=producer.id))
                )

    # ------------------------------------------------------------------ session watcher

    def _watch(self, tenant_id: str, session_id: str) -> None:
        key = (tenant_id, session_id)
        task = self.watchers.get(key)
        if task is not None and not task.done():
            return
        self.watchers[key] = asyncio.get_running_loop().create_task(
            self._watch_session(tenant_id, session_id)
        )

    async def _watch_session(self, tenant_id: str, session_id: str) -> None:
        while True:
            try:
                head = await last_seq(self.runtime.pool, tenant_id=tenant_id, session_id=session_id)
                async for event in event_feed(
                    self.runtime,
                    tenant_id=tenant_id,
                    session_id=session_id,
                    after_seq=head,
                    types=WATCHED,
                ):
                    if await self._on_session_event(tenant_id, session_id, event):
                        return
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching: removals must always close peers
                log.exception("media session watcher failed", extra={"session_id": session_id})
                await asyncio.sleep(1.0)

    async def _on_session_event(self, tenant_id: str, session_id: str, event: object) -> bool:
        kind = event.WhichOneof("payload")  # type: ignore[attr-defined]
        if kind in ("session_ended", "session_cancelled"):
            for key, entry in list(self.open.items()):
                if key[:2] == (tenant_id, session_id):
                    await self.close_router(entry, "session ended")
            return True
        payload = getattr(event, kind)
        user_id = payload.participant.user_id
        if kind == "participant_removed":
            await self.disconnect_user(
                tenant_id,
                session_id,
                user_id,
                PermissionDenied(
                    "PARTICIPANT_REMOVED",
                    "you were removed from this session",
                    metadata={"sessionId": session_id},
                ),
            )
        elif kind == "participant_left":
            await self.disconnect_user(tenant_id, session_id, user_id, None)
        elif kind in ("participant_muted", "participant_unmuted"):
            muted = kind == "participant_muted"
            sources: set[int] = set()
            if payload.audio:
                sources.add(M.TRACK_SOURCE_MICROPHONE)
            if payload.video:
                sources.add(M.TRACK_SOURCE_CAMERA)
            if payload.screen:
                sources |= {M.TRACK_SOURCE_SCREEN_SHARE, M.TRACK_SOURCE_SCREEN_SHARE_AUDIO}
            self.moderate(tenant_id, session_id, user_id, sources, muted)
        return False

    def moderate(
        self, tenant_id: str, session_id: str, user_id: str, sources: set[int], muted: bool
    ) -> None:
        for key, entry in self.open.items():
            if key[:2] != (tenant_id, session_id):
                continue
            for producer in entry.engine.producers.values():
                track = entry.tracks.get(producer.id)
                if producer.user_id != user_id or track is None or track.source not in sources:
                    continue
                producer.set_moderator_muted(muted)
                track.muted = muted or producer.muted
                self._broadcast_pause(entry, producer, muted, M.PAUSE_REASON_MODERATOR)

    # ------------------------------------------------------------------ read-only RPCs

    def list_routers(
        self,
        principal: Principal,
        session_id: str,
        size: int,
        token: str,
        include_closed: bool,
    ) -> tuple[list[M.Router], str, int]:
        """Routers of one session (or of the tenant, admins), main room first, then by age."""
        if session_id:
            self.check_token(principal, session_id)
        elif principal.role != "admin":
            raise PermissionDenied(
                "PERMISSION_MISSING", "only admins may list the routers of every session"
            )
        limit = page_size(size, default=50, cap=100)
        cursor = decode_page_token(token, 1, reason="PAGE_TOKEN_INVALID")
        offset = int(cursor[0]) if cursor and isinstance(cursor[0], int) else 0
        rows = sorted(
            (
                e
                for e in self.routers.values()
                if e.tenant_id == principal.tenant_id
                and (not session_id or e.session_id == session_id)
                and (include_closed or e.close_time is None)
            ),
            key=lambda e: (e.session_id, e.breakout_room_id != "", e.create_time, e.engine.id),
        )
        page = rows[offset : offset + limit]
        more = offset + limit < len(rows)
        return (
            [e.proto() for e in page],
            encode_page_token(offset + limit) if more else "",
            len(rows),
        )

    def list_tracks(
        self, principal: Principal, session_id: str, room_id: str, size: int, token: str
    ) -> tuple[list[M.Track], str]:
        limit = page_size(size, default=100, cap=500)
        cursor = decode_page_token(token, 1, reason="PAGE_TOKEN_INVALID")
        offset = int(cursor[0]) if cursor and isinstance(cursor[0], int) else 0
        self.check_token(principal, session_id)
        entry = self.open.get((principal.tenant_id, session_id, room_id))
        tracks = list(entry.tracks.values()) if entry else []  # insertion = publish order
        more = offset + limit < len(tracks)
        return tracks[offset : offset + limit], encode_page_token(offset + limit) if more else ""

    def capabilities(self, principal: Principal, session_id: str, room_id: str) -> tuple[str, Any]:
        """What the aiortc back-end negotiates: VP8 and Opus only (passthrough never
        transcodes, so every peer must use the publisher's codec)."""
        self.check_token(principal, session_id)
        entry = self.open.get((principal.tenant_id, session_id, room_id))
        caps = M.RouterCapabilities(simulcast=False, max_spatial_layer=0)
        for kind, mime in _MIME.items():
            for codec in CODECS[kind]:
                if codec.mimeType.lower() != mime.lower():
                    continue
                caps.codecs.append(
                    M.RtpCodecCapability(
                        mime_type=codec.mimeType,
                        kind=_KIND_ENUM[kind],
                        clock_rate=codec.clockRate,
                        channels=codec.channels or 0,
                        preferred_payload_type=codec.payloadType or 0,
                        parameters={k: str(v) for k, v in codec.parameters.items()},
                        rtcp_feedback=[
                            f"{fb.type} {fb.parameter}" if fb.parameter else fb.type
                            for fb in codec.rtcpFeedback
                        ],
                    )
                )
            for ext in HEADER_EXTENSIONS[kind]:
                caps.header_extensions.append(
                    M.RtpHeaderExtension(uri=ext.uri, preferred_id=ext.id, kind=_KIND_ENUM[kind])
                )
        return (entry.engine.id if entry else ""), caps

    def turn_credentials(
        self, principal: Principal, session_id: str, ttl: int | None, now: float | None = None
    ) -> tuple[str, str, int, int, list[str]]:
        """coturn TURN REST credentials (`use-auth-secret`): username "<expiry>:<user>",
        credential base64(HMAC-SHA1(secret, username)); returns them, ttl, expiry, urls."""
        self.check_token(principal, session_id)
        cfg = self.runtime.config
        urls = [u.strip() for u in cfg.turn_urls.split(",") if u.strip()]
        if not cfg.turn_secret or not urls:
            raise FailedPrecondition(
                "FEATURE_DISABLED",
                "TURN is not configured on this deployment "
                "(set CLASSMESH_TURN_SECRET and CLASSMESH_TURN_URLS)",
            )
        grant = mint_ice_servers(cfg, principal.subject, ttl=ttl, now=now)
        return (
            grant.username,
            grant.credential,
            grant.ttl_seconds,
            grant.expires_at,
            list(grant.urls),
        )

    def media_stats(
        self, principal: Principal, session_id: str, room_id: str | None, user_id: str
    ) -> list[M.RouterStats]:
        self.check_token(principal, session_id)
        moderator = principal.role in STAFF or principal.can("moderate")
        if not user_id and not moderator:
            user_id = principal.subject
        if user_id and user_id != principal.subject and not moderator:
            raise PermissionDenied("PERMISSION_MISSING", "only moderators see others' media stats")
        out: list[M.RouterStats] = []
        for (tenant, session, room), entry in sorted(self.open.items()):
            if (tenant, session) != (principal.tenant_id, session_id):
                continue
            if room_id is not None and room != room_id:
                continue
            producers = list(entry.engine.producers.values())
            consumers = [c for p in producers for c in p.consumers.values()]
            stats = M.RouterStats(
                router_id=entry.engine.id,
                breakout_room_id=room,
                producer_count=len(producers),
                consumer_count=len(consumers),
                forwarded_frames=sum(c.sent_packets for c in consumers),
                forwarded_bytes=sum(c.sent_bytes for c in consumers),
                dropped_frames=sum(c.dropped_packets for c in consumers),
                received_frames=sum(p.frames_in for p in producers),
            )
            stats.sample_time.GetCurrentTime()
            for uid_, peer in sorted(entry.peers.items()):
                if user_id and uid_ != user_id:
                    continue
                mine = [c for c in consumers if c.user_id == uid_]
                own = [p for p in producers if p.user_id == uid_]
                stats.participants.append(
                    M.ParticipantMediaStats(
                        participant_id=peer.participant_id,
                        user_id=uid_,
                        producer_count=len(own),
                        consumer_count=len(mine),
                        forwarded_frames=sum(c.sent_packets for c in mine),
                        forwarded_bytes=sum(c.sent_bytes for c in mine),
                        dropped_frames=sum(c.dropped_packets for c in mine),
                        received_frames=sum(p.frames_in for p in own),
                    )
                )
            out.append(stats)
        return out


def _check_sdp(desc: M.SessionDescription, expected: int, name: str) -> None:
    v = Validator()
    v.check(desc.type == expected, f"signal.{name}.type", f"must be SDP_TYPE_{name.upper()}")
    v.check(0 < len(desc.sdp.encode()) <= 65536, f"signal.{name}.sdp", "must be 1-65,536 bytes")
    v.raise_if_any()


def _system_principal(tenant_id: str) -> Principal:
    return Principal(
        tenant_id=tenant_id,
        subject="system",
        name="media",
        role="admin",
        session_id="*",
        capabilities=frozenset(),
        key_id="",
        token_id="",
        expires_at=_now(),
        guest=False,
    )
