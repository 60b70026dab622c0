"""Live event bus: publish after commit on Redis, subscribe = replay from PostgreSQL then live.

PostgreSQL (`session_events`) is the truth; Redis pub/sub is only a doorbell that makes
delivery fast. Everything here is built so that a lost, late or duplicated Redis message
can never lose, duplicate or reorder an event for a subscriber:

* `Bus.publish` sends the committed record on `<prefix>:session:<session_id>`. A Redis
  failure is logged and swallowed: subscribers back-fill from PostgreSQL.
* `Bus.subscribe` yields every event with `seq > after_seq` exactly once, in `seq` order.
  It registers for the channel and waits until Redis confirmed the SUBSCRIBE *before* its
  replay query, so no event can fall between replay and live. Live events with
  `seq <= last delivered` are dropped; a live event with `seq > last + 1` (a gap: Redis
  dropped something) makes the subscriber re-read the missing range from PostgreSQL.
* One Redis pub/sub connection per `Bus` (per process) carries every session channel; each
  message is decoded once and fanned out in-process to the subscribers of that session.
* A watcher task covers what gaps cannot reveal. While the pub/sub connection is down it
  reconnects with backoff and, every `poll_interval`, compares each session's
  `sessions.last_seq` with what its subscribers have: the ones behind re-read from
  PostgreSQL, so events committed during a Redis outage still arrive. The same check runs
  after each (re)subscription and after `idle_poll_interval` without a message on a
  channel (a message dropped at the tail shows no gap until the next one). One cheap
  query per session, not per subscriber; only subscribers that are behind read events.
  A connection that stays silent past `ping_interval` is pinged and, without an answer,
  dropped and reopened (a half-open TCP connection never raises by itself).
* Publishers race (seq 8 may be published before seq 7), so a live message that arrives
  ahead of its predecessor is held per session for `reorder_window` (50 ms) first: a
  reorder then costs nothing, and only a real loss makes subscribers read PostgreSQL.

Slow-consumer policy: every subscriber has a bounded queue (`queue_size`). When the fan-out
finds it full, the subscriber is marked lagging: its queue is cleared and it re-reads from
PostgreSQL, in pages, starting after the last seq it delivered, then continues live. A slow
consumer therefore never loses an event, never blocks the fan-out or other subscribers, and
its memory stays bounded by `queue_size` + one page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from classmesh.core.events import EventRecord, SessionNotFoundError, last_seq, read_events

__all__ = ["Bus", "BusOptions", "channel_name"]

log = logging.getLogger(__name__)


def channel_name(prefix: str, session_id: str) -> str:
    """The Redis channel that carries one session's live events."""
    return f"{prefix}:session:{session_id}"


@dataclass(frozen=True, slots=True)
class BusOptions:
    """Timing knobs of the bus; the defaults suit production."""

    #: Events read from PostgreSQL per replay/back-fill query.
    page_size: int = 500
    #: While Redis is unreachable: how often each session is checked in PostgreSQL (s).
    poll_interval: float = 0.5
    #: Check a session in PostgreSQL after this long without a live message on it (s).
    idle_poll_interval: float = 3.0
    #: Longest a publish may take before it is abandoned (s); the event is already durable.
    publish_timeout: float = 1.0
    #: Longest a new subscriber waits for Redis to confirm SUBSCRIBE before replaying (s).
    subscribe_timeout: float = 2.0
    #: Reconnect backoff bounds (s), doubling from min to max.
    backoff_min: float = 0.05
    backoff_max: float = 2.0
    #: Ping a pub/sub connection silent for this long (s) ...
    ping_interval: float = 5.0
    #: ... and reopen it when nothing came back this long after (s).
    ping_timeout: float = 3.0
    #: Connect timeout of the pub/sub connection (s).
    connect_timeout: float = 2.0
    #: How long a live message that arrives ahead of its predecessor is held for it (s).
    reorder_window: float = 0.05


