"""Background work of InteractionService: close polls whose time is up, complete timers that
reached zero. Every instance runs it; rows are taken with `FOR UPDATE SKIP LOCKED`, so two
instances never close the same poll twice, and each change appends its event (system
actor) in its own transaction before it is published.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from classmesh.core.db import transaction
from classmesh.core.events import EventRecord
from classmesh.core.periodic import Periodic
from classmesh.core.runtime import Runtime

if TYPE_CHECKING:
    from classmesh.interaction.service import InteractionService

__all__ = ["Sweeper"]

log = logging.getLogger("classmesh.interaction.sweeper")


class Sweeper(Periodic):
    def __init__(self, runtime: Runtime, service: InteractionService, interval: float) -> None:
        super().__init__(interval, name="interaction sweep", logger=log)
        self.runtime = runtime
        self.service = service

    async def run_once(self) -> int:
        return await self.sweep()

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
