"""Seed 003 property 16 (WebRTC signaling relay) on MediaService's signaling, with hypothesis,
against a real `classmesh up` through the SDK (SendSignal + ReceiveSignals):

  16 "For any WebRTC signaling message sent from user A to user B in the same room, user B
     should receive the message with the correct sender information."

In an SFU, A's signals go to the server, which relays what concerns others: A's publish
reaches every other participant of A's router as `track_published` naming A (user id and
participant id) and A's unpublish (or leave) as `track_unpublished`; nothing of A reaches
a participant of another room, and A's own replies reach A alone. Whatever the interleaving
of SendSignal calls (steps of up to three participants signaling concurrently, leaves
included):

  - every ClientSignal gets exactly one reply carrying its signal_id: the SendSignal answer,
    which is also the one signal with that id on the sender's ReceiveSignals stream, and of
    the kind the signal calls for (ack, publish_accepted, or an error signal NOT_FOUND
    TRACK_NOT_FOUND for unknown tracks, others' tracks and other rooms' tracks);
  - ServerSignal seq is gap-free from 1 and ordered per participant and router (a `leave`
    closes the peer: the next signal opens a new one, seq from 1 again);
  - ReceiveSignals(after_seq=k) replays exactly the signals after k;
  - a track_published / track_unpublished on B's stream is always about a track of another
    participant of B's room, names its real owner, comes at most once and in that order; and
    when steps order it unambiguously (the track's life and B's peer do not start or end in
    the same step), B gets it exactly when B's peer was open while the track lived.

Signals used need no real peer connection: publish (announces a track), unpublish,
pause/resume of own and unknown tracks, subscribe to unknown or other rooms' tracks,
unsubscribe, leave. Each example runs in a fresh live class: students a and b in the main
room, c in a breakout room.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classmesh.media.v1 import media_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient, InvalidArgumentError
from tests.support.classroom import Mesh, classroom_mesh, live_class, open_breakout_room

M = media_pb2
PEOPLE = ("a", "b", "c")
NOT_FOUND = 5
WAIT = 10.0
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------- strategies

_op = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(["audio", "video"])),
    st.tuples(st.just("unpublish"), st.sampled_from(["own", "other", "unknown"])),
    st.tuples(
        st.sampled_from(["pause", "resume"]),
        st.sampled_from(["own_producer", "unknown_producer", "unknown_consumer"]),
    ),
    st.tuples(st.just("subscribe"), st.sampled_from(["other_room", "unknown"])),
    st.tuples(st.just("unsubscribe"), st.integers(0, 3)),
    st.tuples(st.just("leave"), st.just("")),
)
#: One step: up to three participants, each sending one signal, concurrently.
_step = st.lists(
    st.tuples(st.sampled_from(PEOPLE), _op), min_size=1, max_size=3, unique_by=lambda t: t[0]
)
_steps = st.lists(_step, min_size=1, max_size=8)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    extra = {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0", "CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1"}
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "mediaprops", extra
    ) as m:
        yield m


# ------------------------------------------------------------------------------ the model


@dataclass
class Track:
    id: str
    owner: str
    room: str
    published: float  # step
    unpublished: float | None = None  # step; None = still alive


@dataclass
class Peer:
    """One incarnation of a participant's peer in its router (until `leave`)."""

    who: str
    room: str
    start: float  # step of its first signal
    end: float | None = None  # step of its leave
    live: list[M.ServerSignal] = field(default_factory=list)
    replay: list[M.ServerSignal] = field(default_factory=list)
    replay_after: int = 0
    replies: dict[str, M.ServerSignal] = field(default_factory=dict)  # signal_id -> reply
    sent: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Person:
    name: str
    user: str
    participant_id: str
    room: str
    client: ClassMeshClient
    peer: Peer | None = None
    peers: list[Peer] = field(default_factory=list)
    own: list[str] = field(default_factory=list)  # own live track ids, publish order


