"""gRPC edge of SessionService: protobuf <-> domain, the mutation wrapper, the live feed.

Rules live in service.py, SQL in store.py. Every mutating RPC goes through
`core.mutations.run_mutation` (transaction + request_id idempotency + publishing the events
the work appended, after commit).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from classmesh.common.v1 import common_pb2
from classmesh.core.auth import Principal, current_principal
from classmesh.core.db import connection
from classmesh.core.errors import PermissionDenied
from classmesh.core.feeds import event_feed
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.runtime import Runtime
from classmesh.core.timeutil import to_duration, to_timestamp
from classmesh.core.turn import mint_ice_servers
from classmesh.session import convert, rules
from classmesh.session.media import MediaClient
from classmesh.session.presence import StreamPresence, Sweeper
from classmesh.session.service import (
    TERMINAL_EVENTS,
    JoinResult,
    Result,
    SessionService,
)
from classmesh.session.store import SessionRow
from classmesh.session.v1 import (
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)

__all__ = ["SERVICER_CLASS", "SessionServicer", "create_servicer"]

R = session_service_pb2
_Ctx = grpc.aio.ServicerContext[Any, Any]
_SERVICE = "/classmesh.session.v1.SessionService/"
#: JoinSession runs without a bearer token for guests (join link); see core/server.py.
JOIN_METHOD = _SERVICE + "JoinSession"
M = TypeVar("M", bound=Message)
V = TypeVar("V")


def _authorization(context: _Ctx) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def _show_link(principal: Principal) -> bool:
    return principal.role in rules.STAFF_ROLES


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(
        self,
        runtime: Runtime,
        service: SessionService | None = None,
        media: MediaClient | None = None,
    ) -> None:
        self.runtime = runtime
        self.media = media or MediaClient(runtime)
        self.service = service or SessionService(runtime.config, media=self.media)
        self.presence = StreamPresence(runtime, self.service, self.service.touch_interval)
        self.sweeper = Sweeper(
            runtime, self.service, runtime.config.presence_sweep_interval_seconds
        )

    # ------------------------------------------------------------------ plumbing

    def start_background(self) -> None:
        self.presence.start()
        self.sweeper.start()
        self.runtime.on_close(self.stop_background)

    async def stop_background(self) -> None:
        await self.sweeper.stop()
        await self.presence.stop()
        await self.media.close()

    async def _mutate(
        self,
        principal: Principal,
        method: str,
        request: Message,
        response_type: type[M],
        run: Callable[[asyncpg.Connection], Awaitable[Result[V]]],
        build: Callable[[V], M],
    ) -> M:
        async def work(conn: asyncpg.Connection) -> Outcome[M]:
            result = await run(conn)
            return Outcome(build(result.value), result.events)

        return await run_mutation(
            self.runtime, principal, _SERVICE + method, request, response_type, work
        )

    @staticmethod
    def _session(row: SessionRow, principal: Principal) -> session_pb2.Session:
        return convert.session_proto(row, show_link=_show_link(principal))

    # ------------------------------------------------------------------ lifecycle

    async def CreateSession(
        self, request: R.CreateSessionRequest, context: _Ctx
    ) -> R.CreateSessionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CreateSession",
            request,
            R.CreateSessionResponse,
            lambda conn: self.service.create_session(conn, p, request),
            lambda row: R.CreateSessionResponse(session=self._session(row, p)),
        )

    async def GetSession(self, request: R.GetSessionRequest, context: _Ctx) -> R.GetSessionResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            row = await self.service.get_session(conn, p, request.session_id)
        return R.GetSessionResponse(session=self._session(row, p))

    async def ListSessions(
        self, request: R.ListSessionsRequest, context: _Ctx
    ) -> R.ListSessionsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            page = await self.service.list_sessions(conn, p, request)
        return R.ListSessionsResponse(
            sessions=[self._session(r, p) for r in page.items],
            next_page_token=page.next_token,
            total_size=page.total,
        )

    async def UpdateSession(
        self, request: R.UpdateSessionRequest, context: _Ctx
    ) -> R.UpdateSessionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "UpdateSession",
            request,
            R.UpdateSessionResponse,
            lambda conn: self.service.update_session(conn, p, request),
            lambda row: R.UpdateSessionResponse(session=self._session(row, p)),
        )

    async def DeleteSession(
        self, request: R.DeleteSessionRequest, context: _Ctx
    ) -> R.DeleteSessionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "DeleteSession",
            request,
            R.DeleteSessionResponse,
            lambda conn: self.service.delete_session(conn, p, request),
            lambda row: R.DeleteSessionResponse(session=self._session(row, p)),
        )

    async def RotateJoinLink(
        self, request: R.RotateJoinLinkRequest, context: _Ctx
    ) -> R.RotateJoinLinkResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "RotateJoinLink",
            request,
            R.RotateJoinLinkResponse,
            lambda conn: self.service.rotate_join_link(conn, p, request),
            lambda row: R.RotateJoinLinkResponse(session=self._session(row, p)),
        )

    async def StartSession(
        self, request: R.StartSessionRequest, context: _Ctx
    ) -> R.StartSessionResponse:
        p = current_principal()
        authorization = _authorization(context)
        return await self._mutate(
            p,
            "StartSession",
            request,
            R.StartSessionResponse,
            lambda conn: self.service.start_session(conn, p, request, authorization=authorization),
            lambda value: R.StartSessionResponse(
                session=self._session(value[0], p), router_id=value[1]
            ),
        )

    async def EndSession(self, request: R.EndSessionRequest, context: _Ctx) -> R.EndSessionResponse:
        p = current_principal()
        response = await self._mutate(
            p,
            "EndSession",
            request,
            R.EndSessionResponse,
            lambda conn: self.service.end_session(conn, p, request),
            lambda row: R.EndSessionResponse(session=self._session(row, p)),
        )
        router = await self._router_of(p, response.session.id)
        self.media.close_router(router_id=router, authorization=_authorization(context))
        return response

    async def _router_of(self, principal: Principal, session_id: str) -> str:
        async with connection(self.runtime.pool) as conn:
            row = await self.service.store.get_session(
                conn, principal.tenant_id, session_id, include_deleted=True
            )
        return row.media_router_id if row is not None else ""

    async def CancelSession(
        self, request: R.CancelSessionRequest, context: _Ctx
    ) -> R.CancelSessionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CancelSession",
            request,
            R.CancelSessionResponse,
            lambda conn: self.service.cancel_session(conn, p, request),
            lambda row: R.CancelSessionResponse(session=self._session(row, p)),
        )

    # ------------------------------------------------------------------ join / leave

    def _join_response(self, result: JoinResult, principal: Principal) -> R.JoinSessionResponse:
        cfg = self.runtime.config
        participant = convert.participant_proto(result.participant, datetime.now(UTC))
        out = R.JoinSessionResponse(
            participant=participant,
            status=participant.status,
            session=self._session(result.session, principal),
            access_token=result.access_token,
            media_hints=self.service.join_hints(result),
            reconnect_grace=to_duration(timedelta(seconds=cfg.presence_grace_seconds)),
            heartbeat_interval=to_duration(timedelta(seconds=cfg.heartbeat_interval_seconds)),
            reconnected=result.reconnected,
            last_seq=result.last_seq,
        )
        if result.access_token_expiry is not None:
            out.access_token_expire_time.CopyFrom(to_timestamp(result.access_token_expiry))
        return out

    def _with_ice_servers(self, response: R.JoinSessionResponse) -> R.JoinSessionResponse:
        """STUN/TURN for the participant, lobby or admitted: minted for every answer and
        never stored with the idempotent response, so a replay does not hand out
        credentials that may have expired since the first answer."""
        grant = mint_ice_servers(self.runtime.config, response.participant.user_id)
        response.ice_servers.extend(convert.ice_servers_proto(grant))
        if grant.has_turn:
            response.ice_servers_ttl.FromSeconds(grant.ttl_seconds)
            response.ice_servers_expire_time.FromSeconds(grant.expires_at)
        return response

    async def JoinSession(
        self, request: R.JoinSessionRequest, context: _Ctx
    ) -> R.JoinSessionResponse:
        # Public method: the interceptor verified a bearer token if one was sent.
        if request.WhichOneof("target") == "join_link_token":
            async with connection(self.runtime.pool) as conn:
                guest = await self.service.prepare_guest_join(conn, request)
            g = guest.principal
            joined = await self._mutate(
                g,
                "JoinSession",
                request,
                R.JoinSessionResponse,
                lambda conn: self.service.join(conn, g, request, guest=guest),
                lambda result: self._join_response(result, g),
            )
            return self._with_ice_servers(joined)
        p = current_principal()
        joined = await self._mutate(
            p,
            "JoinSession",
            request,
            R.JoinSessionResponse,
            lambda conn: self.service.join(conn, p, request),
            lambda result: self._join_response(result, p),
        )
        return self._with_ice_servers(joined)

    async def LeaveSession(
        self, request: R.LeaveSessionRequest, context: _Ctx
    ) -> R.LeaveSessionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "LeaveSession",
            request,
            R.LeaveSessionResponse,
            lambda conn: self.service.leave(conn, p, request),
            lambda res: R.LeaveSessionResponse(
                participant=convert.participant_proto(res.participant, datetime.now(UTC)),
                visit_duration=to_duration(timedelta(seconds=round(res.visit_seconds, 3))),
            ),
        )

    async def Heartbeat(self, request: R.HeartbeatRequest, context: _Ctx) -> R.HeartbeatResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            state = await self.service.heartbeat(conn, p, request)
        if state.needs_reconnect:
            return await self._mutate(
                p,
                "Heartbeat",
                request,
                R.HeartbeatResponse,
                lambda conn: self.service.reconnect(conn, p, request),
                self._heartbeat_response,
            )
        return self._heartbeat_response(state)

    def _heartbeat_response(self, state: Any) -> R.HeartbeatResponse:
        out = R.HeartbeatResponse(
            status=convert.PARTICIPANT_STATUSES.get(
                state.status, session_pb2.PARTICIPANT_STATUS_UNSPECIFIED
            ),
            heartbeat_interval=to_duration(
                timedelta(seconds=self.runtime.config.heartbeat_interval_seconds)
            ),
            last_seq=state.last_seq,
            session_status=convert.SESSION_STATUSES.get(
                state.session_status, session_pb2.SESSION_STATUS_UNSPECIFIED
            ),
        )
        out.presence_expire_time.CopyFrom(to_timestamp(state.expires_at))
        return out

    # ------------------------------------------------------------------ moderation

    async def AdmitParticipants(
        self, request: R.AdmitParticipantsRequest, context: _Ctx
    ) -> R.AdmitParticipantsResponse:
        p = current_principal()
        now = datetime.now(UTC)
        return await self._mutate(
            p,
            "AdmitParticipants",
            request,
            R.AdmitParticipantsResponse,
            lambda conn: self.service.admit(conn, p, request),
            lambda res: R.AdmitParticipantsResponse(
                admitted=[convert.participant_proto(a, now) for a in res.admitted],
                skipped_user_ids=res.skipped,
                current_occupancy=res.occupancy,
            ),
        )

    async def RemoveParticipant(
        self, request: R.RemoveParticipantRequest, context: _Ctx
    ) -> R.RemoveParticipantResponse:
        p = current_principal()
        response = await self._mutate(
            p,
            "RemoveParticipant",
            request,
            R.RemoveParticipantResponse,
            lambda conn: self.service.remove(conn, p, request),
            lambda row: R.RemoveParticipantResponse(
                participant=convert.participant_proto(row, datetime.now(UTC))
            ),
        )
        self.media.disconnect_participant(
            session_id=response.participant.session_id,
            user_id=response.participant.user_id,
            reason=request.reason or "removed by a moderator",
            authorization=_authorization(context),
        )
        return response

    async def MuteParticipant(
        self, request: R.MuteParticipantRequest, context: _Ctx
    ) -> R.MuteParticipantResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "MuteParticipant",
            request,
            R.MuteParticipantResponse,
            lambda conn: self.service.mute(conn, p, request, muted=True),
            lambda row: R.MuteParticipantResponse(
                participant=convert.participant_proto(row, datetime.now(UTC))
            ),
        )

    async def UnmuteParticipant(
        self, request: R.UnmuteParticipantRequest, context: _Ctx
    ) -> R.UnmuteParticipantResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "UnmuteParticipant",
            request,
            R.UnmuteParticipantResponse,
            lambda conn: self.service.mute(conn, p, request, muted=False),
            lambda row: R.UnmuteParticipantResponse(
                participant=convert.participant_proto(row, datetime.now(UTC))
            ),
        )

    async def UpdateParticipantPermissions(
        self, request: R.UpdateParticipantPermissionsRequest, context: _Ctx
    ) -> R.UpdateParticipantPermissionsResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "UpdateParticipantPermissions",
            request,
            R.UpdateParticipantPermissionsResponse,
            lambda conn: self.service.update_permissions(conn, p, request),
            lambda row: R.UpdateParticipantPermissionsResponse(
                participant=convert.participant_proto(row, datetime.now(UTC))
            ),
        )

    # ------------------------------------------------------------------ reads

    async def GetParticipant(
        self, request: R.GetParticipantRequest, context: _Ctx
    ) -> R.GetParticipantResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            row = await self.service.get_participant(conn, p, request)
        return R.GetParticipantResponse(
            participant=convert.participant_proto(row, datetime.now(UTC))
        )

    async def ListParticipants(
        self, request: R.ListParticipantsRequest, context: _Ctx
    ) -> R.ListParticipantsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            page = await self.service.list_participants(conn, p, request)
        now = datetime.now(UTC)
        return R.ListParticipantsResponse(
            participants=[convert.participant_proto(r, now) for r in page.items],
            next_page_token=page.next_token,
            total_size=page.total,
        )

    async def WatchSession(
        self, request: R.WatchSessionRequest, context: _Ctx
    ) -> AsyncIterator[R.WatchSessionResponse]:
        """Every event of the session after `after_seq`, then live.

        Ends normally after the session ends (or, for an ended session, once the log is
        replayed); ends with PERMISSION_DENIED PARTICIPANT_REMOVED right after the caller's
        own removal (a kicked user's stream closes). While it is open the caller counts as
        present (no heartbeats needed).
        """
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            plan = await self.service.plan_watch(conn, p, request)
        if plan.stop_at is not None and plan.after_seq >= plan.stop_at:
            return
        with self.presence.watching(plan.participant_id):
            async for event in event_feed(
                self.runtime,
                tenant_id=p.tenant_id,
                session_id=plan.session_id,
                after_seq=plan.after_seq,
            ):
                yield R.WatchSessionResponse(event=event)
                kind = event.WhichOneof("payload")
                if (
                    kind == "participant_removed"
                    and event.participant_removed.participant.user_id == p.subject
                ):
                    raise PermissionDenied(
                        "PARTICIPANT_REMOVED",
                        "you were removed from this session",
                        metadata={"sessionId": plan.session_id},
                    )
                if kind in TERMINAL_EVENTS:
                    return
                if plan.stop_at is not None and event.seq >= plan.stop_at:
                    return

    async def ListSessionEvents(
        self, request: R.ListSessionEventsRequest, context: _Ctx
    ) -> R.ListSessionEventsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            events, token, last = await self.service.list_events(conn, p, request)
        return R.ListSessionEventsResponse(events=events, next_page_token=token, last_seq=last)

    async def GetAttendance(
        self, request: R.GetAttendanceRequest, context: _Ctx
    ) -> R.GetAttendanceResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            report = await self.service.attendance(conn, p, request)
        records = []
        for rec in report.records:
            row = rec.participant
            out = session_pb2.AttendanceRecord(
                participant_id=row.id,
                user_id=row.user_id,
                display_name=row.display_name,
                role=convert.ROLES.get(row.role, common_pb2.ROLE_UNSPECIFIED),
                guest=row.is_guest,
                status=convert.PARTICIPANT_STATUSES.get(
                    row.status, session_pb2.PARTICIPANT_STATUS_UNSPECIFIED
                ),
                join_count=row.join_count,
                attendance_ratio=round(rec.ratio, 4),
            )
            out.first_join_time.CopyFrom(to_timestamp(row.joined_at))
            if row.status in ("left", "removed") and row.left_at is not None:
                out.last_leave_time.CopyFrom(to_timestamp(row.left_at))
            out.total_connected.CopyFrom(
                to_duration(timedelta(seconds=round(rec.connected_seconds, 3)))
            )
            out.lobby_wait.CopyFrom(to_duration(timedelta(seconds=round(rec.lobby_seconds, 3))))
            records.append(out)
        return R.GetAttendanceResponse(
            records=records,
            next_page_token=report.next_token,
            total_size=report.total,
            session_duration=to_duration(timedelta(seconds=round(report.session_seconds, 3))),
        )

    async def GetSessionAnalytics(
        self, request: R.GetSessionAnalyticsRequest, context: _Ctx
    ) -> R.GetSessionAnalyticsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            analytics = await self.service.analytics(conn, p, request)
        return R.GetSessionAnalyticsResponse(analytics=analytics)

    async def ListAuditLogs(
        self, request: R.ListAuditLogsRequest, context: _Ctx
    ) -> R.ListAuditLogsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            page = await self.service.audit_log(conn, p, request)
        return R.ListAuditLogsResponse(
            entries=[convert.audit_proto(r) for r in page.items], next_page_token=page.next_token
        )

    async def ListStudyRooms(
        self, request: R.ListStudyRoomsRequest, context: _Ctx
    ) -> R.ListStudyRoomsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            page = await self.service.list_study_rooms(conn, p, request)
        return R.ListStudyRoomsResponse(
            rooms=[convert.study_room_proto(r) for r in page.items],
            next_page_token=page.next_token,
            total_size=page.total,
        )

    async def ListStudyRoomLogs(
        self, request: R.ListStudyRoomLogsRequest, context: _Ctx
    ) -> R.ListStudyRoomLogsResponse:
        p = current_principal()
        async with connection(self.runtime.pool) as conn:
            page, seconds = await self.service.list_study_room_logs(conn, p, request)
        return R.ListStudyRoomLogsResponse(
            logs=[convert.log_proto(r) for r in page.items],
            next_page_token=page.next_token,
            total_size=page.total,
            total_duration=to_duration(timedelta(seconds=seconds)),
        )


SERVICER_CLASS = SessionServicer


def create_servicer(runtime: Runtime) -> SessionServicer:
    servicer = SessionServicer(runtime)
    servicer.start_background()
    return servicer
