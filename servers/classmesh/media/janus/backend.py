"""`JanusBackend`: the MediaBackend contract (engine/backend.py) on a Janus videoroom.

Mapping:

- router -> one videoroom room, id = the router id (the videoroom runs with
  `string_ids = true`, conf/janus.plugin.videoroom.jcfg), VP8 + Opus, simulcast accepted
  (Janus detects rid / SSRC simulcast in the publisher's offer), a random room secret;
- peer -> a Janus *feed* id = the peer id, with two handles attached on first use:
  publisher (`joinandconfigure` with the client's offer -> Janus answers; later offers
  `configure`) and one multistream subscriber (`join` with `streams` -> Janus *offers*;
  later `update` with subscribe/unsubscribe lists -> Janus offers again; the client's answer
  goes back with `start`);
- producer -> one stream of the feed, named by its publisher-side `mid`, bound by the
  offer's msid track id (= client_track_id), else the next unbound stream of its kind;
- consumer -> one stream of the peer's subscriber handle (its own `mid`), for (feed, mid).

Subscriptions to a producer whose publisher has not sent its offer yet wait until Janus has
the feed; changes while an offer is outstanding wait for the answer (one offer at a time).
Janus renegotiates subscribers by itself when a feed they receive goes away: those offers
are emitted as `SubscriberOffer` too.

Forwarding control: producer paused / moderator-muted -> videoroom `moderate` (mute the
feed's mid: Janus stops relaying it to everyone); consumer paused or audio-only -> subscriber
`configure` with `send: false` on its mid; preferred layers -> subscriber `configure` with
`substream` / `temporal` (Janus switches on the target layer's next keyframe and asks the
publisher for one).

Figures: counts come from this object; transport figures from the admin API's
`handle_info` (per mid: bytes, bytes last second, RTCP loss, jitter, RTT) when
CLASSMESH_JANUS_ADMIN_URL is set. Janus counts RTP packets, never frames: forwarded /
dropped / received *frames* are reported as 0 on this back-end (documented in the README).

Janus down -> every call raises Unavailable MEDIA_UNAVAILABLE (the service's circuit breaker
around router creation counts them). Janus restarted (our session gone) -> a new session,
every open room re-created empty, `RouterRestarted` per router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from classmesh.core.config import Config
from classmesh.core.errors import (
    ClassMeshError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from classmesh.media.engine.backend import (
    BackendEvent,
    BackendName,
    EventSink,
    LocalCandidate,
    ParticipantStatsData,
    PeerClosed,
    ProducerSpec,
    RouterRestarted,
    RouterStatsData,
    SubscriberOffer,
    Target,
    WorkerStatsData,
)
from classmesh.media.janus.client import JanusClient, JanusReply
from classmesh.media.janus.sdp import MediaSection, media_sections

__all__ = ["JanusBackend", "NODE_ID", "PLUGIN"]

log = logging.getLogger("classmesh.media.janus")

PLUGIN = "janus.plugin.videoroom"
NODE_ID = "janus"
#: Publishers a room accepts (a feed per participant that publishes).
MAX_PUBLISHERS = 1000
#: Janus asks publishers for a keyframe this often (s), besides on every new subscriber.
FIR_FREQ = 10
_ROOM_EXISTS = "427"
#: Seconds a moved publisher's old (muted) connection is kept at most.
RETIRE_SECONDS = 15.0


@dataclass
class _Producer:
    spec: ProducerSpec
    peer_id: str
    #: Publisher-side mid in Janus once bound ("" = not bound yet).
    mid: str = ""
    simulcast: bool = False


@dataclass
class _Consumer:
    producer_id: str
    #: Subscriber-side mid ("" until Janus has added the stream).
    mid: str = ""
    paused: bool = False
    audio_only: bool = False
    substream: int = 2
    temporal: int = 2


@dataclass
class _Peer:
    peer_id: str
    pub_handle: int = 0
    sub_handle: int = 0
    #: The feed exists in Janus (joinandconfigure done).
    published: bool = False
    #: Its PeerConnection is up (`webrtcup`): Janus accepts subscriptions to it from then.
    feed_up: bool = False
    #: Streams of the last publisher offer, by mid.
    sections: dict[str, MediaSection] = field(default_factory=dict)
    sub_joined: bool = False
    offer_outstanding: bool = False
    #: (feed, mid) streams to unsubscribe at the next update.
    pending_drop: list[tuple[str, str]] = field(default_factory=list)
    #: producer id -> consumer (wanted; `mid` set once Janus added it).
    consumers: dict[str, _Consumer] = field(default_factory=dict)
    #: Client candidates that arrived before the handle existed.
    early_candidates: dict[str, list[tuple[str, str, int]]] = field(
        default_factory=lambda: {"publisher": [], "subscriber": []}
    )
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    #: Last sampled (lost, packets) of the published streams, for the loss ratio.
    last_loss: tuple[int, int] = (0, 0)


@dataclass
class _Room:
    router_id: str
    secret: str
    peers: dict[str, _Peer] = field(default_factory=dict)
    producers: dict[str, _Producer] = field(default_factory=dict)


class JanusBackend:
    """MediaBackend on one Janus server (see the module docstring)."""

    name: BackendName = "janus"
    simulcast: bool = True

    def __init__(
        self,
        url: str,
        *,
        admin_url: str = "",
        admin_secret: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.events: EventSink | None = None
        self.client = JanusClient(
            url,
            admin_url=admin_url,
            admin_secret=admin_secret,
            timeout=timeout,
            on_event=self._on_janus_event,
            on_session_lost=self._on_session_lost,
        )
        self.rooms: dict[str, _Room] = {}
        #: handle id -> (router id, peer id, target)
        self.handles: dict[int, tuple[str, str, Target]] = {}
        self._control = 0
        self._started = False
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._queue: asyncio.Queue[tuple[str, str, BackendEvent]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: (router id, peer id) -> the old publisher handle of a peer moved there.
        self._retiring: dict[tuple[str, str], int] = {}

    @classmethod
    def from_config(cls, config: Config) -> JanusBackend:
        return cls(
            config.janus_url,
            admin_url=config.janus_admin_url,
            admin_secret=config.janus_admin_secret,
            timeout=config.media_call_timeout_seconds,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to Janus. Janus being down does not stop the service: every call
        retries the connection and fails Unavailable MEDIA_UNAVAILABLE meanwhile."""
        self._closed = False
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_events())
        try:
            await self._connect()
        except Unavailable as exc:
            log.warning("Janus unavailable at start", extra={"detail": exc.message})

    async def _connect(self) -> None:
        async with self._connect_lock:
            if self._started:
                return
            if self._closed:
                raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "the Janus back-end is closed")
            await self.client.start()
            info = await self.client.info()
            if PLUGIN not in (info.get("plugins") or {}):
                await self.client.close()
                raise Unavailable(
                    "MEDIA_UNAVAILABLE", 5.0, f"Janus at {self.client.url} has no {PLUGIN}"
                )
            self._control = await self.client.attach(PLUGIN)
            self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        for router_id in list(self.rooms):
            with contextlib.suppress(ClassMeshError):
                await self.close_router(router_id)
        self._closed = True
        self._started = False
        await self.client.close()
        for task in list(self._tasks):
            task.cancel()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None

    # ------------------------------------------------------------------ routers

    async def open_router(self, router_id: str) -> str:
        await self._connect()
        room = _Room(router_id=router_id, secret=secrets.token_hex(12))
        body = {
            "request": "create",
            "room": router_id,
            "description": f"ClassMesh router {router_id}",
            "secret": room.secret,
            "is_private": True,
            "publishers": MAX_PUBLISHERS,
            "bitrate": 0,
            "fir_freq": FIR_FREQ,
            "videocodec": "vp8",
            "audiocodec": "opus",
            "notify_joining": False,
            "transport_wide_cc_ext": True,
        }
        try:
            await self.client.message(self._control, body, what=router_id)
        except ClassMeshError as exc:
            if _ROOM_EXISTS not in exc.message:
                raise _room_error(exc) from exc
            # Left over from an earlier run (Janus kept it): an open router starts empty.
            await self.client.message(
                self._control, {"request": "destroy", "room": router_id}, what=router_id
            )
            await self.client.message(self._control, body, what=router_id)
        self.rooms[router_id] = room
        return NODE_ID

    async def close_router(self, router_id: str) -> None:
        room = self.rooms.pop(router_id, None)
        if room is None:
            return
        for peer in room.peers.values():
            peer.closed = True
            await self._retire_now(router_id, peer.peer_id)
        with contextlib.suppress(ClassMeshError):
            await self.client.message(
                self._control,
                {"request": "destroy", "room": router_id, "secret": room.secret},
                what=router_id,
            )
        await asyncio.gather(
            *(self._detach(peer) for peer in room.peers.values()), return_exceptions=True
        )

    def _room(self, router_id: str) -> _Room:
        room = self.rooms.get(router_id)
        if room is None:
            raise NotFound("router", router_id, reason="ROUTER_NOT_FOUND")
        return room

    def _peer(self, router_id: str, peer_id: str) -> tuple[_Room, _Peer]:
        room = self._room(router_id)
        peer = room.peers.get(peer_id)
        if peer is None or peer.closed:
            raise NotFound("peer", peer_id, reason="ROUTER_NOT_FOUND")
        return room, peer

    # ------------------------------------------------------------------ peers

    async def add_peer(self, router_id: str, peer_id: str) -> None:
        room = self._room(router_id)
        if peer_id not in room.peers or room.peers[peer_id].closed:
            room.peers[peer_id] = _Peer(peer_id)

    async def remove_peer(self, router_id: str, peer_id: str) -> None:
        room = self.rooms.get(router_id)
        if room is None:
            return
        peer = room.peers.pop(peer_id, None)
        if peer is None:
            return
        peer.closed = True
        await self._retire_now(router_id, peer_id)
        gone = [pid for pid, p in room.producers.items() if p.peer_id == peer_id]
        for producer_id in gone:
            room.producers.pop(producer_id, None)
        # Janus drops the feed's streams from every subscriber and offers them again.
        for other in room.peers.values():
            for producer_id in gone:
                other.consumers.pop(producer_id, None)
        await self._detach(peer)

    async def _detach(self, peer: _Peer) -> None:
        for handle in (peer.pub_handle, peer.sub_handle):
            if handle:
                self.handles.pop(handle, None)
                await self.client.detach(handle)
        peer.pub_handle = peer.sub_handle = 0

    async def move_peer(
        self,
        from_router_id: str,
        to_router_id: str,
        peer_id: str,
        producers: Sequence[tuple[str, ProducerSpec]],
    ) -> bool:
        """A Janus publisher cannot change rooms: the peer leaves the old room and starts
        afresh in the new one, where its producers wait for the client's next publisher
        offer. Always False: the client publishes again.

        The old publisher connection is muted (`moderate`) but kept until that offer
        arrives (or `RETIRE_SECONDS`): closing it first would end the client's local tracks
        (an aiortc sender stops its track when its connection fails) before the client
        could move them to the new connection."""
        self._room(to_router_id)
        old_room = self.rooms.get(from_router_id)
        peer = old_room.peers.get(peer_id) if old_room is not None else None
        retiring = 0
        if old_room is not None and peer is not None and peer.pub_handle and peer.published:
            for producer in list(old_room.producers.values()):
                if producer.peer_id == peer_id and producer.mid:
                    with contextlib.suppress(ClassMeshError):
                        await self._moderate(old_room, producer, muted=True)
            retiring = peer.pub_handle
            self.handles.pop(retiring, None)
            peer.pub_handle = 0
        await self.remove_peer(from_router_id, peer_id)
        await self.add_peer(to_router_id, peer_id)
        for _, spec in producers:
            await self.add_producer(to_router_id, peer_id, spec)
        if retiring:
            key = (to_router_id, peer_id)
            self._retiring[key] = retiring
            self._background(self._retire_later(key, retiring))
        return False

    async def _retire_later(self, key: tuple[str, str], handle: int) -> None:
        await asyncio.sleep(RETIRE_SECONDS)
        if self._retiring.get(key) == handle:
            del self._retiring[key]
            await self.client.detach(handle)

    async def _retire_now(self, router_id: str, peer_id: str) -> None:
        handle = self._retiring.pop((router_id, peer_id), 0)
        if handle:
            await self.client.detach(handle)

    # ------------------------------------------------------------------ publishing

    async def publisher_offer(
        self, router_id: str, peer_id: str, sdp: str, producers: Sequence[ProducerSpec]
    ) -> str:
        room, peer = self._peer(router_id, peer_id)
        for spec in producers:
            if spec.producer_id not in room.producers:
                room.producers[spec.producer_id] = _Producer(spec, peer_id)
        async with peer.lock:
            if not peer.pub_handle:
                peer.pub_handle = await self.client.attach(PLUGIN)
                self.handles[peer.pub_handle] = (router_id, peer_id, "publisher")
            jsep = {"type": "offer", "sdp": sdp}
            if not peer.published:
                reply = await self.client.message(
                    peer.pub_handle,
                    {
                        "request": "joinandconfigure",
                        "ptype": "publisher",
                        "room": router_id,
                        "id": peer_id,
                        "display": peer_id,
                    },
                    jsep=jsep,
                    what=router_id,
                )
                peer.published = True
            else:
                reply = await self.client.message(
                    peer.pub_handle, {"request": "configure"}, jsep=jsep, what=router_id
                )
            if reply.jsep is None or reply.jsep.get("type") != "answer":
                raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "Janus answered no SDP answer")
            peer.sections = {s.mid: s for s in media_sections(sdp) if s.mid}
            self._bind(room, peer, reply)
            await self._flush_candidates(peer, "publisher")
        # The client has moved its tracks to this connection: the old one may close.
        await self._retire_now(router_id, peer_id)
        for producer in room.producers.values():
            if producer.peer_id == peer_id and producer.mid:
                await self._apply_producer_state(room, producer)
        if peer.feed_up:  # a renegotiation may have added streams
            self._background(self._feed_up(room, peer))
        return str(reply.jsep["sdp"])

    def _bind(self, room: _Room, peer: _Peer, reply: JanusReply | None) -> None:
        """Bind the peer's unbound producers to the streams of its last offer."""
        simulcast: dict[str, bool] = {}
        if reply is not None:
            for stream in reply.data.get("streams") or []:
                mid = str(stream.get("mid", ""))
                simulcast[mid] = bool(stream.get("simulcast"))
        mine = [p for p in room.producers.values() if p.peer_id == peer.peer_id]
        taken = {p.mid for p in mine if p.mid}
        sending = [s for s in peer.sections.values() if s.direction in ("sendrecv", "sendonly")]
        for producer in mine:
            if producer.mid and producer.mid in peer.sections:
                continue
            producer.mid = ""
            match = (
                next(
                    (
                        s
                        for s in sending
                        if s.mid not in taken
                        and s.track_id
                        and s.track_id == producer.spec.client_track_id
                    ),
                    None,
                )
                or next(
                    (
                        s
                        for s in sending
                        if s.mid not in taken
                        and s.kind == producer.spec.kind
                        and s.mid == producer.spec.client_track_id
                    ),
                    None,
                )
                or next(
                    (s for s in sending if s.mid not in taken and s.kind == producer.spec.kind),
                    None,
                )
            )
            if match is not None:
                producer.mid = match.mid
                producer.simulcast = simulcast.get(match.mid, False) or len(match.rids) > 1
                taken.add(match.mid)

    async def add_producer(self, router_id: str, peer_id: str, spec: ProducerSpec) -> None:
        room, peer = self._peer(router_id, peer_id)
        current = room.producers.get(spec.producer_id)
        if current is not None:
            current.spec = spec
            if current.mid:
                await self._apply_producer_state(room, current)
            return
        producer = _Producer(spec, peer_id)
        room.producers[spec.producer_id] = producer
        if peer.published:
            self._bind(room, peer, None)
            if producer.mid:
                await self._apply_producer_state(room, producer)
                if peer.feed_up:
                    self._background(self._feed_up(room, peer))

    async def remove_producer(self, router_id: str, producer_id: str) -> None:
        room = self.rooms.get(router_id)
        if room is None:
            return
        producer = room.producers.pop(producer_id, None)
        if producer is None:
            return
        if producer.mid:
            # The client may keep sending: Janus relays nothing of it any more.
            with contextlib.suppress(ClassMeshError):
                await self._moderate(room, producer, muted=True)
        for peer in list(room.peers.values()):
            if producer_id in peer.consumers:
                consumer = peer.consumers.pop(producer_id)
                if consumer.mid:
                    await self._sync(room, peer, drop=[(producer.peer_id, producer.mid)])

    async def set_producer_state(
        self, router_id: str, producer_id: str, *, paused: bool, moderator_muted: bool
    ) -> None:
        room = self._room(router_id)
        producer = room.producers.get(producer_id)
        if producer is None:
            raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        spec = producer.spec
        producer.spec = ProducerSpec(
            producer_id=spec.producer_id,
            kind=spec.kind,
            mime_type=spec.mime_type,
            client_track_id=spec.client_track_id,
            paused=paused,
            moderator_muted=moderator_muted,
            layers=spec.layers,
        )
        if producer.mid:
            await self._apply_producer_state(room, producer)

    async def _apply_producer_state(self, room: _Room, producer: _Producer) -> None:
        muted = producer.spec.paused or producer.spec.moderator_muted
        await self._moderate(room, producer, muted=muted)

    async def _moderate(self, room: _Room, producer: _Producer, *, muted: bool) -> None:
        await self.client.message(
            self._control,
            {
                "request": "moderate",
                "room": room.router_id,
                "secret": room.secret,
                "id": producer.peer_id,
                "mid": producer.mid,
                "mute": muted,
            },
            what=producer.spec.producer_id,
        )

    # ------------------------------------------------------------------ subscribing

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
        room, peer = self._peer(router_id, peer_id)
        for producer_id in producer_ids:
            if producer_id not in room.producers:
                raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        changed: list[_Consumer] = []
        for producer_id in dict.fromkeys(producer_ids):
            consumer = peer.consumers.get(producer_id)
            if consumer is None:
                peer.consumers[producer_id] = _Consumer(
                    producer_id,
                    audio_only=audio_only,
                    substream=spatial_layer,
                    temporal=temporal_layer,
                )
            elif consumer.audio_only != audio_only:
                consumer.audio_only = audio_only
                changed.append(consumer)
        await self._sync(room, peer)
        if changed:
            await self._configure(room, peer, changed)

    async def unsubscribe(self, router_id: str, peer_id: str, producer_ids: Sequence[str]) -> None:
        room, peer = self._peer(router_id, peer_id)
        drop: list[tuple[str, str]] = []
        for producer_id in producer_ids:
            consumer = peer.consumers.pop(producer_id, None)
            producer = room.producers.get(producer_id)
            if consumer is not None and consumer.mid and producer is not None:
                drop.append((producer.peer_id, producer.mid))
        if drop:
            await self._sync(room, peer, drop=drop)

    async def _sync(self, room: _Room, peer: _Peer, drop: Sequence[tuple[str, str]] = ()) -> None:
        """Bring the subscriber handle's streams in line with `peer.consumers`: join (first
        time) or update; Janus answers with a new offer, emitted as SubscriberOffer."""
        async with peer.lock:
            peer.pending_drop.extend(drop)
            if peer.offer_outstanding or peer.closed:
                return  # after the answer
            add: list[dict[str, str]] = []
            for consumer in peer.consumers.values():
                producer = room.producers.get(consumer.producer_id)
                if consumer.mid or producer is None or not self._ready(room, producer):
                    continue
                add.append({"feed": producer.peer_id, "mid": producer.mid})
            remove = [{"feed": feed, "mid": mid} for feed, mid in peer.pending_drop]
            peer.pending_drop = []
            if not add and not remove:
                return
            if not peer.sub_handle:
                peer.sub_handle = await self.client.attach(PLUGIN)
                self.handles[peer.sub_handle] = (room.router_id, peer.peer_id, "subscriber")
            if not peer.sub_joined:
                if not add:
                    return
                reply = await self.client.message(
                    peer.sub_handle,
                    {
                        "request": "join",
                        "ptype": "subscriber",
                        "room": room.router_id,
                        "streams": add,
                        "use_msid": False,
                    },
                    what=room.router_id,
                )
                peer.sub_joined = True
                await self._flush_candidates(peer, "subscriber")
            else:
                body: dict[str, Any] = {"request": "update"}
                if add:
                    body["subscribe"] = add
                if remove:
                    body["unsubscribe"] = remove
                reply = await self.client.message(peer.sub_handle, body, what=room.router_id)
            self._map_streams(room, peer, reply.data)
            if reply.jsep is not None and reply.jsep.get("type") == "offer":
                peer.offer_outstanding = True
                self._emit(room.router_id, peer.peer_id, SubscriberOffer(str(reply.jsep["sdp"])))

    @staticmethod
    def _ready(room: _Room, producer: _Producer) -> bool:
        """Janus accepts subscriptions to a stream once its feed's PeerConnection is up."""
        owner = room.peers.get(producer.peer_id)
        return bool(producer.mid) and owner is not None and owner.feed_up

    async def _feed_up(self, room: _Room, peer: _Peer) -> None:
        """Subscribers that were waiting for this feed."""
        for other in list(room.peers.values()):
            if other is peer or other.closed:
                continue
            if any(
                not c.mid
                and c.producer_id in room.producers
                and room.producers[c.producer_id].peer_id == peer.peer_id
                for c in other.consumers.values()
            ):
                try:
                    await self._sync(room, other)
                except ClassMeshError as exc:
                    log.warning("subscription failed", extra={"detail": exc.message})

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _map_streams(self, room: _Room, peer: _Peer, data: dict[str, Any]) -> None:
        """Record the subscriber-side mid of each consumer from Janus's stream list."""
        streams = data.get("streams")
        if not isinstance(streams, list):
            return
        by_feed = {(p.peer_id, p.mid): pid for pid, p in room.producers.items() if p.mid}
        present: set[str] = set()
        for stream in streams:
            if not stream.get("active", True) or "feed_id" not in stream:
                continue
            producer_id = by_feed.get((str(stream["feed_id"]), str(stream.get("feed_mid", ""))))
            consumer = peer.consumers.get(producer_id or "")
            if consumer is not None and producer_id is not None:
                consumer.mid = str(stream.get("mid", ""))
                present.add(producer_id)
        for producer_id, consumer in peer.consumers.items():
            if producer_id not in present:
                consumer.mid = ""

    async def subscriber_answer(self, router_id: str, peer_id: str, sdp: str) -> None:
        room, peer = self._peer(router_id, peer_id)
        async with peer.lock:
            if not peer.offer_outstanding or not peer.sub_handle:
                raise FailedPrecondition("SDP_INVALID", "no offer is pending on the subscriber")
            await self.client.message(
                peer.sub_handle,
                {"request": "start"},
                jsep={"type": "answer", "sdp": sdp},
                what=router_id,
            )
            peer.offer_outstanding = False
        # Consumers' own state (paused, audio-only, layers) on their (new) mids.
        await self._configure(
            room,
            peer,
            [
                c
                for c in peer.consumers.values()
                if c.mid and (c.paused or c.audio_only or c.substream != 2 or c.temporal != 2)
            ],
        )
        await self._sync(room, peer)

    async def set_consumer_state(
        self, router_id: str, peer_id: str, producer_id: str, *, paused: bool, audio_only: bool
    ) -> None:
        room, peer = self._peer(router_id, peer_id)
        consumer = peer.consumers.get(producer_id)
        if consumer is None:
            raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        consumer.paused, consumer.audio_only = paused, audio_only
        await self._configure(room, peer, [consumer])

    async def set_preferred_layers(
        self, router_id: str, peer_id: str, producer_id: str, spatial: int, temporal: int
    ) -> None:
        room, peer = self._peer(router_id, peer_id)
        consumer = peer.consumers.get(producer_id)
        producer = room.producers.get(producer_id)
        if consumer is None or producer is None:
            raise NotFound("track", producer_id, reason="TRACK_NOT_FOUND")
        if producer.spec.kind != "video":
            raise FailedPrecondition(
                "LAYERS_NOT_SUPPORTED",
                "an audio track has no layers",
                metadata={"trackId": producer_id},
            )
        consumer.substream = max(0, min(2, spatial))
        consumer.temporal = max(0, min(2, temporal))
        await self._configure(room, peer, [consumer])

    async def _configure(self, room: _Room, peer: _Peer, consumers: Sequence[_Consumer]) -> None:
        streams: list[dict[str, Any]] = []
        for consumer in consumers:
            producer = room.producers.get(consumer.producer_id)
            if not consumer.mid or producer is None:
                continue  # applied when Janus has added the stream
            video = producer.spec.kind == "video"
            item: dict[str, Any] = {
                "mid": consumer.mid,
                "send": not consumer.paused and not (consumer.audio_only and video),
            }
            if video:
                item["substream"] = consumer.substream
                item["temporal"] = consumer.temporal
            streams.append(item)
        if not streams or not peer.sub_handle:
            return
        async with peer.lock:
            if peer.offer_outstanding:
                return  # applied after the answer (subscriber_answer)
            await self.client.message(
                peer.sub_handle, {"request": "configure", "streams": streams}, what=room.router_id
            )

    # ------------------------------------------------------------------ ICE

    async def add_ice_candidate(
        self,
        router_id: str,
        peer_id: str,
        target: Target,
        candidate: str,
        sdp_mid: str,
        sdp_mline_index: int,
    ) -> None:
        _, peer = self._peer(router_id, peer_id)
        text = candidate.strip()
        if text and not text.startswith("candidate:"):
            text = f"candidate:{text}"
        handle = peer.pub_handle if target == "publisher" else peer.sub_handle
        ready = peer.published if target == "publisher" else peer.sub_joined
        if not handle or not ready:
            peer.early_candidates[target].append((text, sdp_mid, sdp_mline_index))
            return
        await self.client.trickle(handle, text, sdp_mid, sdp_mline_index, completed=not text)

    async def _flush_candidates(self, peer: _Peer, target: Target) -> None:
        handle = peer.pub_handle if target == "publisher" else peer.sub_handle
        early, peer.early_candidates[target] = peer.early_candidates[target], []
        for text, mid, index in early:
            with contextlib.suppress(ClassMeshError):
                await self.client.trickle(handle, text, mid, index, completed=not text)

    # ------------------------------------------------------------------ events

    def _emit(self, router_id: str, peer_id: str, event: BackendEvent) -> None:
        self._queue.put_nowait((router_id, peer_id, event))

    async def _send_events(self) -> None:
        """Deliver events in order, outside the long poll (a handler may call us back)."""
        while True:
            router_id, peer_id, event = await self._queue.get()
            if self.events is None:
                continue
            try:
                await self.events(router_id, peer_id, event)
            except Exception:
                log.exception("media event handler failed", extra={"router_id": router_id})

    async def _on_janus_event(self, handle_id: int, message: dict[str, Any]) -> None:
        owner = self.handles.get(handle_id)
        if owner is None:
            return
        router_id, peer_id, target = owner
        room = self.rooms.get(router_id)
        peer = room.peers.get(peer_id) if room else None
        if room is None or peer is None or peer.closed:
            return
        kind = message.get("janus")
        if kind == "webrtcup" and target == "publisher":
            peer.feed_up = True
            self._background(self._feed_up(room, peer))
        elif kind == "trickle":
            cand = message.get("candidate") or {}
            if cand.get("completed"):
                self._emit(router_id, peer_id, LocalCandidate(target, "", end_of_candidates=True))
            else:
                self._emit(
                    router_id,
                    peer_id,
                    LocalCandidate(
                        target,
                        str(cand.get("candidate", "")),
                        str(cand.get("sdpMid", "")),
                        int(cand.get("sdpMLineIndex", 0)),
                    ),
                )
        elif kind == "hangup":
            reason = str(message.get("reason", ""))
            failed = any(w in reason for w in ("ICE", "DTLS", "Gathering"))
            if failed:
                self._emit(router_id, peer_id, PeerClosed(f"Janus: {reason}", failed=True))
        elif kind == "event" and target == "subscriber":
            data = (message.get("plugindata") or {}).get("data") or {}
            jsep = message.get("jsep")
            if data.get("streams") is not None:
                self._map_streams(room, peer, data)
            if isinstance(jsep, dict) and jsep.get("type") == "offer":
                # Janus renegotiates by itself (a feed this peer receives went away).
                peer.offer_outstanding = True
                self._emit(router_id, peer_id, SubscriberOffer(str(jsep.get("sdp", ""))))

    async def _on_session_lost(self) -> None:
        """Janus restarted (or dropped our session): reconnect, re-create every open room
        empty and tell the service (RouterRestarted)."""
        self._started = False
        self.handles.clear()
        for attempt in range(30):
            if self._closed:
                return
            try:
                await self._connect()
                break
            except Unavailable:
                await asyncio.sleep(min(1.0 + attempt, 5.0))
        else:
            log.error("Janus did not come back; routers stay broken until it does")
            return
        for router_id in list(self.rooms):
            self.rooms.pop(router_id, None)
            try:
                await self.open_router(router_id)
            except ClassMeshError as exc:
                log.error("re-creating a Janus room failed", extra={"detail": exc.message})
                continue
            self._emit(router_id, "", RouterRestarted(NODE_ID, "Janus restarted"))

    # ------------------------------------------------------------------ figures

    async def stats(self, router_id: str) -> RouterStatsData:
        room = self._room(router_id)
        out = RouterStatsData(router_id=router_id, node_id=NODE_ID)
        peers = [p for p in room.peers.values() if not p.closed]
        infos = await asyncio.gather(*(self._handle_media(p) for p in peers))
        for peer, (pub, sub) in zip(peers, infos, strict=True):
            own = [p for p in room.producers.values() if p.peer_id == peer.peer_id]
            mine = [c for c in peer.consumers.values() if c.mid]
            row = ParticipantStatsData(
                peer_id=peer.peer_id, producers=len(own), consumers=len(mine)
            )
            lost = packets = 0
            for media in pub:
                stats_in = (media.get("stats") or {}).get("in") or {}
                rtcp = ((media.get("rtcp") or {}).get("main")) or {}
                row.send_bitrate_bps += 8 * int(stats_in.get("bytes_lastsec", 0))
                packets += int(stats_in.get("packets", 0))
                lost += int(rtcp.get("lost", 0))
                row.jitter_seconds = max(row.jitter_seconds, rtcp.get("jitter-local", 0) / 1000)
            for media in sub:
                stats_out = (media.get("stats") or {}).get("out") or {}
                rtcp = ((media.get("rtcp") or {}).get("main")) or {}
                row.receive_bitrate_bps += 8 * int(stats_out.get("bytes_lastsec", 0))
                row.forwarded_bytes += int(stats_out.get("bytes", 0))
                row.rtt_seconds = max(row.rtt_seconds, rtcp.get("rtt", 0) / 1000)
            row.packets_lost = lost
            d_lost, d_packets = lost - peer.last_loss[0], packets - peer.last_loss[1]
            if d_packets + d_lost > 0 and d_lost >= 0:
                row.packet_loss_ratio = d_lost / (d_packets + d_lost)
            peer.last_loss = (lost, packets)
            out.participants.append(row)
            out.producers += row.producers
            out.consumers += row.consumers
            out.forwarded_bytes += row.forwarded_bytes
            out.ingress_bitrate_bps += row.send_bitrate_bps
            out.egress_bitrate_bps += row.receive_bitrate_bps
        return out

    async def _handle_media(self, peer: _Peer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The admin API's per-mid media figures of the peer's two handles ([] without
        the admin API or when a handle is gone)."""
        if not self.client.admin_url:
            return [], []

        async def media(handle: int) -> list[dict[str, Any]]:
            if not handle:
                return []
            try:
                answer = await self.client.admin("handle_info", handle_id=handle)
            except ClassMeshError:
                return []
            found = ((answer.get("info") or {}).get("webrtc") or {}).get("media") or {}
            return [m for m in found.values() if isinstance(m, dict)]

        pub, sub = await asyncio.gather(media(peer.pub_handle), media(peer.sub_handle))
        return pub, sub

    async def worker_stats(self) -> list[WorkerStatsData]:
        """One entry: the Janus server. Its pid is not ours to know (Janus runs as its own
        server, possibly on another host): 0. Frame counters are 0 (Janus counts packets)."""
        peers = [p for r in self.rooms.values() for p in r.peers.values() if not p.closed]
        return [
            WorkerStatsData(
                worker_id=NODE_ID,
                pid=0,
                alive=self._started,
                routers=len(self.rooms),
                peers=len(peers),
                producers=sum(len(r.producers) for r in self.rooms.values()),
                consumers=sum(len([c for c in p.consumers.values() if c.mid]) for p in peers),
            )
        ]


def _room_error(exc: ClassMeshError) -> ClassMeshError:
    if "positive integer" in exc.message or "string" in exc.message.lower():
        return Unavailable(
            "MEDIA_UNAVAILABLE",
            5.0,
            f"{exc.message}: Janus's videoroom must run with string_ids = true "
            "(see servers/classmesh/media/janus/conf/janus.plugin.videoroom.jcfg)",
        )
    return exc
