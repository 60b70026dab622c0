"""A circuit breaker (seed 000 STR-032): stop calling a failing dependency for a while.

    breaker = CircuitBreaker("media router", failures=5, window=60, reset_after=30)
    async with breaker.guard():     # Unavailable + RetryInfo while open
        await create_router()       # an exception counts as a failure

States: **closed** (calls pass; failures within the last `window` seconds are counted; the
`failures`-th opens the breaker), **open** (every call fails fast with `Unavailable`, reason
`reason`, RetryInfo = time left until half-open), **half-open** after `reset_after` seconds
(one trial call passes, others still fail fast; its success closes the breaker, its failure
opens it again for another `reset_after`). The clock is injectable for tests.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from classmesh.core.errors import ClassMeshError, Unavailable

__all__ = ["CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        window: float = 60.0,
        reset_after: float = 30.0,
        reason: str = "BACKEND_UNAVAILABLE",
        clock: Callable[[], float] = time.monotonic,
        counts: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.name = name
        self.threshold = failures
        self.window = window
        self.reset_after = reset_after
        self.reason = reason
        self.clock = clock
        #: Which exceptions are the dependency's failures (default: all but caller errors).
        self.counts = counts or (lambda exc: not isinstance(exc, ClassMeshError))
        self._failures: collections.deque[float] = collections.deque()
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if self.clock() - self._opened_at >= self.reset_after:
            return HALF_OPEN
        return OPEN

    def before(self) -> None:
        """Raise Unavailable unless a call may go through now."""
        state = self.state
        if state == CLOSED:
            return
        if state == HALF_OPEN and not self._trial:
            self._trial = True
            return
        assert self._opened_at is not None
        left = max(self._opened_at + self.reset_after - self.clock(), 0.0)
        raise Unavailable(
            self.reason,
            retry_after=left or 1.0,
            message=f"{self.name} is failing; circuit open, retry in {left or 1.0:.0f} s",
        )

    def success(self) -> None:
        self._failures.clear()
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        now = self.clock()
        if self._opened_at is not None:  # the half-open trial failed
            self._opened_at = now
            self._trial = False
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if len(self._failures) >= self.threshold:
            self._opened_at = now
            self._failures.clear()

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        self.before()
        try:
            yield
        except BaseException as exc:
            if self.counts(exc):
                self.failure()
            elif self._trial:  # a caller error proves nothing: let another trial through
                self._trial = False
            raise
        else:
            self.success()
