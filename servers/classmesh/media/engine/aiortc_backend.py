"""The aiortc back-end: a client of N media worker processes (engine/worker.py).

Forwarding never runs in the signaling (gRPC) process. `spawn()` starts the workers at
service start-up (plain child processes, one event loop each, one private socket pair per
worker, engine/ipc.py); `start()` connects to them. Every router lives on one worker: a new
router goes to the least-loaded live worker (fewest peers, then fewest routers). Calls about
a router go to its worker; back-end events (subscriber offers, closed peers) come back on
the same socket and reach the service in order through one dispatcher task.

Worker failure: when a worker's socket reaches end of stream (the process died: crash,
SIGKILL, OOM), its pending calls fail with UNAVAILABLE MEDIA_UNAVAILABLE, a new process is
started in its slot, and each of its routers is opened again (same router id, empty) on the
least-loaded live worker; the service then gets `RouterRestarted` for each, re-adds peers
and producers and tells clients to renegotiate. Workers die with the signaling process
(PR_SET_PDEATHSIG and end of stream on their socket); `close()` asks them to stop, then
terminates and finally kills what is left.

Moves between routers on one worker keep the publisher connection; across workers the peer
is re-created on the target worker and `move_peer` answers False (the client publishes
again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from classmesh.core.errors import ClassMeshError, DeadlineExceeded, NotFound, Unavailable
from classmesh.media.engine.backend import (
    BackendEvent,
    BackendName,
    EventSink,
    ProducerSpec,
    RouterRestarted,
    RouterStatsData,
    Target,
    WorkerStatsData,
)
from classmesh.media.engine.ipc import (
    Call,
    Failure,
    Notify,
    Result,
    read_message,
    write_message,
)

__all__ = ["AiortcBackend", "default_worker_count"]

log = logging.getLogger("classmesh.media.workers")

#: Seconds a worker call may take (SDP work is milliseconds; this bounds a hung worker).
CALL_TIMEOUT = 10.0
#: Seconds a worker gets to stop by itself on close, then SIGTERM, then SIGKILL.
STOP_GRACE = 3.0


def default_worker_count() -> int:
    """One worker per core minus one for the signaling process, at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    alive: bool = False
    restarts: int = 0
    #: router id -> peer ids placed there (the load figure).
    routers: dict[str, set[str]] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return f"aiortc-{self.slot}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def load(self) -> tuple[int, int, int]:
        return (sum(len(p) for p in self.routers.values()), len(self.routers), self.slot)


