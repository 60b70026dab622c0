"""The media back-end contract: what MediaService asks of a forwarding engine.

MediaService (service.py) keeps everything that is not forwarding: auth, the session
watcher, signal buffers and their `seq`, track records and events, the circuit breaker,
room-size rules. A back-end hosts routers and forwards media. Two implement this contract:

- `aiortc` (engine/aiortc_backend.py): a client of the media worker processes
  (engine/worker.py), each running aiortc peers with encoded-frame passthrough;
- `janus` (media/janus/): a Janus videoroom per router, driven over its HTTP API.

Model. A router is the forwarding unit of one room. In a router each participant is a
*peer* (`peer_id`, chosen by the service, unique in the router) with two connections:

- publisher: the client offers, the back-end answers (`publisher_offer`);
- subscriber: the back-end offers, the client answers (`subscriber_answer`). A back-end
  offers whenever the subscriber connection must change (after `subscribe`, when it needs
  to renegotiate) by emitting `SubscriberOffer`; one offer is outstanding at a time.

A *producer* is one published track (`ProducerSpec`, id chosen by the service). The service
calls `add_producer` for every PublishTrack (before or after the offer that carries the
track); the back-end binds it to the publisher connection's incoming track with the same
`client_track_id` (the MediaStreamTrack id / msid), else to the next unbound one of its kind.
`publisher_offer` also receives the peer's current producers, for back-ends that describe
streams when they publish (Janus `configure`). A *consumer* is one peer's subscription to
one producer, named by (peer_id, producer_id).

The service creates the janus back-end (`classmesh.media.janus.backend.JanusBackend.
from_config(config)`) when the first router asks for it.

Back-end -> service. The service sets `events` (an async callback) before `start()`; the
back-end calls `events(router_id, peer_id, event)` with one of:

- `SubscriberOffer(sdp)`: send it to the client as a server offer (subscriber target);
- `LocalCandidate(...)`: a trickled back-end ICE candidate (aiortc puts its candidates in
  the SDP and never emits this; Janus trickles);
- `RouterRestarted(node_id)` with `peer_id == ""`: the router's forwarding was lost (worker
  died) and the router was re-opened, empty, on `node_id`, same router id. Peers, producers
  and consumers are gone; the service re-adds peers and producers and tells every client
  to renegotiate;
- `PeerClosed(reason, failed)`: a peer's connection failed or closed on the back-end side.

Errors. Methods raise `classmesh.core.errors.ClassMeshError` subclasses with reasons from
`ErrorReason` (e.g. NotFound ROUTER_NOT_FOUND / TRACK_NOT_FOUND, InvalidArgument SDP_INVALID,
FailedPrecondition LAYERS_NOT_SUPPORTED, Unavailable MEDIA_UNAVAILABLE); never anything else
for a bad client input. Every method is idempotent where it can be: closing or removing what
does not exist is not an error.

Figures. `stats(router_id)` samples the router: totals and, per peer, counters (frames
forwarded to its consumers, dropped for them, received from its producers) and transport
figures (bitrates over the last sample interval, packet loss, jitter, RTT) from the back-end's
own RTCP statistics. `worker_stats()` reports every forwarding process (`pid` lets a
benchmark read its CPU from /proc).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "BackendEvent",
    "BackendName",
    "EventSink",
    "LayerSpec",
    "LocalCandidate",
    "MediaBackend",
    "MediaKind",
    "ParticipantStatsData",
    "PeerClosed",
    "ProducerSpec",
    "RouterRestarted",
    "RouterStatsData",
    "SubscriberOffer",
    "Target",
    "WorkerStatsData",
]

BackendName = Literal["aiortc", "janus"]
MediaKind = Literal["audio", "video"]
#: Which of a peer's two connections.
Target = Literal["publisher", "subscriber"]


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One simulcast encoding a publisher announced."""

    spatial_layer: int
    rid: str = ""
    width: int = 0
    height: int = 0
    max_bitrate_bps: int = 0


