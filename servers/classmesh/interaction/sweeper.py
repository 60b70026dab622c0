"""Background work of InteractionService: close polls whose time is up, complete timers that
reached zero. Every instance runs it; rows are taken with `FOR UPDATE SKIP LOCKED`, so two
instances never close the same poll twice, and each change appends its event (system
actor) in its own transaction before it is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from classmesh.core.db import transaction
from classmesh.core.events import EventRecord
from classmesh.core.runtime import Runtime

if TYPE_CHECKING:
    from classmesh.interaction.service import InteractionService

__all__ = ["Sweeper"]

log = logging.getLogger("classmesh.interaction.sweeper")


class Sweeper:
    def __init__(self, runtime: Runtime, service: InteractionService, interval: float) -> None:
        self.runtime = runtime
        self.service = service
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="interaction-sweeper"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # retried on the next tick; logged once per outage
                if not failing:
                    log.exception("interaction sweep failed")
                failing = True
            else:
                failing = False

    async def sweep(self) -> int:
        """One pass; returns how many events it appended."""
        published = 0
        for step in (self.service.close_due_polls, self.service.complete_due_timers):
            records: list[EventRecord]
            async with transaction(self.runtime.pool) as conn:
                records = await step(conn)
            for record in records:
                await self.runtime.bus.publish(record)
            published += len(records)
        return published
