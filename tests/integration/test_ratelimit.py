"""GCRA rate limiter against real Redis: exact counts under concurrency, retry_after,
independent keys, expiry, EVALSHA fallback and failing open."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from classmesh.core.ratelimit import Decision, RateLimiter, rate_limit_key
from tests.support.redis_server import PrivateRedis, free_port


def new_key() -> str:
    return rate_limit_key(str(uuid.uuid4()), "user-1", "/classmesh.session.v1.SessionService/X")


@pytest.fixture
def limiter(redis_client: aioredis.Redis, redis_prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, redis_prefix)


@pytest.mark.parametrize("burst", [1, 10, 37])
async def test_exactly_burst_of_100_concurrent_hits(limiter: RateLimiter, burst: int) -> None:
    key = new_key()
    # One per minute: nothing is regained while the 100 hits run.
    results = await asyncio.gather(
        *(limiter.hit(key, rate_per_minute=1, burst=burst) for _ in range(100))
    )
    allowed = [d for d in results if d.allowed]
    denied = [d for d in results if not d.allowed]
    assert len(allowed) == burst
    assert sorted(d.remaining for d in allowed) == list(range(burst))
    assert all(d.retry_after > 0 and d.remaining == 0 for d in denied)


async def test_denied_then_allowed_after_retry_after(limiter: RateLimiter) -> None:
    key = new_key()
    kw = {"rate_per_minute": 600, "burst": 2}  # one unit every 0.1 s
    assert (await limiter.hit(key, **kw)).allowed
    last = await limiter.hit(key, **kw)
    assert last.allowed and last.remaining == 0 and last.retry_after > 0
    denied = await limiter.hit(key, **kw)
    assert not denied.allowed
    assert 0 < denied.retry_after <= 0.1 + 1e-6
    await asyncio.sleep(denied.retry_after + 0.05)
    again = await limiter.hit(key, **kw)
    assert again.allowed


async def test_huge_rate_never_sets_a_zero_expiry(limiter: RateLimiter) -> None:
    # At billions per minute the step rounds to 0 ms; the key must still get a valid TTL.
    key = new_key()
    for _ in range(5):
        decision = await limiter.hit(key, rate_per_minute=2_000_000_000, burst=1)
        assert decision.allowed


async def test_cost(limiter: RateLimiter) -> None:
    key = new_key()
    first = await limiter.hit(key, rate_per_minute=1, burst=5, cost=3)
    assert first == Decision(True, 2, first.retry_after) and first.retry_after == 0
    second = await limiter.hit(key, rate_per_minute=1, burst=5, cost=3)
    assert not second.allowed and second.remaining == 2 and second.retry_after > 0
    third = await limiter.hit(key, rate_per_minute=1, burst=5, cost=2)
    assert third.allowed and third.remaining == 0
    with pytest.raises(ValueError):
        await limiter.hit(key, rate_per_minute=1, burst=5, cost=6)
    with pytest.raises(ValueError):
        await limiter.hit(key, rate_per_minute=0, burst=5)


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    a, b = new_key(), new_key()
    assert [(await limiter.hit(a, rate_per_minute=1, burst=3)).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert (await limiter.hit(b, rate_per_minute=1, burst=3)).allowed
    assert (await limiter.hit(b, rate_per_minute=1, burst=3)).remaining == 1


async def test_keys_expire_on_their_own(
    limiter: RateLimiter, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    slow, fast = new_key(), new_key()
    await limiter.hit(slow, rate_per_minute=1, burst=3)
    ttl = await redis_client.pttl(f"{redis_prefix}:rl:{slow}")
    assert 0 < ttl <= 60_000  # one unit used: it matters for one interval
    await limiter.hit(fast, rate_per_minute=600, burst=3)
    stored = f"{redis_prefix}:rl:{fast}"
    assert 0 < await redis_client.pttl(stored) <= 100
    async with asyncio.timeout(5):
        while await redis_client.exists(stored):
            await asyncio.sleep(0.02)


def _client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)


async def test_fails_open_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    client = _client(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RateLimiter(client, "dead", cooldown=0.0)  # no cooldown: try Redis every time
    try:
        with caplog.at_level(logging.WARNING, logger="classmesh.core.ratelimit"):
            results = [await limiter.hit("k", rate_per_minute=1, burst=1) for _ in range(5)]
        assert all(d.allowed for d in results)
        warnings = [r for r in caplog.records if r.name == "classmesh.core.ratelimit"]
        assert len(warnings) == 1
    finally:
        await client.aclose()


async def test_script_reloaded_and_limits_resume_after_redis_restart() -> None:
    server = PrivateRedis()
    await server.start()
    client = _client(server.url)
    limiter = RateLimiter(client, "private", cooldown=0.0)
    try:
        assert (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed
        assert not (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed
        await client.script_flush()  # EVALSHA now fails with NOSCRIPT: must fall back
        assert not (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed

        await server.stop()
        assert (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed  # fail open
        await server.start()  # empty server, no script cached
        assert (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed
        assert not (await limiter.hit("k", rate_per_minute=1, burst=1)).allowed
    finally:
        await client.aclose()
        await server.stop()


def test_rate_limit_key() -> None:
    assert rate_limit_key("t", "u", "/pkg.Svc/M") == "t:u:/pkg.Svc/M"
