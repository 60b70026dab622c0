"""Rules of MediaService: routers per room, participants' peers, signaling, moderation.

Forwarding runs in a back-end (engine/backend.py `MediaBackend`): the aiortc back-end's
media worker processes (engine/aiortc_backend.py, engine/worker.py) or Janus
(media/janus/). This process keeps what is not forwarding: who may signal, routers and
their placement, track records and their events, each participant's signal buffer, the
session watcher, room-size rules and the circuit breaker around router creation.

A participant's `Peer` in a router has a back-end peer id (a fresh UUID: a replaced peer
never shares it) and a signal buffer: every ServerSignal for the participant (replies
included, correlated by signal_id) gets the next `seq` and is kept for 60 s / the last 1000,
so `Signal` (bidi) = `SendSignal` + `ReceiveSignals(after_seq)`. Back-end events (the
subscriber offer, trickled candidates, a router re-created after a worker died) arrive in
`on_event` and become signals.

Per session one watcher follows the session's event feed: participant_removed/left closes
that user's peers at once (well within 1 s), session_ended/cancelled closes the routers,
participant_muted/unmuted stops/restarts forwarding of that user's producers (moderator
mute: the publisher keeps sending, the server forwards nothing).

Room size (seed 003 graceful degradation): with CLASSMESH_MEDIA_AUDIO_ONLY_ABOVE = N > 0, a
router with more than N participants forwards no video to anyone (every video consumer is
put in audio-only mode, `ConsumerPaused` reason ROOM_SIZE); at N or fewer video resumes
(`ConsumerResumed`, the consumer waits for a keyframe it asks for).
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

from aiortc.codecs import CODECS, HEADER_EXTENSIONS
from aiortc.sdp import SessionDescription

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
    Unavailable,
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
from classmesh.media.engine.aiortc_backend import AiortcBackend
from classmesh.media.engine.backend import (
    BackendEvent,
    LayerSpec,
    LocalCandidate,
    MediaBackend,
    PeerClosed,
    ProducerSpec,
    RouterRestarted,
    SubscriberOffer,
    Target,
)
from classmesh.media.engine.router import FORWARDED_CODECS
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
#: Codecs each back-end forwards, per kind, the default first (passthrough never
#: transcodes: a subscriber gets the publisher's codec).
CODECS_BY_BACKEND: dict[str, dict[str, tuple[str, ...]]] = {
    "aiortc": FORWARDED_CODECS,
    "janus": {"audio": ("audio/opus",), "video": ("video/VP8",)},
}
_BACKEND_ENUM = {"aiortc": M.MEDIA_BACKEND_AIORTC, "janus": M.MEDIA_BACKEND_JANUS}
_BACKEND_NAME = {M.MEDIA_BACKEND_AIORTC: "aiortc", M.MEDIA_BACKEND_JANUS: "janus"}
_TARGET: dict[int, Target] = {
    M.PEER_CONNECTION_TARGET_UNSPECIFIED: "publisher",
    M.PEER_CONNECTION_TARGET_PUBLISHER: "publisher",
    M.PEER_CONNECTION_TARGET_SUBSCRIBER: "subscriber",
}
_TARGET_ENUM = {
    "publisher": M.PEER_CONNECTION_TARGET_PUBLISHER,
    "subscriber": M.PEER_CONNECTION_TARGET_SUBSCRIBER,
}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ProducerState:
    """A published track as this process records it (the back-end forwards it)."""

    id: str
    kind: str
    user_id: str
    participant_id: str
    client_track_id: str
    mime_type: str
    muted: bool = False
    paused: bool = False
    moderator_muted: bool = False
    layers: tuple[LayerSpec, ...] = ()

    def spec(self, producer_id: str | None = None) -> ProducerSpec:
        return ProducerSpec(
            producer_id=producer_id or self.id,
            kind="audio" if self.kind == "audio" else "video",
            mime_type=self.mime_type,
            client_track_id=self.client_track_id,
            paused=self.paused or self.muted,
            moderator_muted=self.moderator_muted,
            layers=self.layers,
        )


@dataclass
class ConsumerState:
    """One subscription of a peer: what the subscriber asked for."""

    producer_id: str
    kind: str
    paused: bool = False
    audio_only: bool = False


@dataclass
class RouterEntry:
    id: str
    backend: MediaBackend
    node_id: str
    tenant_id: str
    session_id: str
    breakout_room_id: str
    create_time: datetime = field(default_factory=_now)
    close_time: datetime | None = None
    peers: dict[str, Peer] = field(default_factory=dict)  # user id -> peer
    tracks: dict[str, M.Track] = field(default_factory=dict)  # producer id -> track
    producers: dict[str, ProducerState] = field(default_factory=dict)
    #: Video paused for everyone because the room is larger than the configured size.
    audio_only_forced: bool = False

    def proto(self) -> M.Router:
        router = M.Router(
            id=self.id,
            session_id=self.session_id,
            breakout_room_id=self.breakout_room_id,
            backend=_BACKEND_ENUM[self.backend.name],
            node_id=self.node_id or "none",
            status=M.ROUTER_STATUS_CLOSED if self.close_time else M.ROUTER_STATUS_OPEN,
            participant_count=len(self.peers),
            producer_count=len(self.producers),
            consumer_count=sum(len(p.consumers) for p in self.peers.values()),
        )
        router.create_time.CopyFrom(to_timestamp(self.create_time))
        if self.close_time:
            router.close_time.CopyFrom(to_timestamp(self.close_time))
        return router

    def peer_by_id(self, peer_id: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.id == peer_id), None)


class Peer:
    """One participant in one router: its back-end peer id, records and signal buffer."""

    def __init__(self, router: RouterEntry, me: ParticipantRef) -> None:
        self.id = str(uuid.uuid4())
        self.router = router
        self.user_id = me.user_id
        self.participant_id = me.id
        self.seq = 0
        self.buffer: collections.deque[tuple[float, M.ServerSignal]] = collections.deque()
        self.changed = asyncio.Condition()
        self.closed = False
        self.close_error: ClassMeshError | None = None
        self.producers: dict[str, ProducerState] = {}
        self.consumers: dict[str, ConsumerState] = {}  # producer id -> consumer
        #: Set once the back-end has the peer (calls racing its creation wait for it).
        self.ready = asyncio.Event()
        #: Tracks this peer was told about (track_published minus track_unpublished).
        self.announced: set[str] = set()

    def announce(self, track: M.Track, *, published: bool) -> None:
        """Tell the client a track came or went, once each and in that order: a peer being
        created while the room changes is told about a track once (by the broadcast or by
        the snapshot of the room it gets when ready), never of the end of one it never
        heard of."""
        if published == (track.id in self.announced):
            return
        if published:
            self.announced.add(track.id)
            self.push(M.ServerSignal(track_published=track))
        else:
            self.announced.discard(track.id)
            self.push(M.ServerSignal(track_unpublished=track))

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
                # Signals pushed while the last batch was being written (a leave's own ack
                # just before the close) still go out.
                if any(s.seq > cursor for _, s in self.buffer):
                    continue
                if self.close_error is not None:
                    raise self.close_error
                return
            async with self.changed:
                if self.seq == cursor and not self.closed:
                    await self.changed.wait()

    def mark_closed(self, error: ClassMeshError | None = None) -> None:
        """Closed from now on (the signal stream ends, with `error` if given, once it has
        sent what is buffered); the caller frees the back-end peer."""
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        asyncio.get_running_loop().create_task(self._notify())

    async def close(self, error: ClassMeshError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        await self._notify()


def _error_signal(signal_id: str, err: ClassMeshError) -> M.ServerSignal:
    status = common_pb2.RpcStatus.FromString(to_rpc_status(err).SerializeToString())
    return M.ServerSignal(signal_id=signal_id, error=status)


class MediaService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        cfg = runtime.config
        self.routers: dict[str, RouterEntry] = {}  # router id -> entry (closed ones too)
        self.open: dict[tuple[str, str, str], RouterEntry] = {}  # (tenant, session, room)
        self.watchers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        #: Seed 000 STR-032: 5 failed router creations in 60 s open it; half-open after 30 s.
        self.breaker = CircuitBreaker("media router creation", reason="MEDIA_UNAVAILABLE")
        self.aiortc = AiortcBackend(
            workers=cfg.media_workers,
            ice_hosts=cfg.media_ice_hosts,
            queue_size=cfg.media_consumer_queue_size,
            log_level=cfg.log_level,
        )
        self.backends: dict[str, MediaBackend] = {"aiortc": self.aiortc}
        self.aiortc.events = self.on_event
        self._starting: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the media workers (processes now, their connections in the background)
        when aiortc is the configured back-end; otherwise with the first aiortc router."""
        if self.runtime.config.media_backend != "aiortc":
            return
        self.aiortc.spawn()
        with contextlib.suppress(RuntimeError):  # no running loop: started on first use
            self._starting = asyncio.get_running_loop().create_task(self.aiortc.start())

    async def backend(self, name: str) -> MediaBackend:
        """The started back-end `name` ("aiortc" | "janus")."""
        found = self.backends.get(name)
        if found is None:
            if name != "janus":
                raise FailedPrecondition("FEATURE_DISABLED", f"unknown media back-end {name!r}")
            try:
                from classmesh.media.janus.backend import JanusBackend
            except ImportError as exc:
                raise FailedPrecondition(
                    "FEATURE_DISABLED", "the janus back-end is not installed here"
                ) from exc
            janus = JanusBackend.from_config(self.runtime.config)
            janus.events = self.on_event
            self.backends[name] = found = janus
        await found.start()
        return found

    async def close_all(self) -> None:
        for entry in list(self.open.values()):
            await self.close_router(entry)
        for task in self.watchers.values():
            task.cancel()
        for backend in list(self.backends.values()):
            try:
                await backend.close()
            except Exception:  # stop the others anyway
                log.exception("media back-end close failed", extra={"backend": backend.name})

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
        self,
        principal: Principal,
        session_id: str,
        room_id: str,
        *,
        check_session: bool = True,
        backend: M.MediaBackend.ValueType = M.MEDIA_BACKEND_UNSPECIFIED,
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
        name = _BACKEND_NAME.get(backend) or self.runtime.config.media_backend
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
            router_id = str(uuid.uuid4())
            async with self.breaker.guard():
                engine = await self.backend(name)
                node_id = await engine.open_router(router_id)
            entry = RouterEntry(
                id=router_id,
                backend=engine,
                node_id=node_id,
                tenant_id=principal.tenant_id,
                session_id=session_id,
                breakout_room_id=room_id,
            )
            self.open[key] = entry
            self.routers[router_id] = entry
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
        """Close the router: every peer's stream ends, the back-end frees every peer,
        producer and consumer in it."""
        if entry.close_time is not None:
            return
        entry.close_time = _now()
        self.open.pop((entry.tenant_id, entry.session_id, entry.breakout_room_id), None)
        error = FailedPrecondition("SESSION_ENDED", reason) if reason == "session ended" else None
        await asyncio.gather(
            *(peer.close(error) for peer in entry.peers.values()), return_exceptions=True
        )
        try:
            await entry.backend.close_router(entry.id)
        except ClassMeshError as err:
            log.warning("router close failed", extra={"router_id": entry.id, "detail": str(err)})
        entry.producers.clear()
        if not any(k[:2] == (entry.tenant_id, entry.session_id) for k in self.open):
            task = self.watchers.pop((entry.tenant_id, entry.session_id), None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    # ------------------------------------------------------------------ peers

    async def peer(self, principal: Principal, session_id: str, room_id: str) -> Peer:
        """The caller's peer in the room's router (router and peer created on first use)."""
        me = await self.require_signaler(principal, session_id, room_id)
        entry, _ = await self.create_router(principal, session_id, room_id, check_session=False)
        current = entry.peers.get(me.user_id)
        if current is not None and not current.closed:
            await current.ready.wait()  # another call of this user is creating it
            if not current.closed:
                return current
        peer = Peer(entry, me)
        entry.peers[me.user_id] = peer  # at once: one peer per user and router
        # Shielded: a caller that goes away (stream cancelled) must not leave a half-made peer.
        return await asyncio.shield(self._new_peer(entry, me, peer, current))

    async def _new_peer(
        self, entry: RouterEntry, me: ParticipantRef, peer: Peer, current: Peer | None
    ) -> Peer:
        try:
            await entry.backend.add_peer(entry.id, peer.id)
        except ClassMeshError:
            if entry.peers.get(me.user_id) is peer:
                del entry.peers[me.user_id]
            await peer.close()
            raise
        finally:
            peer.ready.set()
        if entry.close_time is not None:  # closed meanwhile
            await peer.close()
            with contextlib.suppress(ClassMeshError):
                await entry.backend.remove_peer(entry.id, peer.id)
            raise NotFound("router", entry.id, reason="ROUTER_NOT_FOUND")
        if current is not None:
            await self._drop_peer(entry, current, None)
        for track in entry.tracks.values():
            if track.user_id != me.user_id:
                peer.announce(track, published=True)
        await self._apply_room_size(entry)
        return peer

    @staticmethod
    def _detach(entry: RouterEntry, peer: Peer, error: ClassMeshError | None) -> None:
        """The synchronous part of dropping a peer: out of the router, stream closing (no
        signal of the room reaches it after this)."""
        if entry.peers.get(peer.user_id) is peer:
            del entry.peers[peer.user_id]
        peer.mark_closed(error)

    async def _drop_peer(
        self, entry: RouterEntry, peer: Peer, error: ClassMeshError | None
    ) -> list[str]:
        """Close a peer that is no longer (or never was) the user's current one: its stream
        ends, the back-end frees it, its tracks are unpublished."""
        self._detach(entry, peer, error)
        with contextlib.suppress(ClassMeshError):
            await entry.backend.remove_peer(entry.id, peer.id)
        unpublished = list(peer.producers)
        for producer_id in unpublished:
            await self._unpublish(entry, peer, producer_id, None)
        await self._apply_room_size(entry)
        return unpublished

    async def disconnect_user(
        self, tenant_id: str, session_id: str, user_id: str, error: ClassMeshError | None
    ) -> list[str]:
        unpublished: list[str] = []
        for key, entry in list(self.open.items()):
            if key[:2] != (tenant_id, session_id):
                continue
            peer = entry.peers.get(user_id)
            if peer is not None:
                unpublished += await self._drop_peer(entry, peer, error)
        return unpublished

    # ------------------------------------------------------------------ back-end events

    async def on_event(self, router_id: str, peer_id: str, event: BackendEvent) -> None:
        """A back-end's event (engine/backend.py) -> signals to the clients concerned."""
        entry = self.routers.get(router_id)
        if entry is None or entry.close_time is not None:
            return
        if isinstance(event, RouterRestarted):
            await self._restarted(entry, event)
            return
        peer = entry.peer_by_id(peer_id)
        if peer is None or peer.closed:
            return
        if isinstance(event, SubscriberOffer):
            peer.push(
                M.ServerSignal(
                    offer=M.SessionDescription(
                        type=M.SDP_TYPE_OFFER,
                        sdp=event.sdp,
                        target=M.PEER_CONNECTION_TARGET_SUBSCRIBER,
                    )
                )
            )
        elif isinstance(event, LocalCandidate):
            peer.push(
                M.ServerSignal(
                    ice_candidate=M.IceCandidate(
                        candidate=event.candidate,
                        sdp_mid=event.sdp_mid,
                        sdp_mline_index=event.sdp_mline_index,
                        target=_TARGET_ENUM[event.target],
                        end_of_candidates=event.end_of_candidates,
                    )
                )
            )
        elif isinstance(event, PeerClosed):
            log.info(
                "media peer connection closed",
                extra={"router_id": router_id, "user_id": peer.user_id, "detail": event.reason},
            )

    async def _restarted(self, entry: RouterEntry, event: RouterRestarted) -> None:
        """The back-end re-opened the router empty: re-add every peer and producer (same
        ids), forget subscriptions, and tell every client to renegotiate."""
        entry.node_id = event.node_id
        log.warning(
            "media router restarted",
            extra={"router_id": entry.id, "node_id": event.node_id, "detail": event.reason},
        )
        for peer in list(entry.peers.values()):
            if peer.closed:
                continue
            try:
                await entry.backend.add_peer(entry.id, peer.id)
                for producer in peer.producers.values():
                    await entry.backend.add_producer(entry.id, peer.id, producer.spec())
            except ClassMeshError as err:
                log.warning("peer re-add failed", extra={"router_id": entry.id, "detail": str(err)})
            peer.consumers.clear()
            peer.push(
                M.ServerSignal(
                    media_restarted=M.MediaRestarted(
                        router_id=entry.id, node_id=event.node_id, reason=event.reason[:200]
                    )
                )
            )

    # ------------------------------------------------------------------ room size

    async def _apply_room_size(self, entry: RouterEntry) -> None:
        """Seed 003 graceful degradation: above the configured size no video for anyone."""
        limit = self.runtime.config.media_audio_only_above
        live = [p for p in entry.peers.values() if not p.closed]
        forced = limit > 0 and len(live) > limit
        if forced == entry.audio_only_forced or entry.close_time is not None:
            return
        entry.audio_only_forced = forced
        for peer in live:
            for consumer in list(peer.consumers.values()):
                if consumer.kind != "video":
                    continue
                with contextlib.suppress(ClassMeshError):
                    await entry.backend.set_consumer_state(
                        entry.id,
                        peer.id,
                        consumer.producer_id,
                        paused=consumer.paused,
                        audio_only=forced or consumer.audio_only,
                    )
                if forced:
                    peer.push(
                        M.ServerSignal(
                            consumer_paused=M.ConsumerPaused(
                                track_id=consumer.producer_id, reason=M.PAUSE_REASON_ROOM_SIZE
                            )
                        )
                    )
                else:
                    peer.push(
                        M.ServerSignal(
                            consumer_resumed=M.ConsumerResumed(track_id=consumer.producer_id)
                        )
                    )

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
        return current.id, target

    async def _move(
        self, principal: Principal, peer: Peer, old: RouterEntry, new: RouterEntry
    ) -> None:
        """Close the peer's consumers and producers in `old`, re-create its producers in `new`
        (on the same publisher connection when the back-end keeps it), replace the
        subscriber connection (the client renegotiates on RouterMoved: the server offers
        again when it subscribes) and announce the new room's tracks."""
        moved = [(p, p.spec(str(uuid.uuid4()))) for p in peer.producers.values()]
        if old.backend is new.backend:
            kept = await old.backend.move_peer(
                old.id, new.id, peer.id, [(p.id, spec) for p, spec in moved]
            )
        else:
            with contextlib.suppress(ClassMeshError):
                await old.backend.remove_peer(old.id, peer.id)
            await new.backend.add_peer(new.id, peer.id)
            for _, spec in moved:
                await new.backend.add_producer(new.id, peer.id, spec)
            kept = False
        if old.peers.get(peer.user_id) is peer:
            del old.peers[peer.user_id]
        peer.consumers.clear()
        olds = [(p, old.tracks.get(p.id)) for p, _ in moved]
        for producer, _ in moved:
            await self._unpublish(old, peer, producer.id, principal, engine=False)
        stale = new.peers.get(peer.user_id)
        peer.router = new
        new.peers[peer.user_id] = peer
        if stale is not None and stale is not peer:
            await stale.close()
            with contextlib.suppress(ClassMeshError):
                await new.backend.remove_peer(new.id, stale.id)
        peer.push(
            M.ServerSignal(
                router_moved=M.RouterMoved(
                    from_router_id=old.id,
                    to_router_id=new.id,
                    breakout_room_id=new.breakout_room_id,
                    republish=not kept,
                )
            )
        )
        peer.announced.clear()  # RouterMoved: the client forgets the old room's tracks
        for track in new.tracks.values():
            if track.user_id != peer.user_id:
                peer.announce(track, published=True)
        for (producer, spec), (_, old_track) in zip(moved, olds, strict=True):
            fresh = ProducerState(
                id=spec.producer_id,
                kind=producer.kind,
                user_id=producer.user_id,
                participant_id=producer.participant_id,
                client_track_id=producer.client_track_id,
                mime_type=producer.mime_type,
                muted=producer.muted,
                paused=producer.paused,
                moderator_muted=producer.moderator_muted,
                layers=producer.layers,
            )
            track = M.Track()
            if old_track is not None:
                track.CopyFrom(old_track)
            track.id = fresh.id
            track.router_id = new.id
            track.breakout_room_id = new.breakout_room_id
            track.publish_time.GetCurrentTime()
            with contextlib.suppress(ClassMeshError):
                await self._log_track(principal, track, published=True)
            new.producers[fresh.id] = fresh
            new.tracks[fresh.id] = track
            peer.producers[fresh.id] = fresh
            for other in list(new.peers.values()):
                if other is not peer and not other.closed:
                    other.announce(track, published=True)
        await self._apply_room_size(old)
        await self._apply_room_size(new)

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
            or (peer.router.session_id, peer.router.breakout_room_id) != (session_id, room_id)
        ):
            peer = await self.peer(principal, session_id, room_id)
        else:
            await self.require_signaler(principal, session_id, room_id)
        try:
            reply = await self._apply(principal, peer, signal)
        except ClassMeshError as err:
            reply = _error_signal(signal.signal_id, err)
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
            sdp = await entry.backend.publisher_offer(
                entry.id, peer.id, desc.sdp, [p.spec() for p in peer.producers.values()]
            )
            self._negotiated(entry, peer, desc.sdp, sdp)
            return M.ServerSignal(
                answer=M.SessionDescription(
                    type=M.SDP_TYPE_ANSWER, sdp=sdp, target=M.PEER_CONNECTION_TARGET_PUBLISHER
                )
            )
        if kind == "answer":
            desc = signal.answer
            _check_sdp(desc, M.SDP_TYPE_ANSWER, "answer")
            await entry.backend.subscriber_answer(entry.id, peer.id, desc.sdp)
            return ack
        if kind == "ice_candidate":
            cand = signal.ice_candidate
            v = Validator()
            v.require_len("signal.ice_candidate.candidate", cand.candidate, 0, 1024)
            v.require_len("signal.ice_candidate.sdp_mid", cand.sdp_mid, 0, 64)
            v.require_range("signal.ice_candidate.sdp_mline_index", cand.sdp_mline_index, 0, 1023)
            v.raise_if_any()
            if cand.candidate:
                await entry.backend.add_ice_candidate(
                    entry.id,
                    peer.id,
                    _TARGET.get(cand.target, "publisher"),
                    cand.candidate,
                    cand.sdp_mid,
                    cand.sdp_mline_index,
                )
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
            return await self._subscribe(peer, signal.subscribe)
        if kind == "unsubscribe":
            ids = [i for i in signal.unsubscribe.track_ids if i in peer.consumers]
            for track_id in ids:
                del peer.consumers[track_id]
            if ids:
                await entry.backend.unsubscribe(entry.id, peer.id, ids)
            return ack
        if kind == "set_preferred_layers":
            layers = signal.set_preferred_layers
            v = Validator()
            v.require_range("signal.set_preferred_layers.spatial_layer", layers.spatial_layer, 0, 2)
            v.require_range(
                "signal.set_preferred_layers.temporal_layer", layers.temporal_layer, 0, 2
            )
            v.raise_if_any()
            if layers.track_id not in peer.consumers:
                raise NotFound("track", layers.track_id, reason="TRACK_NOT_FOUND")
            await entry.backend.set_preferred_layers(
                entry.id, peer.id, layers.track_id, layers.spatial_layer, layers.temporal_layer
            )
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
                    producer.muted = False
                track = entry.tracks.get(producer.id)
                if track is not None:
                    track.paused = paused
                    track.muted = producer.muted or producer.moderator_muted
                await entry.backend.set_producer_state(
                    entry.id,
                    producer.id,
                    paused=producer.paused or producer.muted,
                    moderator_muted=producer.moderator_muted,
                )
                self._broadcast_pause(entry, producer, paused, M.PAUSE_REASON_PRODUCER)
            else:
                mine = peer.consumers.get(msg.track_id)
                if mine is None:
                    raise NotFound("track", msg.track_id, reason="TRACK_NOT_FOUND")
                mine.paused = paused
                await entry.backend.set_consumer_state(
                    entry.id,
                    peer.id,
                    mine.producer_id,
                    paused=paused,
                    audio_only=mine.audio_only or entry.audio_only_forced,
                )
            return ack
        if kind == "leave":
            reply = peer.push(M.ServerSignal(signal_id=signal.signal_id, ack=M.SignalAck()))
            self._detach(entry, peer, None)  # the ack is the last signal of this peer
            # Shielded: the client may cancel its stream as soon as it has the ack.
            await asyncio.shield(self._drop_peer(entry, peer, None))
            return reply
        raise Unimplemented("UNIMPLEMENTED", f"{kind} is not implemented yet")

    @staticmethod
    def _negotiated(entry: RouterEntry, peer: Peer, offer: str, answer: str) -> None:
        """Record the codec the answer chose for each of the peer's tracks (the back-end
        may take another forwarded codec the offer has when it lacks the requested one)."""
        try:
            tracks = {
                m.rtp.muxId: m.msid.split()[-1]
                for m in SessionDescription.parse(offer).media
                if m.msid
            }
            chosen = {
                m.rtp.muxId: m.rtp.codecs[0].mimeType
                for m in SessionDescription.parse(answer).media
                if m.rtp.codecs
            }
        except (ValueError, IndexError, AttributeError):
            return
        by_client = {p.client_track_id: p for p in peer.producers.values()}
        for mid, track_id in tracks.items():
            producer = by_client.get(track_id)
            mime = chosen.get(mid)
            if producer is None or mime is None or mime.lower() == producer.mime_type.lower():
                continue
            producer.mime_type = mime
            track = entry.tracks.get(producer.id)
            if track is not None:
                track.mime_type = mime

    async def _subscribe(self, peer: Peer, sub: M.SubscribeTracks) -> M.ServerSignal:
        entry = peer.router
        v = Validator()
        v.check(1 <= len(sub.track_ids) <= 100, "signal.subscribe.track_ids", "1-100 ids")
        v.require_range("signal.subscribe.spatial_layer", sub.spatial_layer, 0, 2)
        v.require_range("signal.subscribe.temporal_layer", sub.temporal_layer, 0, 2)
        v.raise_if_any()
        for track_id in sub.track_ids:
            if track_id not in entry.producers:
                raise NotFound("track", track_id, reason="TRACK_NOT_FOUND")
        ids = list(dict.fromkeys(sub.track_ids))
        new = [i for i in ids if i not in peer.consumers]
        await entry.backend.subscribe(
            entry.id,
            peer.id,
            ids,
            audio_only=sub.audio_only or entry.audio_only_forced,
            spatial_layer=sub.spatial_layer if sub.HasField("spatial_layer") else 2,
            temporal_layer=sub.temporal_layer if sub.HasField("temporal_layer") else 2,
        )
        for track_id in ids:
            state = peer.consumers.get(track_id)
            if state is None:
                state = peer.consumers[track_id] = ConsumerState(
                    track_id, entry.producers[track_id].kind
                )
            state.audio_only = sub.audio_only
        if entry.audio_only_forced:
            for track_id in new:
                if peer.consumers[track_id].kind == "video":
                    peer.push(
                        M.ServerSignal(
                            consumer_paused=M.ConsumerPaused(
                                track_id=track_id, reason=M.PAUSE_REASON_ROOM_SIZE
                            )
                        )
                    )
        return M.ServerSignal(ack=M.SignalAck())

    async def _publish(
        self, principal: Principal, peer: Peer, pub: M.PublishTrack
    ) -> M.ServerSignal:
        entry = peer.router
        v = Validator()
        v.require_len("signal.publish.client_track_id", pub.client_track_id, 1, 128)
        v.require_enum("signal.publish.kind", pub.kind, list(_KIND))
        v.require_len("signal.publish.name", pub.name, 0, 100)
        v.require_len("signal.publish.preferred_codec", pub.preferred_codec, 0, 64)
        v.check(len(pub.layers) <= 3, "signal.publish.layers", "at most 3 encodings")
        for i, layer in enumerate(pub.layers):
            v.require_range(f"signal.publish.layers[{i}].spatial_layer", layer.spatial_layer, 0, 2)
            v.require_len(f"signal.publish.layers[{i}].rid", layer.rid, 0, 16)
        v.raise_if_any()
        kind = _KIND[pub.kind]
        supported = CODECS_BY_BACKEND.get(entry.backend.name, CODECS_BY_BACKEND["aiortc"])[kind]
        mime = supported[0]
        if pub.preferred_codec:
            wanted = pub.preferred_codec.lower()
            match = next((m for m in supported if m.lower() == wanted), None)
            if match is None:
                raise InvalidArgument(
                    [
                        (
                            "signal.publish.preferred_codec",
                            f"the {entry.backend.name} back-end forwards only "
                            + ", ".join(supported),
                        )
                    ],
                    reason="CODEC_NOT_SUPPORTED",
                    metadata={"codec": pub.preferred_codec, "supported": ",".join(supported)},
                )
            mime = match
        producer = ProducerState(
            id=str(uuid.uuid4()),
            kind=kind,
            user_id=peer.user_id,
            participant_id=peer.participant_id,
            client_track_id=pub.client_track_id,
            mime_type=mime,
            muted=pub.muted,
            layers=tuple(
                LayerSpec(
                    spatial_layer=layer.spatial_layer,
                    rid=layer.rid,
                    width=layer.width,
                    height=layer.height,
                    max_bitrate_bps=layer.max_bitrate_bps,
                )
                for layer in pub.layers
            ),
        )
        source = pub.source or (
            M.TRACK_SOURCE_MICROPHONE if kind == "audio" else M.TRACK_SOURCE_CAMERA
        )
        track = M.Track(
            id=producer.id,
            router_id=entry.id,
            session_id=entry.session_id,
            breakout_room_id=entry.breakout_room_id,
            participant_id=peer.participant_id,
            user_id=peer.user_id,
            kind=pub.kind,
            source=source,
            name=pub.name,
            mime_type=producer.mime_type,
            muted=pub.muted,
            layers=pub.layers,
            client_track_id=pub.client_track_id,
        )
        track.publish_time.GetCurrentTime()
        await entry.backend.add_producer(entry.id, peer.id, producer.spec())
        try:
            await self._log_track(principal, track, published=True)
        except ClassMeshError:
            with contextlib.suppress(ClassMeshError):
                await entry.backend.remove_producer(entry.id, producer.id)
            raise
        entry.producers[producer.id] = producer
        entry.tracks[producer.id] = track
        peer.producers[producer.id] = producer
        for other in list(entry.peers.values()):
            if other is not peer and not other.closed:
                other.announce(track, published=True)
        return M.ServerSignal(
            publish_accepted=M.PublishAccepted(client_track_id=pub.client_track_id, track=track)
        )

    async def _unpublish(
        self,
        entry: RouterEntry,
        peer: Peer,
        producer_id: str,
        principal: Principal | None,
        *,
        engine: bool = True,
    ) -> None:
        peer.producers.pop(producer_id, None)
        entry.producers.pop(producer_id, None)
        if engine:
            with contextlib.suppress(ClassMeshError):
                await entry.backend.remove_producer(entry.id, producer_id)
        track = entry.tracks.pop(producer_id, None)
        if track is None:
            return
        for other in list(entry.peers.values()):
            other.consumers.pop(producer_id, None)
            if other is not peer and not other.closed:
                other.announce(track, published=False)
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
        self, entry: RouterEntry, producer: ProducerState, paused: bool, reason: Any
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
            await self.moderate(tenant_id, session_id, user_id, sources, muted)
        return False

    async def moderate(
        self, tenant_id: str, session_id: str, user_id: str, sources: set[int], muted: bool
    ) -> None:
        for key, entry in list(self.open.items()):
            if key[:2] != (tenant_id, session_id):
                continue
            for producer in list(entry.producers.values()):
                track = entry.tracks.get(producer.id)
                if producer.user_id != user_id or track is None or track.source not in sources:
                    continue
                producer.moderator_muted = muted
                track.muted = muted or producer.muted
                with contextlib.suppress(ClassMeshError):
                    await entry.backend.set_producer_state(
                        entry.id,
                        producer.id,
                        paused=producer.paused or producer.muted,
                        moderator_muted=muted,
                    )
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
            key=lambda e: (e.session_id, e.breakout_room_id != "", e.create_time, e.id),
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
        """What the room's back-end negotiates: the codecs it forwards (passthrough never
        transcodes, so every peer must use the publisher's codec) and aiortc's header
        extensions; simulcast only on the janus back-end."""
        self.check_token(principal, session_id)
        entry = self.open.get((principal.tenant_id, session_id, room_id))
        name = entry.backend.name if entry else self.runtime.config.media_backend
        simulcast = entry.backend.simulcast if entry else name == "janus"
        caps = M.RouterCapabilities(simulcast=simulcast, max_spatial_layer=2 if simulcast else 0)
        forwarded = CODECS_BY_BACKEND.get(name, CODECS_BY_BACKEND["aiortc"])
        for kind, mimes in forwarded.items():
            for codec in CODECS[kind]:
                if codec.mimeType.lower() not in {m.lower() for m in mimes}:
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
        return (entry.id if entry else ""), caps

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

    async def media_stats(
        self, principal: Principal, session_id: str, room_id: str | None, user_id: str
    ) -> tuple[list[M.RouterStats], list[M.WorkerStats]]:
        """Figures of the session's routers (sampled in the back-end) and, for admins,
        of every media worker."""
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
            try:
                data = await entry.backend.stats(entry.id)
            except ClassMeshError as err:
                raise Unavailable(
                    "MEDIA_UNAVAILABLE", 1.0, f"media figures unavailable: {err.message}"
                ) from err
            stats = M.RouterStats(
                router_id=entry.id,
                breakout_room_id=room,
                ingress_bitrate_bps=data.ingress_bitrate_bps,
                egress_bitrate_bps=data.egress_bitrate_bps,
                producer_count=data.producers,
                consumer_count=data.consumers,
                forwarded_frames=data.forwarded_frames,
                forwarded_bytes=data.forwarded_bytes,
                dropped_frames=data.dropped_frames,
                received_frames=data.received_frames,
            )
            stats.sample_time.GetCurrentTime()
            rows = {row.peer_id: row for row in data.participants}
            for uid_, peer in sorted(entry.peers.items()):
                if user_id and uid_ != user_id:
                    continue
                row = rows.get(peer.id)
                if row is None:
                    continue
                item = M.ParticipantMediaStats(
                    participant_id=peer.participant_id,
                    user_id=uid_,
                    send_bitrate_bps=row.send_bitrate_bps,
                    receive_bitrate_bps=row.receive_bitrate_bps,
                    packets_lost=row.packets_lost,
                    packet_loss_ratio=row.packet_loss_ratio,
                    producer_count=row.producers,
                    consumer_count=row.consumers,
                    quality=_quality(row.packet_loss_ratio, row.rtt_seconds),
                    forwarded_frames=row.forwarded_frames,
                    forwarded_bytes=row.forwarded_bytes,
                    dropped_frames=row.dropped_frames,
                    received_frames=row.received_frames,
                )
                item.jitter.FromNanoseconds(int(row.jitter_seconds * 1e9))
                item.round_trip_time.FromNanoseconds(int(row.rtt_seconds * 1e9))
                stats.participants.append(item)
            out.append(stats)
        workers: list[M.WorkerStats] = []
        if principal.role == "admin":
            for backend in list(self.backends.values()):
                with contextlib.suppress(ClassMeshError):
                    for w in await backend.worker_stats():
                        workers.append(
                            M.WorkerStats(
                                worker_id=w.worker_id,
                                backend=_BACKEND_ENUM[backend.name],
                                pid=w.pid,
                                alive=w.alive,
                                restarts=w.restarts,
                                router_count=w.routers,
                                peer_count=w.peers,
                                producer_count=w.producers,
                                consumer_count=w.consumers,
                                forwarded_frames=w.forwarded_frames,
                                forwarded_bytes=w.forwarded_bytes,
                                dropped_frames=w.dropped_frames,
                                received_frames=w.received_frames,
                                connection_count=w.connections,
                            )
                        )
        return out, workers


def _quality(loss: float, rtt: float) -> Any:
    """The grades of ConnectionQuality (RTT 0 = not measured yet)."""
    if rtt == 0 and loss == 0:
        return M.CONNECTION_QUALITY_UNSPECIFIED
    if loss < 0.02 and rtt < 0.150:
        return M.CONNECTION_QUALITY_EXCELLENT
    if loss < 0.05 and rtt < 0.300:
        return M.CONNECTION_QUALITY_GOOD
    return M.CONNECTION_QUALITY_POOR


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