class AiortcBackend:
    """`MediaBackend` on aiortc media worker processes."""

    name: BackendName = "aiortc"
    simulcast = False

    def __init__(
        self,
        *,
        workers: int = 0,
        ice_hosts: str = "",
        queue_size: int = 64,
        log_level: str = "INFO",
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.events: EventSink | None = None
        self.count = workers or default_worker_count()
        self.ice_hosts = ice_hosts
        self.queue_size = queue_size
        self.log_level = log_level
        self.call_timeout = call_timeout
        self.workers = [_Worker(slot) for slot in range(self.count)]
        self.placement: dict[str, _Worker] = {}
        self.closing = False
        self._ids = itertools.count(1)
        self._started: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[str, str, BackendEvent]] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self._restarting: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- processes

    def spawn(self) -> None:
        """Start every worker process now (synchronous: service start-up)."""
        for worker in self.workers:
            if worker.proc is None:
                self._spawn(worker)

    def _spawn(self, worker: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
                [
                    sys.executable,
                    "-m",
                    "classmesh.media.engine.worker",
                    "--fd",
                    str(child.fileno()),
                    "--worker-id",
                    worker.worker_id,
                    "--parent-pid",
                    str(os.getpid()),
                    "--ice-hosts",
                    self.ice_hosts,
                    "--queue-size",
                    str(self.queue_size),
                    "--log-level",
                    self.log_level,
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        worker.sock = parent
        worker.reader = worker.writer = None
        log.info("media worker started", extra={"worker": worker.worker_id, "pid": worker.pid})

    async def _connect(self, worker: _Worker) -> None:
        assert worker.sock is not None
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=worker.sock)
        worker.alive = True
        worker.task = asyncio.get_running_loop().create_task(self._read(worker))

    async def start(self) -> None:
        """Connect to the workers (spawning any not started yet); idempotent."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self.spawn()
        for worker in self.workers:
            if not worker.alive:
                await self._connect(worker)
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self) -> None:
        self.closing = True
        for task in list(self._restarting):
            task.cancel()
        stops = [self._stop(w) for w in self.workers]
        await asyncio.gather(*stops, return_exceptions=True)
        self.placement.clear()
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    async def _stop(self, worker: _Worker) -> None:
        if worker.alive and worker.writer is not None:
            with contextlib.suppress(ClassMeshError, ConnectionError, OSError):
                await self._call(worker, "shutdown", timeout=STOP_GRACE)
        proc = worker.proc
        if proc is not None:
            if not await _exited(proc, STOP_GRACE):
                proc.terminate()
                if not await _exited(proc, STOP_GRACE):
                    proc.kill()
                    await _exited(proc, STOP_GRACE)
        worker.alive = False
        if worker.writer is not None:
            worker.writer.close()
        if worker.task is not None:
            worker.task.cancel()

    # ----------------------------------------------------------------- wire

    async def _read(self, worker: _Worker) -> None:
        assert worker.reader is not None
        try:
            while True:
                message = await read_message(worker.reader)
                if message is None:
                    break
                if isinstance(message, Result | Failure):
                    fut = worker.pending.pop(message.id, None)
                    if fut is not None and not fut.done():
                        if isinstance(message, Result):
                            fut.set_result(message.value)
                        else:
                            fut.set_exception(message.error.error())
                elif isinstance(message, Notify):
                    self._queue.put_nowait((message.router_id, message.peer_id, message.event))
        except (ValueError, EOFError) as exc:
            log.error("media worker sent garbage", extra={"detail": str(exc)})
        finally:
            worker.alive = False
            error = Unavailable("MEDIA_UNAVAILABLE", 1.0, "the media worker stopped")
            for fut in worker.pending.values():
                if not fut.done():
                    fut.set_exception(error)
            worker.pending.clear()
            if not self.closing:
                try:
                    task = asyncio.get_running_loop().create_task(self._recover(worker))
                except RuntimeError:  # the loop is shutting down: nothing to recover
                    return
                self._restarting.add(task)
                task.add_done_callback(self._restarting.discard)

    async def _call(
        self, worker: _Worker, method: str, *args: Any, timeout: float | None = None, **kw: Any
    ) -> Any:
        if not worker.alive or worker.writer is None:
            raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "the media worker is restarting")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[call_id] = fut
        try:
            write_message(worker.writer, Call(call_id, method, args, kw))
            await worker.writer.drain()
        except (ConnectionError, OSError) as exc:
            worker.pending.pop(call_id, None)
            raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "the media worker is unreachable") from exc
        try:
            return await asyncio.wait_for(fut, timeout or self.call_timeout)
        except TimeoutError:
            worker.pending.pop(call_id, None)
            raise DeadlineExceeded(
                "MEDIA_TIMEOUT", f"media worker {worker.worker_id} did not answer {method}"
            ) from None

    async def _dispatch(self) -> None:
        while True:
            router_id, peer_id, event = await self._queue.get()
            if self.events is None:
                continue
            try:
                await self.events(router_id, peer_id, event)
            except Exception:
                log.exception("media event handler failed", extra={"router_id": router_id})

    # ----------------------------------------------------------------- recovery

    async def _recover(self, dead: _Worker) -> None:
        """Respawn the dead worker's slot, re-open its routers on live workers."""
        code = dead.proc.poll() if dead.proc is not None else None
        if dead.proc is not None and code is None:
            dead.proc.kill()
            await _exited(dead.proc, STOP_GRACE)
            code = dead.proc.returncode
        log.error(
            "media worker died",
            extra={"worker": dead.worker_id, "pid": dead.pid, "exit_code": code},
        )
        routers = list(dead.routers)
        dead.routers.clear()
        for router_id in routers:
            if self.placement.get(router_id) is dead:
                del self.placement[router_id]
        dead.restarts += 1
        while not self.closing:
            try:
                self._spawn(dead)
                await self._connect(dead)
                break
            except OSError:
                log.exception("media worker respawn failed", extra={"worker": dead.worker_id})
                await asyncio.sleep(1.0)
        for router_id in routers:
            try:
                node = await self.open_router(router_id)
            except ClassMeshError:
                log.exception("router re-open failed", extra={"router_id": router_id})
                continue
            self._queue.put_nowait((router_id, "", RouterRestarted(node_id=node)))

    # ----------------------------------------------------------------- placement

    def _worker_of(self, router_id: str) -> _Worker:
        worker = self.placement.get(router_id)
        if worker is None:
            raise NotFound("router", router_id, reason="ROUTER_NOT_FOUND")
        return worker

    def node_of(self, router_id: str) -> str:
        worker = self.placement.get(router_id)
        return worker.worker_id if worker is not None else ""

    def worker_pids(self) -> dict[str, int]:
        return {w.worker_id: w.pid for w in self.workers}

    # ----------------------------------------------------------------- MediaBackend

    async def open_router(self, router_id: str) -> str:
        await self.start()
        current = self.placement.get(router_id)
        if current is not None and current.alive:
            return current.worker_id
        live = [w for w in self.workers if w.alive]
        if not live:
            raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "no media worker is running")
        worker = min(live, key=lambda w: w.load)
        worker.routers[router_id] = set()
        self.placement[router_id] = worker
        try:
            node = str(await self._call(worker, "open_router", router_id))
        except ClassMeshError:
            worker.routers.pop(router_id, None)
            self.placement.pop(router_id, None)
            raise
        return node

    async def close_router(self, router_id: str) -> None:
        worker = self.placement.pop(router_id, None)
        if worker is None:
            return
        worker.routers.pop(router_id, None)
        with contextlib.suppress(Unavailable):
            await self._call(worker, "close_router", router_id)

    async def add_peer(self, router_id: str, peer_id: str) -> None:
        worker = self._worker_of(router_id)
        await self._call(worker, "add_peer", router_id, peer_id)
        worker.routers.setdefault(router_id, set()).add(peer_id)

    async def remove_peer(self, router_id: str, peer_id: str) -> None:
        worker = self.placement.get(router_id)
        if worker is None:
            return
        worker.routers.get(router_id, set()).discard(peer_id)
        with contextlib.suppress(Unavailable):
            await self._call(worker, "remove_peer", router_id, peer_id)

    async def move_peer(
        self,
        from_router_id: str,
        to_router_id: str,
        peer_id: str,
        producers: Sequence[tuple[str, ProducerSpec]],
    ) -> bool:
        old, new = self._worker_of(from_router_id), self._worker_of(to_router_id)
        if old is new:
            kept = bool(
                await self._call(old, "move_peer", from_router_id, to_router_id, peer_id, producers)
            )
            old.routers.get(from_router_id, set()).discard(peer_id)
            new.routers.setdefault(to_router_id, set()).add(peer_id)
            return kept
        await self.remove_peer(from_router_id, peer_id)
        await self.add_peer(to_router_id, peer_id)
        for _, spec in producers:
            await self._call(new, "add_producer", to_router_id, peer_id, spec)
        return False

    async def publisher_offer(
        self, router_id: str, peer_id: str, sdp: str, producers: Sequence[ProducerSpec]
    ) -> str:
        worker = self._worker_of(router_id)
        return str(
            await self._call(worker, "publisher_offer", router_id, peer_id, sdp, tuple(producers))
        )

    async def add_producer(self, router_id: str, peer_id: str, spec: ProducerSpec) -> None:
        await self._call(self._worker_of(router_id), "add_producer", router_id, peer_id, spec)

    async def remove_producer(self, router_id: str, producer_id: str) -> None:
        worker = self.placement.get(router_id)
        if worker is not None:
            with contextlib.suppress(Unavailable):
                await self._call(worker, "remove_producer", router_id, producer_id)

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
        await self._call(
            self._worker_of(router_id),
            "subscribe",
            router_id,
            peer_id,
            tuple(producer_ids),
            audio_only=audio_only,
            spatial_layer=spatial_layer,
            temporal_layer=temporal_layer,
        )

    async def unsubscribe(self, router_id: str, peer_id: str, producer_ids: Sequence[str]) -> None:
        await self._call(
            self._worker_of(router_id), "unsubscribe", router_id, peer_id, tuple(producer_ids)
        )

    async def subscriber_answer(self, router_id: str, peer_id: str, sdp: str) -> None:
        await self._call(self._worker_of(router_id), "subscriber_answer", router_id, peer_id, sdp)

    async def add_ice_candidate(
        self,
        router_id: str,
        peer_id: str,
        target: Target,
        candidate: str,
        sdp_mid: str,
        sdp_mline_index: int,
    ) -> None:
        await self._call(
            self._worker_of(router_id),
            "add_ice_candidate",
            router_id,
            peer_id,
            target,
            candidate,
            sdp_mid,
            sdp_mline_index,
        )

    async def set_producer_state(
        self, router_id: str, producer_id: str, *, paused: bool, moderator_muted: bool
    ) -> None:
        await self._call(
            self._worker_of(router_id),
            "set_producer_state",
            router_id,
            producer_id,
            paused=paused,
            moderator_muted=moderator_muted,
        )

    async def set_consumer_state(
        self, router_id: str, peer_id: str, producer_id: str, *, paused: bool, audio_only: bool
    ) -> None:
        await self._call(
            self._worker_of(router_id),
            "set_consumer_state",
            router_id,
            peer_id,
            producer_id,
            paused=paused,
            audio_only=audio_only,
        )

    async def set_preferred_layers(
        self, router_id: str, peer_id: str, producer_id: str, spatial: int, temporal: int
    ) -> None:
        await self._call(
            self._worker_of(router_id),
            "set_preferred_layers",
            router_id,
            peer_id,
            producer_id,
            spatial,
            temporal,
        )

    async def stats(self, router_id: str) -> RouterStatsData:
        data = await self._call(self._worker_of(router_id), "stats", router_id)
        assert isinstance(data, RouterStatsData)
        return data

    async def worker_stats(self) -> list[WorkerStatsData]:
        async def one(worker: _Worker) -> WorkerStatsData:
            if worker.alive:
                with contextlib.suppress(ClassMeshError):
                    data = await self._call(worker, "worker_stats", timeout=2.0)
                    assert isinstance(data, WorkerStatsData)
                    data.restarts = worker.restarts
                    return data
            return WorkerStatsData(
                worker_id=worker.worker_id, pid=worker.pid, alive=False, restarts=worker.restarts
            )

        return list(await asyncio.gather(*(one(w) for w in self.workers)))


async def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait (without blocking the loop) up to `timeout` s for `proc` to exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