class _Subscriber:
    """One `subscribe()` iterator's state, shared between the fan-out and its consumer."""

    __slots__ = (
        "tenant_id",
        "maxsize",
        "queue",
        "last",
        "queued_max",
        "needs_catchup",
        "wakeup",
        "closed",
        "lag_count",
    )

    def __init__(self, tenant_id: str, maxsize: int, after_seq: int) -> None:
        self.tenant_id = tenant_id
        self.maxsize = maxsize
        self.queue: deque[EventRecord] = deque()
        self.last = after_seq  # last seq delivered (or skipped by the types filter)
        self.queued_max = 0  # highest seq in the queue, 0 when empty after a clear
        self.needs_catchup = True  # the first thing a subscriber does is replay
        self.wakeup = asyncio.Event()
        self.closed = False
        self.lag_count = 0

    def offer(self, record: EventRecord) -> bool:
        """Called by the fan-out; never blocks, never grows past `maxsize`; True if lagging."""
        if record.seq <= self.last or record.seq <= self.queued_max:
            return False  # already delivered or queued: a duplicate costs nothing here
        lagged = False
        if len(self.queue) >= self.maxsize:
            # Lagging: drop what is queued; PostgreSQL still has all of it.
            self.queue.clear()
            self.queued_max = 0
            self.needs_catchup = True
            self.lag_count += 1
            lagged = True
        else:
            self.queue.append(record)
            self.queued_max = record.seq
        self.wakeup.set()
        return lagged

    def behind(self, head: int) -> bool:
        return max(self.last, self.queued_max) < head

    def poke(self) -> None:
        self.needs_catchup = True
        self.wakeup.set()


class _Channel:
    """Subscribers of one session in this process."""

    __slots__ = (
        "name",
        "session_id",
        "subscribers",
        "settled",
        "last_activity",
        "checking",
        "next_seq",
        "held",
        "flush",
    )

    def __init__(self, name: str, session_id: str) -> None:
        self.name = name
        self.session_id = session_id
        self.subscribers: set[_Subscriber] = set()
        # Set once Redis confirmed SUBSCRIBE on the current connection, or while Redis is
        # down (then the watcher's polling covers the session): a new subscriber waits on
        # it before its replay query.
        self.settled = asyncio.Event()
        self.last_activity = time.monotonic()
        self.checking = False
        # Reorder buffer: publishers race, so seq 8 may be published before seq 7. Holding
        # an early message for `reorder_window` lets the late one catch up, instead of every
        # subscriber of the session seeing a gap and querying PostgreSQL.
        self.next_seq = 0  # next seq expected live; 0 = unknown (take the first message)
        self.held: dict[int, EventRecord] = {}
        self.flush: asyncio.TimerHandle | None = None


