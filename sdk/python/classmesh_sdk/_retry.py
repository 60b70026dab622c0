"""Retry and timeout policy: one table of per-method defaults, overridable per call.

A read (`NO_SIDE_EFFECTS`) or a mutation that carries a `request_id` is safe to repeat, so
it retries on UNAVAILABLE, RESOURCE_EXHAUSTED (after the server's RetryInfo delay) and
ABORTED. Any other mutation retries only on UNAVAILABLE. The SDK fills an empty
`request_id` with a fresh UUID, so every mutation it sends is safe to retry. One deadline
spans all attempts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

__all__ = ["Retry", "DEFAULT_TIMEOUT", "SAFE_RETRY", "UNSAFE_RETRY", "NO_RETRY"]

#: Default deadline (seconds) of a unary call, across all its attempts.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with full jitter over a set of status codes."""

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 3.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff(self, attempt: int) -> float:
        """Delay before attempt number `attempt` (1-based count of failures so far)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0, cap)


SAFE_RETRY = Retry(
    codes=frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
        }
    )
)
UNSAFE_RETRY = Retry(codes=frozenset({grpc.StatusCode.UNAVAILABLE}))
NO_RETRY = Retry(attempts=1)