@dataclass(frozen=True, slots=True)
class ProducerSpec:
    """A published track as the service recorded it."""

    producer_id: str
    kind: MediaKind
    #: Negotiated codec, "video/VP8", "video/H264", "audio/opus".
    mime_type: str
    #: The client's MediaStreamTrack id (msid) or SDP mid; binds the producer to a track.
    client_track_id: str
    #: Published muted / paused by the publisher: nothing is forwarded.
    paused: bool = False
    #: Muted by a moderator: nothing is forwarded.
    moderator_muted: bool = False
    #: Simulcast encodings announced (empty = one encoding).
    layers: tuple[LayerSpec, ...] = ()


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SubscriberOffer:
    """The back-end's offer on a peer's subscriber connection."""

    sdp: str


@dataclass(frozen=True, slots=True)
class LocalCandidate:
    """A back-end ICE candidate for one of a peer's connections (trickle)."""

    target: Target
    #: "candidate:..." attribute, empty with end_of_candidates.
    candidate: str
    sdp_mid: str = ""
    sdp_mline_index: int = 0
    end_of_candidates: bool = False


@dataclass(frozen=True, slots=True)
class RouterRestarted:
    """The router lost its forwarding state and was re-opened empty on `node_id`."""

    node_id: str
    reason: str = "media worker restarted"


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """A peer's connection closed (`failed`: ICE/DTLS failure rather than a close)."""

    reason: str
    failed: bool = False


BackendEvent = SubscriberOffer | LocalCandidate | RouterRestarted | PeerClosed
#: events(router_id, peer_id, event); peer_id is "" for router-wide events.
EventSink = Callable[[str, str, BackendEvent], Awaitable[None]]


# ---------------------------------------------------------------------- figures


@dataclass(slots=True)
class ParticipantStatsData:
    """One peer in one router. Counters are cumulative; rates over the last sample."""

    peer_id: str
    producers: int = 0
    consumers: int = 0
    #: Encoded frames forwarded to this peer's consumers, and their payload bytes.
    forwarded_frames: int = 0
    forwarded_bytes: int = 0
    #: Frames dropped for this peer's consumers (keyframe wait, full queue).
    dropped_frames: int = 0
    #: Encoded frames received from this peer's producers.
    received_frames: int = 0
    #: Publisher connection: bits/s received from the peer.
    send_bitrate_bps: int = 0
    #: Subscriber connection: bits/s sent to the peer.
    receive_bitrate_bps: int = 0
    #: Packets of the peer's published streams lost on the way in (cumulative).
    packets_lost: int = 0
    #: Loss ratio 0.0-1.0 over the last sample interval (in and out, worst of both).
    packet_loss_ratio: float = 0.0
    #: Interarrival jitter (s), worst stream.
    jitter_seconds: float = 0.0
    #: Round-trip time (s) from the subscriber's receiver reports; 0 = unknown.
    rtt_seconds: float = 0.0


@dataclass(slots=True)
class RouterStatsData:
    router_id: str
    node_id: str = ""
    producers: int = 0
    consumers: int = 0
    forwarded_frames: int = 0
    forwarded_bytes: int = 0
    dropped_frames: int = 0
    received_frames: int = 0
    ingress_bitrate_bps: int = 0
    egress_bitrate_bps: int = 0
    participants: list[ParticipantStatsData] = field(default_factory=list)


@dataclass(slots=True)
class WorkerStatsData:
    """One forwarding process (an aiortc media worker, a Janus instance)."""

    worker_id: str
    pid: int
    alive: bool = True
    #: Times this worker slot was respawned after its process died.
    restarts: int = 0
    routers: int = 0
    peers: int = 0
    producers: int = 0
    consumers: int = 0
    forwarded_frames: int = 0
    forwarded_bytes: int = 0
    dropped_frames: int = 0
    received_frames: int = 0
    #: Peer connections (publisher + subscriber) not closed yet: 0 once every router closed.
    connections: int = 0


# ---------------------------------------------------------------------- contract