class Bus:
    """Publishes committed events on Redis and serves ordered, gap-free subscriptions."""

    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        prefix: str,
        queue_size: int = 1024,
        *,
        options: BusOptions | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self._redis = redis
        self._pool = pool
        self._prefix = prefix
        self._queue_size = queue_size
        self._opt = options or BusOptions()
        self._channels: dict[str, _Channel] = {}
        self._conn: AbstractConnection | None = None
        self._outbox: asyncio.Queue[tuple[str, ...]] | None = None
        # Per channel name, the channels whose SUBSCRIBE awaits its confirmation, in send
        # order (Redis answers in order, so the head is the one a confirmation belongs to).
        self._acks: dict[str, deque[_Channel]] = {}
        self._up = False
        self._down = False  # known unreachable (False while the first connect is pending)
        self._last_rx = time.monotonic()
        self._last_ping = 0.0
        self._supervisor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._publish_failing = False
        self._outage = False  # an outage was logged and has not been resolved yet
        self._rx_count = 0  # replies received on the current pub/sub connection
        self._lagged = 0
        self._closed = False

    # ------------------------------------------------------------------ publish

    async def publish(self, record: EventRecord) -> None:
        """Announce a committed event. Never raises for Redis trouble (logged once)."""
        channel = channel_name(self._prefix, record.session_id)
        try:
            # Bounded: the caller's client may retry for seconds; the event is durable.
            async with asyncio.timeout(self._opt.publish_timeout):
                await self._redis.publish(channel, record.to_json())
        except Exception as exc:  # noqa: BLE001 - Redis is best-effort here by design
            if not self._publish_failing:
                self._publish_failing = True
                log.warning(
                    "bus publish failed; subscribers will back-fill from PostgreSQL",
                    extra={"channel": channel, "error": repr(exc)},
                )
            return
        if self._publish_failing:
            self._publish_failing = False
            log.info("bus publish recovered", extra={"channel": channel})

    # ---------------------------------------------------------------- subscribe

    def subscribe(
        self,
        *,
        tenant_id: str,
        session_id: str,
        after_seq: int = 0,
        types: Collection[str] | None = None,
    ) -> AsyncIterator[EventRecord]:
        """Every event of the session with `seq > after_seq`, replayed then live, in order.

        `types` restricts what is yielded (seq tracking still covers every event). The
        iterator ends when the bus closes; close it (`aclose()`) or cancel its consumer to
        unsubscribe.
        """
        if self._closed:
            raise RuntimeError("bus is closed")
        # Normalised so that channel names match what publish() derives from the record.
        tenant = str(uuid.UUID(tenant_id))
        session = str(uuid.UUID(session_id))
        if after_seq < 0:
            raise ValueError("after_seq must be >= 0")
        wanted = frozenset(types) if types is not None else None
        return self._stream(tenant, session, after_seq, wanted)

    async def _stream(
        self, tenant_id: str, session_id: str, after_seq: int, types: frozenset[str] | None
    ) -> AsyncGenerator[EventRecord, None]:
        sub = _Subscriber(tenant_id, self._queue_size, after_seq)
        ch = self._attach(session_id, sub)
        try:
            if not ch.settled.is_set():
                # Replay only once Redis delivers to us, so nothing falls in between. If it
                # takes too long, replay anyway: the confirmation triggers a check later.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._opt.subscribe_timeout):
                        await ch.settled.wait()
            page = self._opt.page_size
            while not sub.closed:
                if sub.needs_catchup:
                    sub.needs_catchup = False
                    while True:
                        rows = await read_events(
                            self._pool,
                            tenant_id=tenant_id,
                            session_id=session_id,
                            after_seq=sub.last,
                            limit=page,
                        )
                        for record in rows:
                            if record.seq <= sub.last:
                                continue
                            sub.last = record.seq
                            if types is None or record.type in types:
                                yield record
                        if len(rows) < page:
                            break
                    continue
                if sub.queue:
                    record = sub.queue.popleft()
                    if not sub.queue:
                        sub.queued_max = 0
                    if record.seq <= sub.last:
                        continue
                    if record.seq != sub.last + 1:
                        # Gap: Redis lost something. The row of `record` is committed too
                        # (seq order is commit order), so the catch-up read includes it.
                        sub.needs_catchup = True
                        continue
                    sub.last = record.seq
                    if types is None or record.type in types:
                        yield record
                    continue
                # No await since the checks above, so no wake-up can be missed here.
                sub.wakeup.clear()
                await sub.wakeup.wait()
        finally:
            self._detach(ch, sub)

    def _attach(self, session_id: str, sub: _Subscriber) -> _Channel:
        name = channel_name(self._prefix, session_id)
        ch = self._channels.get(name)
        if ch is None:
            ch = _Channel(name, session_id)
            self._channels[name] = ch
            if self._up:
                self._send_subscribe(ch)
            elif self._down:
                ch.settled.set()
        ch.subscribers.add(sub)
        self._ensure_tasks()
        return ch

    def _detach(self, ch: _Channel, sub: _Subscriber) -> None:
        ch.subscribers.discard(sub)
        if ch.subscribers or self._channels.get(ch.name) is not ch:
            return
        del self._channels[ch.name]
        if ch.flush is not None:
            ch.flush.cancel()
        if self._up and self._outbox is not None:
            self._outbox.put_nowait(("UNSUBSCRIBE", ch.name))

    def _send_subscribe(self, ch: _Channel) -> None:
        assert self._outbox is not None
        ch.settled.clear()
        # New connection: what was missed meanwhile is back-filled by the check that follows
        # the confirmation, so do not hold live messages waiting for it.
        self._flush_held(ch)
        ch.next_seq = 0
        self._acks.setdefault(ch.name, deque()).append(ch)
        self._outbox.put_nowait(("SUBSCRIBE", ch.name))

    # --------------------------------------------------------------- lifecycle

    def _ensure_tasks(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="bus-pubsub")
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="bus-watch")

    async def close(self) -> None:
        """Stop the pub/sub connection; open subscriptions end."""
        self._closed = True
        for ch in self._channels.values():
            if ch.flush is not None:
                ch.flush.cancel()
            for sub in ch.subscribers:
                sub.closed = True
                sub.wakeup.set()
            ch.settled.set()
        tasks = [t for t in (self._supervisor, self._watcher, *self._checks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._supervisor = self._watcher = None

    @property
    def lag_events(self) -> int:
        """How often a subscriber's queue overflowed (it then re-read from PostgreSQL)."""
        return self._lagged

    @property
    def connected(self) -> bool:
        """Whether the shared pub/sub connection is currently up."""
        return self._up

    def _new_connection(self) -> AbstractConnection:
        pool = self._redis.connection_pool
        # The pool's maintenance-notification handlers belong to that pool (and need RESP3).
        kwargs: dict[str, Any] = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if not k.startswith(("maint_notifications", "orig_"))
        }
        # Our own connection, not the pool's: no hidden retries or reconnects (a silent
        # reconnect would hide the outage whose events we must back-fill), blocking reads,
        # RESP2 so messages arrive as plain replies.
        kwargs.update(
            retry=Retry(NoBackoff(), 0),
            socket_timeout=None,
            socket_connect_timeout=self._opt.connect_timeout,
            health_check_interval=0,
            protocol=2,
        )
        conn: AbstractConnection = pool.connection_class(**kwargs)
        return conn

    async def _supervise(self) -> None:
        backoff = self._opt.backoff_min
        while not self._closed:
            conn = self._new_connection()
            tasks: list[asyncio.Task[None]] = []
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                self._conn = conn
                self._outbox = asyncio.Queue()
                self._acks = {}
                self._last_rx = time.monotonic()
                self._rx_count = 0
                self._up, self._down = True, False
                for ch in self._channels.values():
                    self._send_subscribe(ch)
                self._read_task = asyncio.create_task(self._read(conn))
                tasks = [self._read_task, asyncio.create_task(self._write(conn, self._outbox))]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        raise error
                raise ConnectionError("pub/sub connection stopped")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "bus pub/sub connection lost; polling PostgreSQL until it is back",
                        extra={"error": repr(exc)},
                    )
            finally:
                self._up = False
                self._down = True
                self._conn = None
                self._outbox = None
                self._read_task = None
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                # Polling covers the sessions now: waiting subscribers may replay.
                for ch in self._channels.values():
                    ch.settled.set()
            if self._closed:
                return
            # Back off from the minimum again only after a connection that worked: one that
            # is accepted and dropped at once (a proxy, a restarting server) keeps doubling.
            backoff = self._opt.backoff_min if self._rx_count else backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._opt.backoff_max)

    async def _write(
        self, conn: AbstractConnection, outbox: asyncio.Queue[tuple[str, ...]]
    ) -> None:
        # The only writer on the connection, so commands go out in the order they were
        # queued (confirmations are matched in that order) and callers never await I/O.
        while True:
            command = await outbox.get()
            if not conn.is_connected:
                raise ConnectionError("pub/sub connection closed")
            await conn.send_command(*command, check_health=False)

    async def _read(self, conn: AbstractConnection) -> None:
        while True:
            reply = await conn.read_response()
            self._last_rx = time.monotonic()
            self._rx_count += 1
            if self._outage:
                self._outage = False
                log.info("bus pub/sub reconnected")
            if not isinstance(reply, list) or not reply:
                continue
            kind = _text(reply[0])
            if kind == "message" and len(reply) >= 3:
                self._fan_out(_text(reply[1]), reply[2])
            elif kind == "subscribe" and len(reply) >= 2:
                self._confirmed(_text(reply[1]))

    def _confirmed(self, name: str) -> None:
        pending = self._acks.get(name)
        if not pending:
            return
        ch = pending.popleft()
        if not pending:
            del self._acks[name]
        if self._channels.get(name) is ch:
            ch.settled.set()
            # Events committed between an earlier replay/outage and this confirmation
            # will never come through Redis: look once.
            self._spawn_check(ch)

    def _fan_out(self, name: str, data: Any) -> None:
        ch = self._channels.get(name)
        if ch is None:
            return
        try:
            record = EventRecord.from_json(data)
        except Exception:  # noqa: BLE001 - a foreign message must not stop the bus
            log.warning("bus dropped an undecodable message", extra={"channel": name})
            return
        ch.last_activity = time.monotonic()
        if ch.next_seq and record.seq > ch.next_seq:
            ch.held[record.seq] = record
            if len(ch.held) >= self._queue_size:
                self._flush_held(ch)
            elif ch.flush is None:
                loop = asyncio.get_running_loop()
                ch.flush = loop.call_later(self._opt.reorder_window, self._flush_held, ch)
            return
        self._deliver(ch, record)
        while ch.next_seq in ch.held:
            self._deliver(ch, ch.held.pop(ch.next_seq))
        if not ch.held and ch.flush is not None:
            ch.flush.cancel()
            ch.flush = None

    def _flush_held(self, ch: _Channel) -> None:
        # The missing message did not come: hand over what we have; subscribers see the gap
        # and back-fill it from PostgreSQL.
        if ch.flush is not None:
            ch.flush.cancel()
            ch.flush = None
        held, ch.held = ch.held, {}
        for seq in sorted(held):
            self._deliver(ch, held[seq])

    def _deliver(self, ch: _Channel, record: EventRecord) -> None:
        ch.next_seq = max(ch.next_seq, record.seq + 1)
        for sub in ch.subscribers:
            if sub.tenant_id == record.tenant_id and sub.offer(record):
                self._lagged += 1

    async def _watch(self) -> None:
        tick = min(self._opt.poll_interval, 0.25)
        last_poll = 0.0
        while not self._closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self._up:
                if now - last_poll >= self._opt.poll_interval:
                    last_poll = now
                    for ch in list(self._channels.values()):
                        self._spawn_check(ch)
                continue
            for ch in list(self._channels.values()):
                if now - ch.last_activity >= self._opt.idle_poll_interval:
                    ch.last_activity = now
                    self._spawn_check(ch)
            silent = now - self._last_rx
            if silent >= self._opt.ping_interval + self._opt.ping_timeout:
                # Half-open connection: nothing answered our ping. Reopen it.
                if self._read_task is not None:
                    self._read_task.cancel()
            elif silent >= self._opt.ping_interval and now - self._last_ping >= (
                self._opt.ping_interval
            ):
                self._last_ping = now
                if self._outbox is not None:
                    self._outbox.put_nowait(("PING",))

    def _spawn_check(self, ch: _Channel) -> None:
        if ch.checking or not ch.subscribers or self._closed:
            return
        ch.checking = True
        task = asyncio.create_task(self._check(ch))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, ch: _Channel) -> None:
        """Wake the subscribers of `ch` that are behind the session's committed head."""
        try:
            for tenant_id in {s.tenant_id for s in ch.subscribers}:
                try:
                    head = await last_seq(self._pool, tenant_id=tenant_id, session_id=ch.session_id)
                except SessionNotFoundError:
                    continue
                for sub in list(ch.subscribers):
                    if sub.tenant_id == tenant_id and sub.behind(head):
                        sub.poke()
        except Exception as exc:  # noqa: BLE001 - retried on the next tick
            log.warning("bus check failed", extra={"channel": ch.name, "error": repr(exc)})
        finally:
            ch.checking = False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
