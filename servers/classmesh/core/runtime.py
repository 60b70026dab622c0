"""Process-wide resources a servicer needs, built once at start-up from the Config."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import redis.asyncio as aioredis

from classmesh.core.auth import KeyStore
from classmesh.core.bus import Bus
from classmesh.core.config import Config
from classmesh.core.db import create_pool
from classmesh.core.ratelimit import RateLimiter

__all__ = ["Runtime", "open_runtime"]

log = logging.getLogger("classmesh.runtime")


@dataclass
class Runtime:
    """Shared handles: one pool, one Redis client, one bus, one limiter, one key store."""

    config: Config
    database_url: str
    redis_url: str
    pool: asyncpg.Pool
    redis: aioredis.Redis
    bus: Bus
    limiter: RateLimiter
    keys: KeyStore
    _peer_channel: grpc.aio.Channel | None = None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run `closer` first thing in `close()` (background tasks a servicer started)."""
        self._closers.append(closer)

    #: Where this process actually listens, set by the server once bound (the configured
    #: listen address may say port 0); used for peer calls unless CLASSMESH_PEER_TARGET is set.
    bound_target: str = ""

    @property
    def peer_target(self) -> str:
        return self.config.peer_target or self.bound_target or self.config.listen

    def peer_channel(self) -> grpc.aio.Channel:
        """Channel to the mesh for service-to-service calls (generated stubs only)."""
        if self._peer_channel is None:
            self._peer_channel = grpc.aio.insecure_channel(self.peer_target)
        return self._peer_channel

    async def close(self) -> None:
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                await closer()
            except Exception:  # one failing closer must not keep the pool open
                log.exception("runtime closer failed")
        if self._peer_channel is not None:
            await self._peer_channel.close()
        await self.bus.close()
        await self.redis.aclose()
        await self.pool.close()


async def open_runtime(config: Config, *, database_url: str, redis_url: str) -> Runtime:
    pool = await create_pool(database_url, max_size=config.db_pool_size)
    redis = aioredis.from_url(redis_url)
    bus = Bus(
        redis=redis, pool=pool, prefix=config.redis_prefix, queue_size=config.stream_queue_size
    )
    limiter = RateLimiter(redis, config.redis_prefix)
    keys = KeyStore(pool, leeway_seconds=config.jwt_leeway_seconds)
    return Runtime(
        config=config,
        database_url=database_url,
        redis_url=redis_url,
        pool=pool,
        redis=redis,
        bus=bus,
        limiter=limiter,
        keys=keys,
    )