class World:
    def __init__(self, session_id: str, people: dict[str, Person], inst: ClassMeshClient) -> None:
        self.session_id = session_id
        self.inst = inst
        self.people = people
        self.tracks: dict[str, Track] = {}
        self.ids = itertools.count(1)

    def signal(self, who: Person, **message: Any) -> M.ClientSignal:
        return M.ClientSignal(
            signal_id=f"{who.name}-{next(self.ids)}",
            session_id=self.session_id,
            breakout_room_id=who.room,
            **message,
        )

    async def _read(self, who: Person, peer: Peer, after: int, into: list[M.ServerSignal]) -> None:
        try:
            async for item in who.client.media.receive_signals(
                session_id=self.session_id,
                breakout_room_id=who.room,
                after_seq=after,
                retry=NO_RETRY,
                timeout=120,
            ):
                into.append(item.signal)
                peer.changed.set()
        except BaseException as exc:  # noqa: BLE001 - kept for the assertion
            if not isinstance(exc, asyncio.CancelledError):
                peer.error = exc
        finally:
            peer.changed.set()

    async def wait_seq(self, peer: Peer, into: list[M.ServerSignal], seq: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not (into and into[-1].seq >= seq):
            assert peer.error is None, f"{peer.who}'s stream failed: {peer.error!r}"
            assert not any(t.done() for t in peer.tasks), f"{peer.who}'s stream ended early"
            remaining = deadline - loop.time()
            assert remaining > 0, f"{peer.who}: seq {seq} not received; got {[s.seq for s in into]}"
            peer.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.changed.wait(), remaining)

    async def send(self, who: Person, signal: M.ClientSignal) -> M.ServerSignal:
        assert who.peer is not None
        who.peer.sent.append(signal.signal_id)
        resp = await who.client.media.send_signal(
            request_id=signal.signal_id, signal=signal, retry=NO_RETRY, timeout=WAIT
        )
        who.peer.replies[signal.signal_id] = resp.reply
        return resp.reply

    async def open_peer(self, who: Person, step: float) -> None:
        """First signal of a new peer (an empty unsubscribe: a plain ack), then its stream,
        attached once it shows that reply (replayed from seq 1)."""
        peer = Peer(who=who.name, room=who.room, start=step)
        who.peer = peer
        who.peers.append(peer)
        reply = await self.send(who, self.signal(who, unsubscribe=M.UnsubscribeTracks()))
        assert reply.WhichOneof("message") == "ack", reply
        peer.tasks.append(asyncio.create_task(self._read(who, peer, 0, peer.live)))
        await self.wait_seq(peer, peer.live, reply.seq)

    def _other_track(self, who: Person, *, same_room: bool) -> str:
        for track in self.tracks.values():
            if track.owner != who.name and (track.room == who.room) == same_room:
                return track.id
        return str(uuid.uuid4())

    async def act(self, who: Person, op: tuple[str, Any], step: float) -> None:
        if who.peer is None:
            await self.open_peer(who, step)
        kind, arg = op
        expect = "error"
        if kind == "publish":
            client_track = f"{who.name}-{kind}-{next(self.ids)}"
            track_kind = M.TRACK_KIND_AUDIO if arg == "audio" else M.TRACK_KIND_VIDEO
            signal = self.signal(
                who, publish=M.PublishTrack(client_track_id=client_track, kind=track_kind)
            )
            expect = "publish_accepted"
        elif kind == "unpublish":
            if arg == "own" and who.own:
                track_id, expect = who.own[0], "ack"
            elif arg == "other":
                track_id = self._other_track(who, same_room=True)
            else:
                track_id = str(uuid.uuid4())
            signal = self.signal(who, unpublish=M.UnpublishTrack(track_id=track_id))
        elif kind in ("pause", "resume"):
            if arg == "own_producer" and who.own:
                track_id, expect = who.own[-1], "ack"
            else:
                track_id = str(uuid.uuid4())
            message = M.PauseTrack if kind == "pause" else M.ResumeTrack
            signal = self.signal(
                who, **{kind: message(track_id=track_id, producer=arg != "unknown_consumer")}
            )
        elif kind == "subscribe":
            track_id = (
                self._other_track(who, same_room=False)
                if arg == "other_room"
                else str(uuid.uuid4())
            )
            signal = self.signal(who, subscribe=M.SubscribeTracks(track_ids=[track_id]))
        elif kind == "unsubscribe":
            ids = [str(uuid.uuid4()) for _ in range(arg)]
            signal = self.signal(who, unsubscribe=M.UnsubscribeTracks(track_ids=ids))
            expect = "ack"
        else:
            signal = self.signal(who, leave=M.LeaveMedia(reason="property test"))
            expect = "ack"
        reply = await self.send(who, signal)
        # Exactly the reply the signal calls for, correlated by its id.
        assert reply.signal_id == signal.signal_id, (reply, signal)
        assert reply.WhichOneof("message") == expect, (op, reply)
        if expect == "error":
            assert reply.error.code == NOT_FOUND and _reason(reply.error) == "TRACK_NOT_FOUND", (
                op,
                reply,
            )
        if kind == "publish":
            track = reply.publish_accepted.track
            assert reply.publish_accepted.client_track_id == signal.publish.client_track_id
            assert (track.user_id, track.participant_id, track.breakout_room_id) == (
                who.user,
                who.participant_id,
                who.room,
            )
            self.tracks[track.id] = Track(track.id, who.name, who.room, step)
            who.own.append(track.id)
        elif kind == "unpublish" and expect == "ack":
            self.tracks[who.own.pop(0)].unpublished = step
        elif kind == "leave":
            for track_id in who.own:
                self.tracks[track_id].unpublished = step
            who.own.clear()
            assert who.peer is not None
            who.peer.end = step
            who.peer = None


