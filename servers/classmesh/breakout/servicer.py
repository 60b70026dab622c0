"""gRPC edge of BreakoutService: the mutation wrapper, media after commit, the live feed,
and the time-limit sweeper.

Rules live in service.py, SQL in store.py. Every mutating RPC goes through
`core.mutations.run_mutation` (transaction + request_id idempotency + publishing the events
after commit); the change's media work (routers, moves) runs after the commit
(breakout/media.py). A replayed request_id returns the stored response and does no media
work again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from classmesh.breakout.media import BreakoutMedia
from classmesh.breakout.service import (
    BREAKOUT_TYPES,
    TERMINAL_TYPES,
    BreakoutService,
    MediaPlan,
    Result,
)
from classmesh.breakout.v1 import breakout_service_pb2, breakout_service_pb2_grpc
from classmesh.core.auth import Principal, current_principal
from classmesh.core.db import connection, transaction
from classmesh.core.events import last_seq
from classmesh.core.feeds import event_feed
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.periodic import Periodic
from classmesh.core.runtime import Runtime

__all__ = ["SERVICER_CLASS", "BreakoutServicer", "Sweeper", "create_servicer"]

log = logging.getLogger("classmesh.breakout")

R = breakout_service_pb2
_Ctx = grpc.aio.ServicerContext[Any, Any]
_SERVICE = "/classmesh.breakout.v1.BreakoutService/"
M = TypeVar("M", bound=Message)


class Sweeper(Periodic):
    """Closes rooms whose time limit ran out (and rooms of sessions no longer live), as
    the system, every `breakout_sweep_interval`. Safe with many instances: a session is
    swept under its row lock taken with SKIP LOCKED."""

    def __init__(
        self, runtime: Runtime, service: BreakoutService, media: BreakoutMedia, interval: float
    ) -> None:
        super().__init__(interval, name="breakout sweep", logger=log)
        self._runtime = runtime
        self._service = service
        self._media = media

    async def run_once(self) -> int:
        async with connection(self._runtime.pool) as conn:
            due = await self._service.store.due_sessions(conn, 100)
        closed = 0
        for tenant_id, session_id in due:
            async with transaction(self._runtime.pool) as conn:
                result = await self._service.sweep_session(conn, tenant_id, session_id)
            for record in result.events:
                await self._runtime.bus.publish(record)
            self._media.run_later(result.media)
            closed += result.value
        return closed


class BreakoutServicer(breakout_service_pb2_grpc.BreakoutServiceServicer):
    def __init__(self, runtime: Runtime, service: BreakoutService | None = None) -> None:
        self.runtime = runtime
        self.service = service or BreakoutService()
        self.media = BreakoutMedia(runtime, self.service.store)
        self.sweeper = Sweeper(
            runtime, self.service, self.media, runtime.config.breakout_sweep_interval_seconds
        )

    def start_background(self) -> None:
        self.sweeper.start()
        self.runtime.on_close(self.stop_background)

    async def stop_background(self) -> None:
        await self.sweeper.stop()
        await self.media.close()

    async def _mutate(
        self,
        principal: Principal,
        method: str,
        request: Message,
        response_type: type[M],
        run: Callable[[asyncpg.Connection], Awaitable[Result[M]]],
    ) -> M:
        plans: list[MediaPlan] = []

        async def work(conn: asyncpg.Connection) -> Outcome[M]:
            result = await run(conn)
            plans.append(result.media)
            return Outcome(result.value, result.events)

        response = await run_mutation(
            self.runtime, principal, _SERVICE + method, request, response_type, work
        )
        if plans:
            await self.media.apply(plans[-1])
        return response

    async def _routers(self, rooms: Any) -> None:
        """Fill in router ids created after the response was built (this answer only)."""
        ids = [r.id for r in rooms if not r.router_id]
        if not ids:
            return
        async with connection(self.runtime.pool) as conn:
            rows = await conn.fetch(
                "SELECT id::text AS id, router_id FROM breakout_rooms WHERE id = ANY($1::uuid[])",
                ids,
            )
        found = {r["id"]: r["router_id"] for r in rows if r["router_id"]}
        for room in rooms:
            if room.id in found:
                room.router_id = found[room.id]

    # ------------------------------------------------------------------ mutations

    async def CreateBreakoutRooms(
        self, request: R.CreateBreakoutRoomsRequest, context: _Ctx
    ) -> R.CreateBreakoutRoomsResponse:
        p = current_principal()
        out = await self._mutate(
            p,
            "CreateBreakoutRooms",
            request,
            R.CreateBreakoutRoomsResponse,
            lambda conn: self.service.create_rooms(conn, p, request),
        )
        await self._routers(out.rooms)
        return out

    async def AssignParticipants(
        self, request: R.AssignParticipantsRequest, context: _Ctx
    ) -> R.AssignParticipantsResponse:
        p = current_principal()
        out = await self._mutate(
            p,
            "AssignParticipants",
            request,
            R.AssignParticipantsResponse,
            lambda conn: self.service.assign(conn, p, request),
        )
        await self._routers([out.room])
        return out

    async def MoveParticipant(
        self, request: R.MoveParticipantRequest, context: _Ctx
    ) -> R.MoveParticipantResponse:
        p = current_principal()
        out = await self._mutate(
            p,
            "MoveParticipant",
            request,
            R.MoveParticipantResponse,
            lambda conn: self.service.move(conn, p, request),
        )
        if out.HasField("to_room"):
            await self._routers([out.to_room])
        return out

    async def JoinBreakoutRoom(
        self, request: R.JoinBreakoutRoomRequest, context: _Ctx
    ) -> R.JoinBreakoutRoomResponse:
        p = current_principal()
        out = await self._mutate(
            p,
            "JoinBreakoutRoom",
            request,
            R.JoinBreakoutRoomResponse,
            lambda conn: self.service.join(conn, p, request),
        )
        await self._routers([out.room])
        out.router_id = out.router_id or out.room.router_id
        return out

    async def LeaveBreakoutRoom(
        self, request: R.LeaveBreakoutRoomRequest, context: _Ctx
    ) -> R.LeaveBreakoutRoomResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "LeaveBreakoutRoom",
            request,
            R.LeaveBreakoutRoomResponse,
            lambda conn: self.service.leave(conn, p, request),
        )

    async def BroadcastToBreakoutRooms(
        self, request: R.BroadcastToBreakoutRoomsRequest, context: _Ctx
    ) -> R.BroadcastToBreakoutRoomsResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "BroadcastToBreakoutRooms",
            request,
            R.BroadcastToBreakoutRoomsResponse,
            lambda conn: self.service.broadcast(conn, p, request),
        )

    async def ExtendBreakoutRooms(
        self, request: R.ExtendBreakoutRoomsRequest, context: _Ctx
    ) -> R.ExtendBreakoutRoomsResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ExtendBreakoutRooms",
            request,
            R.ExtendBreakoutRoomsResponse,
            lambda conn: self.service.extend(conn, p, request),
        )

    async def CloseBreakoutRoom(
        self, request: R.CloseBreakoutRoomRequest, context: _Ctx
    ) -> R.CloseBreakoutRoomResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CloseBreakoutRoom",
            request,
            R.CloseBreakoutRoomResponse,
            lambda conn: self.service.close_room(conn, p, request),
        )

    async def CloseAllBreakoutRooms(
        self, request: R.CloseAllBreakoutRoomsRequest, context: _Ctx
    ) -> R.CloseAllBreakoutRoomsResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CloseAllBreakoutRooms",
            request,
            R.CloseAllBreakoutRoomsResponse,
            lambda conn: self.service.close_all(conn, p, request),
        )

    # ------------------------------------------------------------------ reads

    async def GetBreakoutRoom(
        self, request: R.GetBreakoutRoomRequest, context: _Ctx
    ) -> R.GetBreakoutRoomResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            room = await self.service.get_room(conn, p, request.breakout_room_id)
        return R.GetBreakoutRoomResponse(room=room)

    async def ListBreakoutRooms(
        self, request: R.ListBreakoutRoomsRequest, context: _Ctx
    ) -> R.ListBreakoutRoomsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            return await self.service.list_rooms(conn, p, request)

    async def WatchBreakoutRooms(
        self, request: R.WatchBreakoutRoomsRequest, context: _Ctx
    ) -> AsyncIterator[R.WatchBreakoutRoomsResponse]:
        """Breakout events after `after_seq`, replayed then live; ends after the session's
        end (for an ended session: once the log is replayed)."""
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            sid, over = await self.service.plan_watch(
                conn, p, request.session_id, request.after_seq
            )
        if over:
            head = await last_seq(self.runtime.pool, tenant_id=p.tenant_id, session_id=sid)
            if request.after_seq >= head:
                return
        async for event in event_feed(
            self.runtime,
            tenant_id=p.tenant_id,
            session_id=sid,
            after_seq=request.after_seq,
            types=BREAKOUT_TYPES | TERMINAL_TYPES,
        ):
            if event.WhichOneof("payload") in TERMINAL_TYPES:
                return
            yield R.WatchBreakoutRoomsResponse(event=event)


SERVICER_CLASS = BreakoutServicer


def create_servicer(runtime: Runtime) -> BreakoutServicer:
    servicer = BreakoutServicer(runtime)
    servicer.start_background()
    return servicer
