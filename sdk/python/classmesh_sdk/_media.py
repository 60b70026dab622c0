"""`MediaSession`: an aiortc peer driven over `MediaService.Signal` (bots, tests, benchmarks).

It follows the server by itself: `RouterMoved` (a breakout move) replaces the subscriber
connection (and the publisher one when the server says `republish`); `MediaRestarted` (the
server's media worker died and the router was re-created) replaces both, publishes the same
local tracks again and re-subscribes to the same track ids. New remote tracks then arrive on
`next_remote_track()` as usual.

    async with MediaSession(client, session_id) as media:
        tracks = await media.publish(video_track, audio_track)      # our Track protos
        await media.subscribe([t.id for t in await media.wait_tracks(2)])
        remote = await media.next_remote_track()                    # aiortc MediaStreamTrack

aiortc is optional (`pip install classmesh[media]` / `pip install aiortc`): it is imported
when a MediaSession starts, never by `import classmesh_sdk`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from classmesh.media.v1 import media_pb2, media_service_pb2

if TYPE_CHECKING:
    from classmesh_sdk._client import ClassMeshClient

__all__ = ["MediaSession"]

M = media_pb2


def _aiortc() -> Any:
    try:
        import aiortc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("MediaSession needs aiortc: pip install 'aiortc==1.16.*'") from exc
    return aiortc


def pin_ice_hosts(hosts: Sequence[str]) -> None:
    """Gather host candidates only on `hosts` in this process (e.g. ["127.0.0.1"] on loopback)."""
    import aioice.ice

    pinned = list(hosts)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(pinned)


class MediaSession:
    """One participant's publisher + subscriber peer connections in one room."""

    def __init__(
        self,
        client: ClassMeshClient,
        session_id: str,
        *,
        breakout_room_id: str = "",
        ice_hosts: Sequence[str] | None = None,
    ) -> None:
        self._aiortc = _aiortc()
        if ice_hosts:
            pin_ice_hosts(ice_hosts)
        self.client = client
        self.session_id = session_id
        self.breakout_room_id = breakout_room_id
        config = self._aiortc.RTCConfiguration(iceServers=[])
        self.pub_pc = self._aiortc.RTCPeerConnection(config)
        self.sub_pc = self._aiortc.RTCPeerConnection(config)
        #: Tracks published by others in the room (id -> Track), as announced.
        self.tracks: dict[str, M.Track] = {}
        self.remote_tracks: asyncio.Queue[Any] = asyncio.Queue()
        #: Every server signal received, in order.
        self.signals: list[M.ServerSignal] = []
        #: The error the stream ended with (removed, session ended), if any.
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = asyncio.Event()
        #: Moves to another room (RouterMoved) so far, and the current router id if known.
        self.moves = 0
        self.router_id = ""
        #: Renegotiations after the server's media worker failed (MediaRestarted), completed.
        self.restarts = 0
        #: Local tracks published, and subscriptions (track id -> audio_only), to redo them.
        self._local: list[tuple[Any, str]] = []  # (track, preferred codec)
        self._subscribed: dict[str, bool] = {}
        self._renegotiating: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        #: Signal ids unique to this session: the stream replays the peer's buffer, which may
        #: hold replies to earlier calls (SendSignal, an earlier MediaSession) of the same user.
        self._prefix = secrets.token_hex(4)
        self._replies: dict[str, asyncio.Future[M.ServerSignal]] = {}
        self._changed = asyncio.Event()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.sub_pc.on("track", self.remote_tracks.put_nowait)

    async def __aenter__(self) -> MediaSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._call = self.client.media.signal(timeout=None)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        # The first signal names the room; an empty end-of-candidates is harmless.
        await self.request(
            ice_candidate=M.IceCandidate(
                end_of_candidates=True, target=M.PEER_CONNECTION_TARGET_SUBSCRIBER
            )
        )

    async def request(self, timeout: float = 15.0, **message: Any) -> M.ServerSignal:
        """Send one ClientSignal and wait for its reply (raises on an error reply)."""
        signal_id = f"{self._prefix}-{next(self._ids)}"
        fut: asyncio.Future[M.ServerSignal] = asyncio.get_running_loop().create_future()
        self._replies[signal_id] = fut
        await self._send(signal_id, **message)
        reply = await asyncio.wait_for(fut, timeout)
        if reply.WhichOneof("message") == "error":
            raise RuntimeError(f"signal failed: {reply.error}")
        return reply

    async def _send(self, signal_id: str, **message: Any) -> None:
        signal = M.ClientSignal(
            signal_id=signal_id,
            session_id=self.session_id,
            breakout_room_id=self.breakout_room_id,
            **message,
        )
        await self._call.write(media_service_pb2.SignalRequest(signal=signal))

    async def _read(self) -> None:
        try:
            async for response in self._call:
                await self._on_signal(response.signal)
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.CANCELLED:
                self.error = err
        finally:
            self.ended.set()
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("signal stream ended"))

    async def _on_signal(self, signal: M.ServerSignal) -> None:
        self.signals.append(signal)
        kind = signal.WhichOneof("message")
        if kind == "offer":
            await self._answer(signal.offer.sdp)
        elif kind == "track_published":
            self.tracks[signal.track_published.id] = signal.track_published
        elif kind == "track_unpublished":
            self.tracks.pop(signal.track_unpublished.id, None)
            self._subscribed.pop(signal.track_unpublished.id, None)
        elif kind == "router_moved":
            await self._moved(signal.router_moved)
        elif kind == "media_restarted":
            self._renegotiate(publisher=True, subscriber=True)
        fut = self._replies.pop(signal.signal_id, None) if signal.signal_id else None
        if fut is not None and not fut.done():
            fut.set_result(signal)
        self._changed.set()

    async def _moved(self, moved: M.RouterMoved) -> None:
        """A moderator moved us to another room: the server keeps our publisher connection
        (our tracks are re-published there under new ids) and replaces the subscriber one,
        so do the same; the new room's tracks are announced next, subscribe to them again."""
        self.breakout_room_id = moved.breakout_room_id
        self.router_id = moved.to_router_id
        self.tracks.clear()
        self._subscribed.clear()
        await self._new_subscriber()
        if moved.republish:  # the server could not keep our publisher connection
            self._renegotiate(publisher=True, subscriber=False)
        self.moves += 1

    async def _new_subscriber(self) -> None:
        old = self.sub_pc
        self.sub_pc = self._aiortc.RTCPeerConnection(self._aiortc.RTCConfiguration(iceServers=[]))
        self.sub_pc.on("track", self.remote_tracks.put_nowait)
        await old.close()

    def _renegotiate(self, *, publisher: bool, subscriber: bool) -> None:
        """Redo our connections in the background (the reader must keep reading replies)."""
        previous = self._renegotiating

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            if subscriber:
                await self._new_subscriber()
            if publisher and self._local:
                old = self.pub_pc
                self.pub_pc = self._aiortc.RTCPeerConnection(
                    self._aiortc.RTCConfiguration(iceServers=[])
                )
                # aiortc stops a sender's track when its connection closes: detach ours
                # first, they go on in the new connection.
                for sender in old.getSenders():
                    sender.replaceTrack(None)
                await old.close()
                for track, codec in self._local:
                    self._add_local(track, codec)
                await self._offer()
            if subscriber and self._subscribed:
                for audio_only in (False, True):
                    ids = [t for t, a in self._subscribed.items() if a is audio_only]
                    if ids:
                        await self.request(
                            subscribe=M.SubscribeTracks(track_ids=ids, audio_only=audio_only)
                        )
            if publisher and subscriber:
                self.restarts += 1
            self._changed.set()

        self._renegotiating = asyncio.get_running_loop().create_task(run())

    async def wait_restarted(self, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until `count` server media restarts have been renegotiated in all."""
        async with asyncio.timeout(timeout):
            while self.restarts < count:
                self._changed.clear()
                await self._changed.wait()

    async def wait_moved(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until this session has been moved `count` times in all."""
        async with asyncio.timeout(timeout):
            while self.moves < count:
                self._changed.clear()
                await self._changed.wait()

    async def _answer(self, sdp: str) -> None:
        desc = self._aiortc.RTCSessionDescription(sdp=sdp, type="offer")
        await self.sub_pc.setRemoteDescription(desc)
        answer = await self.sub_pc.createAnswer()
        await self.sub_pc.setLocalDescription(answer)
        signal_id = f"{self._prefix}-{next(self._ids)}"
        await self._send(
            signal_id,
            answer=M.SessionDescription(
                type=M.SDP_TYPE_ANSWER,
                sdp=self.sub_pc.localDescription.sdp,
                target=M.PEER_CONNECTION_TARGET_SUBSCRIBER,
            ),
        )

    async def publish(self, *tracks: Any, video_codec: str = "") -> list[M.Track]:
        """Publish aiortc tracks (Opus audio; VP8 video, or `video_codec="video/H264"`);
        returns the server's Tracks."""
        published: list[M.Track] = []
        for track in tracks:
            kind = M.TRACK_KIND_VIDEO if track.kind == "video" else M.TRACK_KIND_AUDIO
            codec = video_codec if track.kind == "video" else ""
            reply = await self.request(
                publish=M.PublishTrack(
                    client_track_id=track.id, kind=kind, name=track.kind, preferred_codec=codec
                )
            )
            published.append(reply.publish_accepted.track)
            self._add_local(track, codec)
            self._local.append((track, codec))
        await self._offer()
        return published

    def _add_local(self, track: Any, codec: str) -> None:
        self.pub_pc.addTrack(track)
        if not codec:
            return
        transceiver = next(t for t in self.pub_pc.getTransceivers() if t.sender.track is track)
        caps = self._aiortc.RTCRtpSender.getCapabilities(track.kind)
        transceiver.setCodecPreferences(
            [c for c in caps.codecs if c.mimeType.lower() == codec.lower()]
        )

    async def _offer(self) -> None:
        offer = await self.pub_pc.createOffer()
        await self.pub_pc.setLocalDescription(offer)
        reply = await self.request(
            offer=M.SessionDescription(
                type=M.SDP_TYPE_OFFER,
                sdp=self.pub_pc.localDescription.sdp,
                target=M.PEER_CONNECTION_TARGET_PUBLISHER,
            )
        )
        await self.pub_pc.setRemoteDescription(
            self._aiortc.RTCSessionDescription(sdp=reply.answer.sdp, type="answer")
        )

    async def wait_tracks(self, count: int, timeout: float = 10.0) -> list[M.Track]:
        """Wait until at least `count` tracks of others are announced."""
        async with asyncio.timeout(timeout):
            while len(self.tracks) < count:
                self._changed.clear()
                await self._changed.wait()
        return list(self.tracks.values())

    async def subscribe(self, track_ids: Sequence[str], *, audio_only: bool = False) -> None:
        """Subscribe; the server's offer is answered by this session automatically."""
        await self.request(subscribe=M.SubscribeTracks(track_ids=track_ids, audio_only=audio_only))
        for track_id in track_ids:
            self._subscribed[track_id] = audio_only

    async def next_remote_track(self, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(self.remote_tracks.get(), timeout)

    async def leave(self) -> None:
        with contextlib.suppress(Exception):
            await self.request(leave=M.LeaveMedia(reason="bye"), timeout=5)

    async def close(self) -> None:
        if self._renegotiating is not None:
            self._renegotiating.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renegotiating
        if self._call is not None and not self.ended.is_set():
            await self.leave()
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
        await self.pub_pc.close()
        await self.sub_pc.close()
