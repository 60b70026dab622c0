"""Rate limiting on Redis: GCRA in one atomic Lua script.

GCRA (generic cell rate algorithm) keeps one number per key, the theoretical arrival time
(TAT). With `rate_per_minute` R the emission interval is T = 60/R s; a request of `cost` c
is allowed when `TAT + c*T - burst*T <= now`, and then moves TAT forward by `c*T`.

Semantics (tested exactly):

* `burst` B is the number of unit requests allowed at once from an idle key: of N
  concurrent hits on a fresh key with a slow rate, exactly B are allowed (not B+1).
* After that, one unit is regained every T seconds; `Decision.retry_after` is the time
  until a request of the same cost would be allowed (0 when it was allowed and another one
  would be too), `Decision.remaining` the unit requests still allowed right now.
* Time comes from Redis (`TIME`), so every instance shares one clock; the script runs
  atomically, so concurrent hits from any number of instances never over-admit.
* A key lives only as long as it matters (PX = TAT - now): idle keys expire on their own.

Redis unreachable: the limiter fails open (allowed=True), logs one warning per outage and,
for `cooldown` seconds after a failure, does not even try Redis (so an outage costs no
latency per request). Limits protect the service; they must not take it down with Redis.
Other Redis errors (a script error, wrong type) are bugs and raise.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Decision", "RateLimiter", "rate_limit_key"]

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV[1] emission interval (us), ARGV[2] burst, ARGV[3] cost.
# Returns {allowed 0/1, remaining units, retry_after (us)}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - capacity
if allow_at > now then
  local remaining = math.floor((now - (tat - capacity)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, math.ceil(allow_at - now)}
end
local ttl_ms = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', ttl_ms)
local remaining = math.floor((now - allow_at) / interval)
local retry = 0
if remaining < 1 then retry = math.ceil(allow_at + interval - now) end
return {1, remaining, retry}
"""
_GCRA_SHA = hashlib.sha1(_GCRA.encode()).hexdigest()


def _command(method: object) -> Callable[..., Awaitable[Any]]:
    # The redis stubs leave eval/evalsha untyped; this is the one place we say what they are.
    return cast(Callable[..., Awaitable[Any]], method)


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of one `RateLimiter.hit`."""

    #: Whether the request may proceed.
    allowed: bool
    #: Unit requests still allowed right now after this one.
    remaining: int
    #: Seconds until a request of the same cost would be allowed (0 if it would be now).
    retry_after: float


def rate_limit_key(tenant_id: str, subject: str, method: str) -> str:
    """Bucket key for one caller (`subject`, e.g. user id) on one RPC of one tenant.

    Tenant ids (UUIDs) and gRPC method names contain no ':', so the key is unambiguous.
    """
    return f"{tenant_id}:{subject}:{method}"


class RateLimiter:
    """GCRA rate limiter whose buckets live in Redis under `<prefix>:rl:`."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        timeout: float = 0.5,
        cooldown: float = 1.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout
        self._cooldown = cooldown
        self._open_until = 0.0  # monotonic time until which Redis is not tried
        self._failing = False

    async def hit(self, key: str, *, rate_per_minute: int, burst: int, cost: int = 1) -> Decision:
        """Count one request of `cost` units against `key`."""
        if rate_per_minute < 1 or burst < 1:
            raise ValueError("rate_per_minute and burst must be >= 1")
        if not 1 <= cost <= burst:
            raise ValueError("cost must be between 1 and burst")
        if time.monotonic() < self._open_until:
            return Decision(True, burst, 0.0)
        interval_us = 60_000_000 / rate_per_minute
        args = (f"{self._prefix}:rl:{key}", f"{interval_us:.3f}", burst, cost)
        try:
            # Bounded: the client's own retries could otherwise stall a request for seconds.
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await _command(self._redis.evalsha)(_GCRA_SHA, 1, *args)
                except NoScriptError:
                    # First use on this server (or after SCRIPT FLUSH / restart); EVAL
                    # also caches it, so the next EVALSHA succeeds.
                    reply = await _command(self._redis.eval)(_GCRA, 1, *args)
        except _UNREACHABLE as exc:
            self._open_until = time.monotonic() + self._cooldown
            if not self._failing:
                self._failing = True
                log.warning(
                    "rate limiter cannot reach Redis; failing open", extra={"error": repr(exc)}
                )
            return Decision(True, burst, 0.0)
        if self._failing:
            self._failing = False
            log.info("rate limiter reached Redis again")
        allowed, remaining, retry_us = (int(v) for v in reply)
        return Decision(bool(allowed), max(0, remaining), retry_us / 1_000_000)