@runtime_checkable
class MediaBackend(Protocol):
    """A forwarding engine hosting routers (see the module docstring)."""

    #: "aiortc" or "janus".
    name: BackendName
    #: Whether `set_preferred_layers` works (simulcast reception).
    simulcast: bool
    #: Set by the service before start().
    events: EventSink | None

    async def start(self) -> None:
        """Start the engine (processes, sessions); raises Unavailable when it cannot."""

    async def close(self) -> None:
        """Close every router and stop the engine (idempotent)."""

    async def open_router(self, router_id: str) -> str:
        """Open an empty router; returns the node (worker) id it runs on."""

    async def close_router(self, router_id: str) -> None:
        """Close the router and free every peer, producer and consumer in it."""

    async def add_peer(self, router_id: str, peer_id: str) -> None:
        """Create the peer's publisher and subscriber connections (no-op if present)."""

    async def remove_peer(self, router_id: str, peer_id: str) -> None:
        """Close the peer's connections, its consumers and its producers."""

    async def move_peer(
        self,
        from_router_id: str,
        to_router_id: str,
        peer_id: str,
        producers: Sequence[tuple[str, ProducerSpec]],
    ) -> bool:
        """Move a peer between routers: close its consumers, producers and subscriber
        connection in `from_router_id`, add it to `to_router_id` with a fresh subscriber
        connection (the client re-subscribes) and re-create its producers there as
        `(old producer id, new spec)` says. True when the publisher connection was kept
        (media of the new producers flows at once); False when the client must publish
        again on a new publisher connection."""

    async def publisher_offer(
        self, router_id: str, peer_id: str, sdp: str, producers: Sequence[ProducerSpec]
    ) -> str:
        """Apply the client's offer on the publisher connection; returns the answer SDP.
        `producers`: the peer's current producers in the router."""

    async def add_producer(self, router_id: str, peer_id: str, spec: ProducerSpec) -> None:
        """Record a producer of the peer; it forwards once bound to an incoming track."""

    async def remove_producer(self, router_id: str, producer_id: str) -> None:
        """Stop forwarding the producer and close every consumer of it."""

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
        """Add consumers (existing ones just take `audio_only`); a new consumer waits for
        a keyframe. Emits `SubscriberOffer` when the subscriber connection changed."""

    async def unsubscribe(self, router_id: str, peer_id: str, producer_ids: Sequence[str]) -> None:
        """Close the peer's consumers of these producers (unknown ids are ignored)."""

    async def subscriber_answer(self, router_id: str, peer_id: str, sdp: str) -> None:
        """Apply the client's answer to the outstanding subscriber offer
        (FailedPrecondition SDP_INVALID when none is outstanding)."""

    async def add_ice_candidate(
        self,
        router_id: str,
        peer_id: str,
        target: Target,
        candidate: str,
        sdp_mid: str,
        sdp_mline_index: int,
    ) -> None:
        """A client ICE candidate ("candidate:..." or the bare attribute value)."""

    async def set_producer_state(
        self, router_id: str, producer_id: str, *, paused: bool, moderator_muted: bool
    ) -> None:
        """Forward nothing while paused or moderator-muted; on resume consumers wait for
        (and ask for) a keyframe."""

    async def set_consumer_state(
        self, router_id: str, peer_id: str, producer_id: str, *, paused: bool, audio_only: bool
    ) -> None:
        """Pause a consumer, or put it in audio-only mode (a video consumer forwards
        nothing); resuming video asks for a keyframe."""

    async def set_preferred_layers(
        self, router_id: str, peer_id: str, producer_id: str, spatial: int, temporal: int
    ) -> None:
        """Forward only this simulcast layer to the consumer, switching on a keyframe
        (FailedPrecondition LAYERS_NOT_SUPPORTED on a back-end without simulcast)."""

    async def stats(self, router_id: str) -> RouterStatsData:
        """Sample the router's figures (NotFound ROUTER_NOT_FOUND when it is not open)."""

    async def worker_stats(self) -> list[WorkerStatsData]:
        """Figures of every forwarding process."""
