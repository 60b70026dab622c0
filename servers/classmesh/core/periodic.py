"""Background passes of a service (presence sweeps, auto-close, timers, webhook delivery)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging

__all__ = ["Periodic"]


class Periodic(abc.ABC):
    """Runs `run_once()` every `interval` seconds between `start()` and `stop()`.

    A pass that fails (a database blip) is logged once per outage and the next tick tries
    again: a background duty never dies for good. With `drain`, a pass that did work
    (returned a true value) is followed at once by the next, so a backlog is worked off
    before the loop sleeps again.
    """

    def __init__(
        self, interval: float, *, name: str, logger: logging.Logger, drain: bool = False
    ) -> None:
        self.interval = interval
        self.name = name
        self._log = logger
        self._drain = drain
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def run_once(self) -> object:
        """One pass; a true result (work done) means more may be waiting."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        busy: object = self._drain  # a draining loop starts with a pass
        while True:
            if not (self._drain and busy):
                await asyncio.sleep(self.interval)
            try:
                busy = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                if not failing:
                    self._log.exception("%s failed", self.name)
                failing, busy = True, False
            else:
                failing = False