def _dump(peer: Peer) -> str:
    def line(s: M.ServerSignal) -> str:
        return f"{s.seq}:{s.signal_id or '-'}:{s.WhichOneof('message')}"

    replies = {k: line(v) for k, v in peer.replies.items()}
    return (
        f"{peer.who} steps {peer.start}-{peer.end}: stream {[line(s) for s in peer.live]}, "
        f"sent {peer.sent}, replies {replies}"
    )


def _reason(status: Any) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


# ------------------------------------------------------------------------------ checks


def _check_peer(world: World, peer: Peer) -> None:
    who = world.people[peer.who]
    signals = peer.live
    assert peer.error is None, f"{peer.who}: stream failed: {peer.error!r}"
    # Gap-free, ordered seq from 1 for this participant in this router.
    assert [s.seq for s in signals] == list(range(1, len(signals) + 1)), [s.seq for s in signals]
    # Every signal sent got exactly one reply, the SendSignal answer, in sending order.
    solicited = [s for s in signals if s.signal_id]
    assert [s.signal_id for s in solicited] == peer.sent, _dump(peer)
    for s in solicited:
        assert s == peer.replies[s.signal_id], (s, peer.replies[s.signal_id])
    # ReceiveSignals(after_seq=k) replays exactly what came after k.
    assert peer.replay == signals[peer.replay_after :], (peer.replay_after, len(signals))
    # Relayed signals: only about other participants' tracks of this room, with their owner.
    published: dict[str, int] = {}
    unpublished: dict[str, int] = {}
    for i, s in enumerate(signals):
        if s.signal_id:
            continue
        kind = s.WhichOneof("message")
        assert kind in ("track_published", "track_unpublished"), s
        t = s.track_published if kind == "track_published" else s.track_unpublished
        track = world.tracks.get(t.id)
        assert track is not None, f"{peer.who} got a track nobody published: {t}"
        owner = world.people[track.owner]
        assert track.owner != peer.who, f"{peer.who} was told about its own track"
        assert track.room == peer.room, f"{peer.who} ({peer.room!r}) saw a track of {track.room!r}"
        assert (t.user_id, t.participant_id, t.breakout_room_id) == (
            owner.user,
            owner.participant_id,
            owner.room,
        ), t
        seen = published if kind == "track_published" else unpublished
        assert t.id not in seen, f"{peer.who} got {kind} of {t.id} twice"
        seen[t.id] = i
    for track_id, i in unpublished.items():
        assert track_id in published and published[track_id] < i, "unpublished before published"
    # Exactly what the step order decides.
    assert peer.end is not None
    for track in world.tracks.values():
        if track.owner == peer.who or track.room != peer.room:
            continue
        p, u = track.published, track.unpublished
        assert u is not None  # everyone leaves at the end
        if {p, u} & {peer.start, peer.end}:
            continue  # same step: either order is right
        # Alive together for a moment: the track was published before the peer ended and
        # unpublished after it started (steps are strictly ordered; same-step cases skipped).
        overlaps = p < peer.end and peer.start < u
        assert (track.id in published) == overlaps, (peer.who, peer.start, peer.end, track)
        assert (track.id in unpublished) == (overlaps and u < peer.end), (peer, track)
    _ = who


# ------------------------------------------------------------------------------ the property


async def _world(mesh: Mesh) -> World:
    klass = await live_class(mesh, students=3)
    a, b, c = klass.students
    room = await open_breakout_room(mesh, klass.id, [c])
    rows = await mesh.pool.fetch(
        "SELECT user_id, id::text AS id FROM session_participants WHERE session_id = $1::uuid",
        klass.id,
    )
    pid = {r["user_id"]: r["id"] for r in rows}
    people = {
        name: Person(name, user, pid[user], r, klass.students[user])
        for name, user, r in (("a", a, ""), ("b", b, ""), ("c", c, room))
    }
    return World(klass.id, people, klass.inst)


