"""BreakoutService's calls to MediaService (generated stub on the peer channel).

After a breakout change commits, its `MediaPlan` runs here: `CreateRouter` for each new
room (the router id is stored on the room), `MoveParticipant` for everyone whose room
changed (main <-> breakout), `CloseRouter` for closed rooms. MediaService checks the rooms
and participants in PostgreSQL, so these calls can only follow the commit.

The calls carry a short-lived token of the breakout service itself (role admin, scoped to
the session), signed with the tenant's "classmesh breakout service" API key: a student's
own JoinBreakoutRoom, and the time-limit sweeper, need media moves they may not ask for.

A media outage never loses or blocks room state: the rooms are committed first and the RPC
answers; calls that fail UNAVAILABLE / DEADLINE_EXCEEDED (or with the breaker open) are
retried in the background (1, 2, 4, 8 s), then logged as given up; the participant's
client still follows the room through the breakout events (and MediaService's
MoveParticipant on a later change). `router_id` of a room stays empty until its router exists.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, cast

import grpc

from classmesh.breakout.service import MediaPlan
from classmesh.breakout.store import BreakoutStore
from classmesh.core.auth import AccessToken
from classmesh.core.db import connection
from classmesh.core.runtime import Runtime
from classmesh.media.v1 import media_service_pb2, media_service_pb2_grpc

__all__ = ["BreakoutMedia"]

log = logging.getLogger("classmesh.breakout.media")

SERVICE_SUBJECT = "classmesh-breakout"
TOKEN_TTL = timedelta(minutes=5)
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class BreakoutMedia:
    def __init__(self, runtime: Runtime, store: BreakoutStore | None = None) -> None:
        self._runtime = runtime
        self._store = store or BreakoutStore()
        self._background: set[asyncio.Task[Any]] = set()
        #: Media calls that failed for good (logged); the room state stands regardless.
        self.failures = 0

    def _stub(self) -> media_service_pb2_grpc.MediaServiceStub:
        return media_service_pb2_grpc.MediaServiceStub(self._runtime.peer_channel())

    async def _token(self, tenant_id: str, session_id: str) -> str:
        async with connection(self._runtime.pool) as conn:
            key_id, secret = await self._store.signing_key(conn, tenant_id)
        return (
            AccessToken(key_id, secret)
            .with_tenant(tenant_id)
            .with_identity(SERVICE_SUBJECT, "Breakout rooms")
            .with_grants(session=session_id, role="admin", caps=["moderate", "subscribe"])
            .with_ttl(TOKEN_TTL)
            .to_jwt()
        )

    async def apply(self, plan: MediaPlan) -> None:
        """Run the plan: awaited up to the media call deadline, the rest in the background."""
        if not (plan.routers or plan.moves or plan.closes):
            return
        try:
            token = await self._token(plan.tenant_id, plan.session_id)
        except Exception:  # the key lookup failing must not fail the committed change
            log.exception("breakout media token failed", extra={"session_id": plan.session_id})
            return
        meta = (("authorization", f"Bearer {token}"),)
        timeout = self._runtime.config.media_call_timeout_seconds
        stub = self._stub()

        def create(room_id: str) -> Callable[[], Awaitable[None]]:
            return lambda: _create(room_id)

        async def _create(room_id: str) -> None:
            req = media_service_pb2.CreateRouterRequest(
                request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"breakout-router:{room_id}")),
                session_id=plan.session_id,
                breakout_room_id=room_id,
            )
            resp = await cast(
                Awaitable[media_service_pb2.CreateRouterResponse],
                stub.CreateRouter(req, metadata=meta, timeout=timeout),
            )
            async with connection(self._runtime.pool) as conn:
                await self._store.set_router(conn, room_id, resp.router.id)

        def move(user_id: str, room_id: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                req = media_service_pb2.MoveParticipantRequest(
                    request_id=str(uuid.uuid4()),
                    session_id=plan.session_id,
                    user_id=user_id,
                    to_breakout_room_id=room_id,
                )
                await cast(
                    Awaitable[Any], stub.MoveParticipant(req, metadata=meta, timeout=timeout)
                )

            return run

        def close(router_id: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                req = media_service_pb2.CloseRouterRequest(
                    request_id=str(uuid.uuid4()), router_id=router_id
                )
                await cast(Awaitable[Any], stub.CloseRouter(req, metadata=meta, timeout=timeout))

            return run

        # Routers first (a move into a room would create its router anyway), then moves,
        # then closes (after the moves took everyone out).
        await self._run_all([(f"CreateRouter {r}", create(r)) for r in plan.routers])
        await self._run_all([(f"MoveParticipant {u}", move(u, r)) for u, r in plan.moves])
        await self._run_all([(f"CloseRouter {r}", close(r)) for r in plan.closes])

    async def _run_all(self, calls: list[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
        if calls:
            await asyncio.gather(*(self._once(name, call) for name, call in calls))

    async def _once(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            if err.code() in _RETRYABLE:
                self._spawn(self._retry(name, call))
            elif err.code() not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                self.failures += 1
                log.warning(
                    "breakout media call failed",
                    extra={"call": name, "code": err.code().name, "detail": err.details()},
                )

    async def _retry(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        for delay in RETRY_DELAYS:
            await asyncio.sleep(delay)
            try:
                await call()
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE:
                    break
        self.failures += 1
        log.warning("breakout media call given up", extra={"call": name})

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("breakout media retry failed")

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def run_later(self, plan: MediaPlan) -> None:
        """`apply` without waiting (the sweeper)."""
        self._spawn(self.apply(plan))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
