"""Presence background work of one SessionService process.

* `StreamPresence` keeps participants with an open WatchSession stream present: one batched
  `UPDATE ... last_seen_at` per `interval` for all of them (not one write per stream), and a
  row is written at most once per `interval` (heartbeats share the same throttle).
* `Sweeper` runs `SessionService.sweep` every `presence_sweep_interval_seconds`: overdue
  participants become `disconnected`, and those whose grace window ran out `left`, with
  their events published after each session's transaction commits.

Both start with the servicer (`create_servicer`) and stop when the runtime closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from classmesh.core.runtime import Runtime

if TYPE_CHECKING:
    from classmesh.session.service import SessionService

__all__ = ["StreamPresence", "Sweeper"]

log = logging.getLogger("classmesh.session.presence")


class StreamPresence:
    """Reference-counted set of participants whose WatchSession stream is open."""

    def __init__(self, runtime: Runtime, service: SessionService, interval: float) -> None:
        self._runtime = runtime
        self._service = service
        self._interval = interval
        self._open: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watching(self, participant_id: str | None) -> Iterator[None]:
        if participant_id is None:
            yield
            return
        self._open[participant_id] += 1
        try:
            yield
        finally:
            self._open[participant_id] -= 1
            if self._open[participant_id] <= 0:
                del self._open[participant_id]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            ids = list(self._open)
            if not ids:
                continue
            try:
                await self._service.touch(self._runtime.pool, ids)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stream presence update failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Sweeper:
    """Periodic presence sweep; publishes the events each pass appended."""

    def __init__(self, runtime: Runtime, service: SessionService, interval: float) -> None:
        self._runtime = runtime
        self._service = service
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_once(self) -> int:
        records = await self._service.sweep(self._runtime.pool)
        for record in records:
            await self._runtime.bus.publish(record)
        return len(records)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A database blip must not kill presence for good: log, try next pass.
                log.exception("presence sweep failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