@PROPS
@given(steps=_steps, data=st.data())
async def test_property_16_signaling_relay_on_media(
    mesh: Mesh, steps: list[list[tuple[str, tuple[str, Any]]]], data: st.DataObject
) -> None:
    world = await _world(mesh)
    try:
        for n, step in enumerate(steps, start=1):
            await asyncio.gather(*(world.act(world.people[who], op, n) for who, op in step))
        # Replays: one more plain signal per open peer marks its newest seq; a second stream
        # from a drawn after_seq must replay exactly the rest (checked at the end).
        for person in world.people.values():
            peer = person.peer
            if peer is None:
                continue
            mark = await world.send(person, world.signal(person, unsubscribe=M.UnsubscribeTracks()))
            await world.wait_seq(peer, peer.live, mark.seq)
            # A share of the newest seq, not a range that depends on it: how many signals a
            # peer saw varies between runs of one example (concurrent steps), and hypothesis
            # needs the same draws every time it replays an example.
            share = data.draw(st.integers(0, 100), label=f"after_seq share {person.name}")
            peer.replay_after = mark.seq * share // 100
            peer.tasks.append(
                asyncio.create_task(world._read(person, peer, peer.replay_after, peer.replay))
            )
            # Attached once it shows a signal sent after it was opened (nothing is lost
            # meanwhile: it replays from after_seq).
            attached = await world.send(
                person, world.signal(person, unsubscribe=M.UnsubscribeTracks())
            )
            await world.wait_seq(peer, peer.replay, attached.seq)
        # Everyone leaves at once at the end: every stream ends by itself, with its leave ack.
        last = len(steps) + 1
        open_now = [p for p in world.people.values() if p.peer is not None]
        await asyncio.gather(*(world.act(p, ("leave", ""), last) for p in open_now))
        for person in world.people.values():
            for peer in person.peers:
                done, pending = await asyncio.wait(peer.tasks, timeout=WAIT)
                assert not pending, f"{peer.who}'s stream did not end after leave"
        for person in world.people.values():
            for peer in person.peers:
                if len(peer.tasks) == 1:  # closed before the replay step: replay = all
                    peer.replay = list(peer.live)
                _check_peer(world, peer)
    finally:
        for person in world.people.values():
            for peer in person.peers:
                for task in peer.tasks:
                    task.cancel()
        with contextlib.suppress(Exception):
            await world.inst.sessions.end_session(session_id=world.session_id)


async def test_replay_beyond_the_newest_signal_is_invalid_argument(mesh: Mesh) -> None:
    world = await _world(mesh)
    a = world.people["a"]
    await world.open_peer(a, 1)
    assert a.peer is not None
    newest = a.peer.live[-1].seq
    with pytest.raises(InvalidArgumentError) as info:
        async for _ in a.client.media.receive_signals(
            session_id=world.session_id, after_seq=newest + 1, retry=NO_RETRY, timeout=WAIT
        ):
            pass
    assert [f for f, _ in info.value.field_violations] == ["after_seq"]
    for task in a.peer.tasks:
        task.cancel()


async def test_a_leave_ack_reaches_the_stream_while_it_is_busy_writing(mesh: Mesh) -> None:
    """b leaves while a publishes a burst of tracks (b's stream is busy writing them), ten
    times over: b's stream still ends with b's own leave ack, after every track it was told
    of. The race of a signal pushed while the stream writes the previous ones, just before
    the peer closes."""
    for _ in range(10):
        world = await _world(mesh)
        a, b = world.people["a"], world.people["b"]
        await world.open_peer(a, 1)
        await world.open_peer(b, 1)
        b_peer = b.peer
        assert b_peer is not None
        burst = [
            asyncio.create_task(
                world.send(
                    a,
                    world.signal(
                        a,
                        publish=M.PublishTrack(client_track_id=f"t{i}", kind=M.TRACK_KIND_AUDIO),
                    ),
                )
            )
            for i in range(30)
        ]
        # Leave as soon as b's stream has started writing the burst.
        await world.wait_seq(b_peer, b_peer.live, b_peer.live[-1].seq + 1)
        await world.act(b, ("leave", ""), 2)
        await asyncio.gather(*burst)
        done, pending = await asyncio.wait(b_peer.tasks, timeout=WAIT)
        assert not pending
        signals = b_peer.live
        assert [s.seq for s in signals] == list(range(1, len(signals) + 1)), _dump(b_peer)
        assert [s.signal_id for s in signals if s.signal_id] == b_peer.sent, _dump(b_peer)
        assert signals[-1].signal_id == b_peer.sent[-1]  # the leave ack closes the stream
        told = [s.track_published.id for s in signals if s.HasField("track_published")]
        assert len(told) == len(set(told))
        with contextlib.suppress(Exception):
            await world.inst.sessions.end_session(session_id=world.session_id)
