"""Messages between the signaling process and its media workers, and their framing.

One private socket pair per worker (the parent keeps one end, the worker inherits the other
as a file descriptor). Each message is a 4-byte big-endian length and a pickle of one of
the dataclasses below; both ends run the same code and the socket is never exposed, so
pickle carries only these types (and the plain dataclasses of engine/backend.py).

- parent -> worker: `Call(id, method, args)`; `method` is a `MediaBackend` method name (or
  `worker_stats`, `shutdown`); the worker refuses any other name;
- worker -> parent: `Result(id, value)` or `Failure(id, error)` for each call, and `Notify`
  for back-end events (subscriber offers, closed peers), in the order they happened.

Signaling only: media never crosses this socket (a worker terminates its peers' UDP).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import grpc

from classmesh.core.errors import ClassMeshError, InvalidArgument, Unavailable
from classmesh.media.engine.backend import BackendEvent

__all__ = [
    "CALLS",
    "Call",
    "Failure",
    "Message",
    "Notify",
    "Result",
    "WireError",
    "read_message",
    "write_message",
]

#: Largest message (SDPs of 100 tracks stay well below it).
MAX_MESSAGE = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")

#: Methods a worker serves.
CALLS = frozenset(
    {
        "open_router",
        "close_router",
        "add_peer",
        "remove_peer",
        "move_peer",
        "publisher_offer",
        "add_producer",
        "remove_producer",
        "subscribe",
        "unsubscribe",
        "subscriber_answer",
        "add_ice_candidate",
        "set_producer_state",
        "set_consumer_state",
        "set_preferred_layers",
        "stats",
        "worker_stats",
        "shutdown",
    }
)


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    value: Any


@dataclass(frozen=True, slots=True)
class WireError:
    """A `ClassMeshError` as it crosses the socket: status code name, reason, message,
    metadata, field violations (INVALID_ARGUMENT) and retry delay (UNAVAILABLE)."""

    code: str
    reason: str
    message: str
    metadata: dict[str, str]
    field_violations: tuple[tuple[str, str], ...] = ()
    retry_after: float = 0.0

    @classmethod
    def of(cls, err: ClassMeshError) -> WireError:
        return cls(
            err.code.name,
            err.reason,
            err.message,
            dict(err.metadata),
            tuple(getattr(err, "field_violations", ())),
            float(getattr(err, "retry_after", 0.0)),
        )

    def error(self) -> ClassMeshError:
        if self.code == "INVALID_ARGUMENT":
            return InvalidArgument(
                self.field_violations, self.message, reason=self.reason, metadata=self.metadata
            )
        if self.code == "UNAVAILABLE":
            return Unavailable(self.reason, self.retry_after, self.message, metadata=self.metadata)
        return ClassMeshError(
            self.reason, self.message, metadata=self.metadata, code=grpc.StatusCode[self.code]
        )


@dataclass(frozen=True, slots=True)
class Failure:
    id: int
    error: WireError


@dataclass(frozen=True, slots=True)
class Notify:
    router_id: str
    peer_id: str
    event: BackendEvent


Message = Call | Result | Failure | Notify


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"media worker message of {size} bytes is too large")
    try:
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = pickle.loads(body)  # noqa: S301 - private socket pair, same code both ends
    if not isinstance(message, Call | Result | Failure | Notify):
        raise ValueError(f"unexpected media worker message {type(message).__name__}")
    return message


def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(body)) + body)
