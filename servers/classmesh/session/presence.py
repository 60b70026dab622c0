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

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from classmesh.core.periodic import Periodic
from classmesh.core.runtime import Runtime

if TYPE_CHECKING:
    from classmesh.session.service import SessionService

__all__ = ["StreamPresence", "Sweeper"]

log = logging.getLogger("classmesh.session.presence")


class StreamPresence(Periodic):
    """Reference-counted set of participants whose WatchSession stream is open."""

    def __init__(self, runtime: Runtime, service: SessionService, interval: float) -> None:
        super().__init__(interval, name="stream presence update", logger=log)
        self._runtime = runtime
        self._service = service
        self._open: Counter[str] = Counter()

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

    async def run_once(self) -> int:
        ids = list(self._open)
        if ids:
            await self._service.touch(self._runtime.pool, ids)
        return len(ids)


class Sweeper(Periodic):
    """Periodic presence sweep; publishes the events each pass appended."""

    def __init__(self, runtime: Runtime, service: SessionService, interval: float) -> None:
        super().__init__(interval, name="presence sweep", logger=log)
        self._runtime = runtime
        self._service = service

    async def run_once(self) -> int:
        records = await self._service.sweep(self._runtime.pool)
        for record in records:
            await self._runtime.bus.publish(record)
        return len(records)
