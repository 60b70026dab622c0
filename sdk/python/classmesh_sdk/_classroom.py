"""`Classroom`: one participant's room of a class, as typed events and a few shortcuts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import Message

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh.interaction.v1 import interaction_pb2
from classmesh_sdk._errors import ClassMeshError
from classmesh_sdk._retry import NO_RETRY

if TYPE_CHECKING:
    from classmesh_sdk._client import ClassMeshClient

__all__ = ["Classroom", "ClassroomEvent"]

#: After these the session is over: the event stream ends.
_TERMINAL = frozenset({"session_ended", "session_cancelled", "session_deleted"})
#: Failures a reconnect can cure (server restart, network drop, load shedding).
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass(frozen=True)
class ClassroomEvent:
    """One event of the room: its position, its kind and its typed payload.

    `type` is the name of the payload in `classmesh.events.v1.Event` (for example
    `"chat_message_posted"`) and `payload` that message (`events_pb2.ChatMessagePosted`).
    """

    seq: int
    type: str
    payload: Message
    event: events_pb2.Event

    @property
    def actor(self) -> common_pb2.Actor:
        return self.event.actor

    @property
    def time(self) -> datetime:
        return self.event.time.ToDatetime()


class Classroom:
    """A participant's view of one room: the main room of a session or a breakout room.

    >>> room = Classroom(client, session_id)
    >>> async for ev in room.events():
    ...     if ev.type == "chat_message_posted":
    ...         print(ev.payload.message.sender.display_name, ev.payload.message.text)

    `events()` replays everything after `after_seq`, then streams live, and reconnects by
    itself (with `after_seq` = the last seq it yielded, so nothing is lost or repeated)
    when the connection drops or a server restarts; it ends after the session ends.
    `max_reconnects` bounds consecutive failed reconnects (None: keep trying). Errors a
    reconnect cannot cure (permission, a removed participant) are raised.

    The caller must have joined the session (`client.sessions.join_session`).
    """

    def __init__(
        self,
        client: ClassMeshClient,
        session_id: str,
        breakout_room_id: str = "",
        *,
        after_seq: int = 0,
        include_session_events: bool = False,
        types: Collection[str] | None = None,
        max_reconnects: int | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self._client = client
        self._scope = common_pb2.Scope(session_id=session_id, breakout_room_id=breakout_room_id)
        self._last_seq = after_seq
        self._include = include_session_events
        self._types = frozenset(types) if types is not None else None
        self._max_reconnects = max_reconnects
        self._max_backoff = max_backoff
        #: Times the event stream was re-opened after a failure.
        self.reconnects = 0

    @property
    def scope(self) -> common_pb2.Scope:
        """The room, as the `scope` of InteractionService requests."""
        out = common_pb2.Scope()
        out.CopyFrom(self._scope)
        return out

    @property
    def last_seq(self) -> int:
        """Seq of the last event yielded (pass it as `after_seq` to resume elsewhere)."""
        return self._last_seq

    async def events(self) -> AsyncIterator[ClassroomEvent]:
        """Typed events of the room, replayed after `after_seq`, then live, until the end."""
        failures = 0
        while True:
            try:
                async for response in self._client.interaction.subscribe(
                    scope=self._scope,
                    after_seq=self._last_seq,
                    include_session_events=self._include,
                    retry=NO_RETRY,
                ):
                    failures = 0
                    event = response.event
                    if event.seq <= self._last_seq:
                        continue  # never yield an event twice
                    self._last_seq = event.seq
                    kind = event.WhichOneof("payload") or ""
                    if self._types is None or kind in self._types:
                        yield ClassroomEvent(event.seq, kind, getattr(event, kind), event)
                    if kind in _TERMINAL:
                        return
                # The server closed the stream without the session ending (it shut down).
                failures += 1
            except ClassMeshError as exc:
                if exc.code not in _TRANSIENT:
                    raise
                failures += 1
                if self._max_reconnects is not None and failures > self._max_reconnects:
                    raise
                delay = exc.retry_after
            else:
                delay = None
            if self._max_reconnects is not None and failures > self._max_reconnects:
                return
            self.reconnects += 1
            if delay is None or delay <= 0:
                delay = random.uniform(0, min(self._max_backoff, 0.1 * 2 ** min(failures, 10)))
            await asyncio.sleep(delay)

    def __aiter__(self) -> AsyncIterator[ClassroomEvent]:
        return self.events()

    # ------------------------------------------------------------------ shortcuts

    async def send_chat(
        self,
        text: str,
        *,
        recipient_user_id: str = "",
        type: interaction_pb2.ChatMessageType.ValueType = interaction_pb2.CHAT_MESSAGE_TYPE_TEXT,
    ) -> interaction_pb2.ChatMessage:
        """Post a chat message to the room (privately to `recipient_user_id` if given)."""
        resp = await self._client.interaction.send_chat_message(
            scope=self._scope, text=text, type=type, recipient_user_id=recipient_user_id
        )
        return resp.message

    async def raise_hand(self) -> interaction_pb2.HandRaise:
        """Raise the caller's hand (a repeat returns the active hand raise)."""
        return (await self._client.interaction.raise_hand(scope=self._scope)).hand_raise

    async def lower_hand(self) -> interaction_pb2.HandRaise:
        """Lower the caller's hand."""
        return (await self._client.interaction.lower_hand(scope=self._scope)).hand_raise

    async def ask(self, text: str, *, anonymous: bool = False) -> interaction_pb2.Question:
        """Ask a question in the room's Q&A."""
        resp = await self._client.interaction.ask_question(
            scope=self._scope, text=text, anonymous=anonymous
        )
        return resp.question

    async def respond(self, poll_id: str, *option_indexes: int) -> interaction_pb2.Poll:
        """Answer (or change the answer to) a poll."""
        resp = await self._client.interaction.respond_to_poll(
            session_id=self._scope.session_id, poll_id=poll_id, option_indexes=list(option_indexes)
        )
        return resp.poll
