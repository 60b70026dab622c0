"""gRPC edge of InteractionService: protobuf <-> domain, the mutation wrapper, the live feeds.

Rules live in service.py, SQL in store.py. Every mutating RPC goes through
`core.mutations.run_mutation` (transaction + request_id idempotency + publishing the events
the work appended, after commit). Subscribe and Connect stream `core.feeds.event_feed`
(replay after `after_seq`, then live) restricted to the caller's room, and show each event
as the caller may see it (`rules.view`: private messages, moderated questions, open poll
results). Connect runs every command through the same method as its unary RPC, so it has
the same validation, permissions, limits and idempotency; a failing command answers with an
error message and the stream goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from classmesh.common.v1 import common_pb2
from classmesh.core.auth import Principal, current_principal
from classmesh.core.db import connection, transaction
from classmesh.core.errors import (
    ClassMeshError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    from_exception,
    to_rpc_status,
)
from classmesh.core.feeds import event_feed
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.ratelimit import rate_limit_key
from classmesh.core.runtime import Runtime
from classmesh.events.v1 import events_pb2
from classmesh.interaction import rules
from classmesh.interaction.service import FeedPlan, InteractionService, Result
from classmesh.interaction.sweeper import Sweeper
from classmesh.interaction.v1 import interaction_service_pb2, interaction_service_pb2_grpc

__all__ = ["InteractionServicer", "SERVICER_CLASS", "create_servicer"]

R = interaction_service_pb2
_Ctx = grpc.aio.ServicerContext[Any, Any]
_SERVICE = "/classmesh.interaction.v1.InteractionService/"
M = TypeVar("M", bound=Message)
V = TypeVar("V")

log = logging.getLogger("classmesh.interaction")

#: ConnectRequest command field -> unary RPC name (ConnectCommandResult uses the same field).
COMMANDS: dict[str, str] = {
    f.name: "".join(part.title() for part in f.name.split("_"))
    for f in R.ConnectRequest.DESCRIPTOR.oneofs_by_name["message"].fields
    if f.name not in ("subscribe", "ack")
}


def _rpc_status(err: ClassMeshError) -> common_pb2.RpcStatus:
    return common_pb2.RpcStatus.FromString(to_rpc_status(err).SerializeToString())


class InteractionServicer(interaction_service_pb2_grpc.InteractionServiceServicer):
    def __init__(self, runtime: Runtime, service: InteractionService | None = None) -> None:
        self.runtime = runtime
        self.service = service or InteractionService(runtime.config, runtime.limiter)
        self.sweeper = Sweeper(
            runtime, self.service, runtime.config.interaction_sweep_interval_seconds
        )

    # ------------------------------------------------------------------ plumbing

    def start_background(self) -> None:
        self.sweeper.start()
        self.runtime.on_close(self.sweeper.stop)

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

    async def _read(self, run: Callable[[asyncpg.Connection], Awaitable[V]]) -> V:
        async with connection(self.runtime.pool) as conn:
            return await run(conn)

    async def feed(self, principal: Principal, plan: FeedPlan) -> AsyncIterator[events_pb2.Event]:
        """The plan's events as its viewer may see them; ends after the session ends."""
        async for event in event_feed(
            self.runtime,
            tenant_id=principal.tenant_id,
            session_id=plan.session_id,
            after_seq=plan.after_seq,
            types=rules.FEED_TYPES,
            scope=plan.scope,
        ):
            kind = event.WhichOneof("payload")
            if (
                kind == "participant_removed"
                and event.participant_removed.participant.user_id == principal.subject
            ):
                raise PermissionDenied(
                    "PARTICIPANT_REMOVED",
                    "you were removed from this session",
                    metadata={"sessionId": plan.session_id},
                )
            seen = rules.view(plan.viewer, event)
            if seen is not None:
                yield seen
            if kind in rules.TERMINAL_TYPES:
                return

    # ------------------------------------------------------------------ streams

    async def Subscribe(
        self, request: R.SubscribeRequest, context: _Ctx
    ) -> AsyncIterator[R.SubscribeResponse]:
        p = current_principal()
        plan = await self._read(
            lambda conn: self.service.plan_feed(
                conn, p, request.scope, request.after_seq, request.include_session_events
            )
        )
        async for event in self.feed(p, plan):
            yield R.SubscribeResponse(event=event)

    async def Connect(
        self, request_iterator: AsyncIterator[R.ConnectRequest], context: _Ctx
    ) -> AsyncIterator[R.ConnectResponse]:
        session = _ConnectStream(self, current_principal(), context)
        async for response in session.run(request_iterator):
            yield response

    async def command(self, name: str, request: Message, context: _Ctx) -> Message:
        """Run one Connect command as its unary RPC (with the RPC's rate limit)."""
        method = COMMANDS[name]
        cfg = self.runtime.config
        p = current_principal()
        if cfg.rate_limit_per_minute > 0:
            decision = await self.runtime.limiter.hit(
                rate_limit_key(p.tenant_id, p.subject, _SERVICE + method),
                rate_per_minute=cfg.rate_limit_per_minute,
                burst=max(1, cfg.rate_limit_burst),
            )
            if not decision.allowed:
                raise ResourceExhausted(
                    "RATE_LIMITED",
                    decision.retry_after,
                    f"rate limit exceeded; retry in {decision.retry_after:.3f} s",
                    metadata={"method": _SERVICE + method},
                )
        handler: Callable[[Message, _Ctx], Awaitable[Message]] = getattr(self, method)
        return await handler(request, context)

    # ------------------------------------------------------------------ chat

    async def SendChatMessage(
        self, request: R.SendChatMessageRequest, context: _Ctx
    ) -> R.SendChatMessageResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "SendChatMessage",
            request,
            R.SendChatMessageResponse,
            lambda conn: self.service.send_chat(conn, p, request),
            lambda message: R.SendChatMessageResponse(message=message),
        )

    async def ListChatMessages(
        self, request: R.ListChatMessagesRequest, context: _Ctx
    ) -> R.ListChatMessagesResponse:
        p = current_principal()
        messages, token = await self._read(lambda conn: self.service.list_chat(conn, p, request))
        return R.ListChatMessagesResponse(messages=messages, next_page_token=token)

    async def DeleteChatMessage(
        self, request: R.DeleteChatMessageRequest, context: _Ctx
    ) -> R.DeleteChatMessageResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "DeleteChatMessage",
            request,
            R.DeleteChatMessageResponse,
            lambda conn: self.service.delete_chat(conn, p, request),
            lambda message: R.DeleteChatMessageResponse(message=message),
        )

    # ------------------------------------------------------------------ hand raise

    async def RaiseHand(self, request: R.RaiseHandRequest, context: _Ctx) -> R.RaiseHandResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "RaiseHand",
            request,
            R.RaiseHandResponse,
            lambda conn: self.service.raise_hand(conn, p, request),
            lambda hand: R.RaiseHandResponse(hand_raise=hand),
        )

    async def LowerHand(self, request: R.LowerHandRequest, context: _Ctx) -> R.LowerHandResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "LowerHand",
            request,
            R.LowerHandResponse,
            lambda conn: self.service.lower_hand(conn, p, request),
            lambda hand: R.LowerHandResponse(hand_raise=hand),
        )

    async def AcknowledgeHand(
        self, request: R.AcknowledgeHandRequest, context: _Ctx
    ) -> R.AcknowledgeHandResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "AcknowledgeHand",
            request,
            R.AcknowledgeHandResponse,
            lambda conn: self.service.acknowledge_hand(conn, p, request),
            lambda hand: R.AcknowledgeHandResponse(hand_raise=hand),
        )

    async def ListRaisedHands(
        self, request: R.ListRaisedHandsRequest, context: _Ctx
    ) -> R.ListRaisedHandsResponse:
        p = current_principal()
        hands, token, active = await self._read(
            lambda conn: self.service.list_hands(conn, p, request)
        )
        return R.ListRaisedHandsResponse(
            hand_raises=hands, next_page_token=token, active_count=active
        )

    # ------------------------------------------------------------------ Q&A

    async def AskQuestion(
        self, request: R.AskQuestionRequest, context: _Ctx
    ) -> R.AskQuestionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "AskQuestion",
            request,
            R.AskQuestionResponse,
            lambda conn: self.service.ask(conn, p, request),
            lambda q: R.AskQuestionResponse(question=q),
        )

    async def VoteQuestion(
        self, request: R.VoteQuestionRequest, context: _Ctx
    ) -> R.VoteQuestionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "VoteQuestion",
            request,
            R.VoteQuestionResponse,
            lambda conn: self.service.vote(conn, p, request),
            lambda q: R.VoteQuestionResponse(question=q),
        )

    async def AnswerQuestion(
        self, request: R.AnswerQuestionRequest, context: _Ctx
    ) -> R.AnswerQuestionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "AnswerQuestion",
            request,
            R.AnswerQuestionResponse,
            lambda conn: self.service.answer(conn, p, request),
            lambda q: R.AnswerQuestionResponse(question=q),
        )

    async def ModerateQuestion(
        self, request: R.ModerateQuestionRequest, context: _Ctx
    ) -> R.ModerateQuestionResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ModerateQuestion",
            request,
            R.ModerateQuestionResponse,
            lambda conn: self.service.moderate(conn, p, request),
            lambda q: R.ModerateQuestionResponse(question=q),
        )

    async def GetQuestion(
        self, request: R.GetQuestionRequest, context: _Ctx
    ) -> R.GetQuestionResponse:
        p = current_principal()
        q = await self._read(lambda conn: self.service.get_question(conn, p, request))
        return R.GetQuestionResponse(question=q)

    async def ListQuestions(
        self, request: R.ListQuestionsRequest, context: _Ctx
    ) -> R.ListQuestionsResponse:
        p = current_principal()
        questions, token, total = await self._read(
            lambda conn: self.service.list_questions(conn, p, request)
        )
        return R.ListQuestionsResponse(questions=questions, next_page_token=token, total_size=total)

    # ------------------------------------------------------------------ polls

    async def CreatePoll(self, request: R.CreatePollRequest, context: _Ctx) -> R.CreatePollResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CreatePoll",
            request,
            R.CreatePollResponse,
            lambda conn: self.service.create_poll(conn, p, request),
            lambda poll: R.CreatePollResponse(poll=poll),
        )

    async def RespondToPoll(
        self, request: R.RespondToPollRequest, context: _Ctx
    ) -> R.RespondToPollResponse:
        p = current_principal()

        def build(value: Any) -> R.RespondToPollResponse:
            poll, results = value
            out = R.RespondToPollResponse(poll=poll)
            if results is not None:
                out.results.CopyFrom(results)
            return out

        return await self._mutate(
            p,
            "RespondToPoll",
            request,
            R.RespondToPollResponse,
            lambda conn: self.service.respond(conn, p, request),
            build,
        )

    async def ClosePoll(self, request: R.ClosePollRequest, context: _Ctx) -> R.ClosePollResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ClosePoll",
            request,
            R.ClosePollResponse,
            lambda conn: self.service.close_poll(conn, p, request),
            lambda value: R.ClosePollResponse(poll=value[0], results=value[1]),
        )

    async def GetPoll(self, request: R.GetPollRequest, context: _Ctx) -> R.GetPollResponse:
        p = current_principal()
        poll = await self._read(lambda conn: self.service.get_poll(conn, p, request))
        return R.GetPollResponse(poll=poll)

    async def GetPollResults(
        self, request: R.GetPollResultsRequest, context: _Ctx
    ) -> R.GetPollResultsResponse:
        p = current_principal()
        results = await self._read(lambda conn: self.service.poll_results(conn, p, request))
        return R.GetPollResultsResponse(results=results)

    async def ListPolls(self, request: R.ListPollsRequest, context: _Ctx) -> R.ListPollsResponse:
        p = current_principal()
        polls, token = await self._read(lambda conn: self.service.list_polls(conn, p, request))
        return R.ListPollsResponse(polls=polls, next_page_token=token)

    # ------------------------------------------------------------------ whiteboard

    async def GetWhiteboard(
        self, request: R.GetWhiteboardRequest, context: _Ctx
    ) -> R.GetWhiteboardResponse:
        p = current_principal()
        # One snapshot: the seq returned is exactly what the board reflects.
        async with transaction(self.runtime.pool, isolation="repeatable_read") as conn:
            board, seq = await self.service.get_whiteboard(conn, p, request)
        return R.GetWhiteboardResponse(whiteboard=board, seq=seq)

    async def UpdateWhiteboard(
        self, request: R.UpdateWhiteboardRequest, context: _Ctx
    ) -> R.UpdateWhiteboardResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "UpdateWhiteboard",
            request,
            R.UpdateWhiteboardResponse,
            lambda conn: self.service.update_whiteboard(conn, p, request),
            lambda value: R.UpdateWhiteboardResponse(version=value[0], size_bytes=value[1]),
        )

    async def ClearWhiteboard(
        self, request: R.ClearWhiteboardRequest, context: _Ctx
    ) -> R.ClearWhiteboardResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ClearWhiteboard",
            request,
            R.ClearWhiteboardResponse,
            lambda conn: self.service.clear_whiteboard(conn, p, request),
            lambda board: R.ClearWhiteboardResponse(whiteboard=board),
        )

    # ------------------------------------------------------------------ timers

    async def StartTimer(self, request: R.StartTimerRequest, context: _Ctx) -> R.StartTimerResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "StartTimer",
            request,
            R.StartTimerResponse,
            lambda conn: self.service.start_timer(conn, p, request),
            lambda timer: R.StartTimerResponse(timer=timer),
        )

    async def PauseTimer(self, request: R.PauseTimerRequest, context: _Ctx) -> R.PauseTimerResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "PauseTimer",
            request,
            R.PauseTimerResponse,
            lambda conn: self.service.pause_timer(conn, p, request),
            lambda timer: R.PauseTimerResponse(timer=timer),
        )

    async def ResumeTimer(
        self, request: R.ResumeTimerRequest, context: _Ctx
    ) -> R.ResumeTimerResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ResumeTimer",
            request,
            R.ResumeTimerResponse,
            lambda conn: self.service.resume_timer(conn, p, request),
            lambda timer: R.ResumeTimerResponse(timer=timer),
        )

    async def CompleteTimer(
        self, request: R.CompleteTimerRequest, context: _Ctx
    ) -> R.CompleteTimerResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CompleteTimer",
            request,
            R.CompleteTimerResponse,
            lambda conn: self.service.complete_timer(conn, p, request),
            lambda timer: R.CompleteTimerResponse(timer=timer),
        )

    async def ResetTimer(self, request: R.ResetTimerRequest, context: _Ctx) -> R.ResetTimerResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ResetTimer",
            request,
            R.ResetTimerResponse,
            lambda conn: self.service.reset_timer(conn, p, request),
            lambda timer: R.ResetTimerResponse(timer=timer),
        )

    async def GetTimer(self, request: R.GetTimerRequest, context: _Ctx) -> R.GetTimerResponse:
        p = current_principal()
        timer = await self._read(lambda conn: self.service.get_timer(conn, p, request))
        return R.GetTimerResponse(timer=timer)

    # ------------------------------------------------------------------ studio

    async def CreateScene(
        self, request: R.CreateSceneRequest, context: _Ctx
    ) -> R.CreateSceneResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "CreateScene",
            request,
            R.CreateSceneResponse,
            lambda conn: self.service.create_scene(conn, p, request),
            lambda scene: R.CreateSceneResponse(scene=scene),
        )

    async def UpdateScene(
        self, request: R.UpdateSceneRequest, context: _Ctx
    ) -> R.UpdateSceneResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "UpdateScene",
            request,
            R.UpdateSceneResponse,
            lambda conn: self.service.update_scene(conn, p, request),
            lambda scene: R.UpdateSceneResponse(scene=scene),
        )

    async def DeleteScene(
        self, request: R.DeleteSceneRequest, context: _Ctx
    ) -> R.DeleteSceneResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "DeleteScene",
            request,
            R.DeleteSceneResponse,
            lambda conn: self.service.delete_scene(conn, p, request),
            lambda scene_id: R.DeleteSceneResponse(scene_id=scene_id),
        )

    async def ListScenes(self, request: R.ListScenesRequest, context: _Ctx) -> R.ListScenesResponse:
        p = current_principal()
        scenes, token = await self._read(lambda conn: self.service.list_scenes(conn, p, request))
        return R.ListScenesResponse(scenes=scenes, next_page_token=token)

    async def SetScene(self, request: R.SetSceneRequest, context: _Ctx) -> R.SetSceneResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "SetScene",
            request,
            R.SetSceneResponse,
            lambda conn: self.service.set_scene(conn, p, request),
            lambda studio: R.SetSceneResponse(studio=studio),
        )

    async def ChangeSlide(
        self, request: R.ChangeSlideRequest, context: _Ctx
    ) -> R.ChangeSlideResponse:
        p = current_principal()
        return await self._mutate(
            p,
            "ChangeSlide",
            request,
            R.ChangeSlideResponse,
            lambda conn: self.service.change_slide(conn, p, request),
            lambda studio: R.ChangeSlideResponse(studio=studio),
        )

    async def GetStudioState(
        self, request: R.GetStudioStateRequest, context: _Ctx
    ) -> R.GetStudioStateResponse:
        p = current_principal()
        studio = await self._read(lambda conn: self.service.studio_state(conn, p, request))
        return R.GetStudioStateResponse(studio=studio)


class _ConnectStream:
    """One Connect call: commands read in order, the event feed beside them, one writer.

    Everything the client gets goes through `out` (None ends the call). The feed stops
    sending while `connect_max_unacked` events are unacknowledged; a client that does not
    ack within `connect_ack_wait_seconds` gets SLOW_CONSUMER and the call ends (resume with
    after_seq = the last seq it processed).
    """

    def __init__(self, servicer: InteractionServicer, principal: Principal, context: _Ctx):
        self.servicer = servicer
        self.principal = principal
        self.context = context
        # None ends the stream; a ClassMeshError ends it with that status.
        self.out: asyncio.Queue[R.ConnectResponse | ClassMeshError | None] = asyncio.Queue()
        self.feed_task: asyncio.Task[None] | None = None
        self.unacked: collections.deque[int] = collections.deque()
        self.acked = asyncio.Event()
        #: The client's last acknowledged seq (the subscription's after_seq at first).
        self.last_acked = 0
        self.max_unacked = servicer.runtime.config.connect_max_unacked
        self.ack_wait = servicer.runtime.config.connect_ack_wait_seconds

    async def run(
        self, requests: AsyncIterator[R.ConnectRequest]
    ) -> AsyncIterator[R.ConnectResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self.out.get()
                if item is None:
                    return
                if isinstance(item, ClassMeshError):
                    raise item
                yield item
        finally:
            tasks = [t for t in (reader, self.feed_task) if t is not None]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    def _error(self, request_id: str, exc: BaseException) -> R.ConnectResponse:
        err = from_exception(exc)
        if isinstance(err, Internal):
            log.error(
                "Connect command failed",
                exc_info=exc,
                extra={"correlation_id": err.correlation_id, "request_id": request_id},
            )
        return R.ConnectResponse(request_id=request_id, error=_rpc_status(err))

    async def _read(self, requests: AsyncIterator[R.ConnectRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(request)
        except asyncio.CancelledError:
            raise
        except ClassMeshError as err:  # a request that is not a ConnectRequest at all
            self.out.put_nowait(err)
            return
        except Exception:  # the client went away mid-read: nothing left to answer
            log.debug("Connect request stream ended", exc_info=True)
            self.out.put_nowait(None)
            return
        if self.feed_task is None or self.feed_task.done():
            self.out.put_nowait(None)

    async def _handle(self, request: R.ConnectRequest) -> None:
        kind = request.WhichOneof("message")
        if kind == "ack":
            seq = request.ack.seq
            self.last_acked = max(self.last_acked, seq)
            while self.unacked and self.unacked[0] <= seq:
                self.unacked.popleft()
            self.acked.set()
            return
        if kind == "subscribe":
            await self._subscribe(request.subscribe)
            return
        if kind is None:
            self.out.put_nowait(
                self._error(
                    "",
                    InvalidArgument([("message", "one of subscribe, ack or a command is set")]),
                )
            )
            return
        command = getattr(request, kind)
        request_id: str = getattr(command, "request_id", "")
        try:
            response = await self.servicer.command(kind, command, self.context)
        except Exception as exc:
            self.out.put_nowait(self._error(request_id, exc))
            return
        result = R.ConnectCommandResult()
        getattr(result, kind).CopyFrom(response)
        self.out.put_nowait(R.ConnectResponse(request_id=request_id, result=result))

    async def _subscribe(self, sub: R.ConnectSubscribe) -> None:
        try:
            plan = await self.servicer._read(
                lambda conn: self.servicer.service.plan_feed(
                    conn, self.principal, sub.scope, sub.after_seq, sub.include_session_events
                )
            )
        except Exception as exc:
            self.out.put_nowait(self._error("", exc))
            return
        if self.feed_task is not None:
            self.feed_task.cancel()
            with contextlib.suppress(BaseException):
                await self.feed_task
        self.unacked.clear()
        self.last_acked = plan.after_seq
        self.feed_task = asyncio.create_task(self._feed(plan))

    async def _feed(self, plan: FeedPlan) -> None:
        try:
            async for event in self.servicer.feed(self.principal, plan):
                while len(self.unacked) >= self.max_unacked:
                    self.acked.clear()
                    try:
                        async with asyncio.timeout(self.ack_wait):
                            await self.acked.wait()
                    except TimeoutError:
                        raise ResourceExhausted(
                            "SLOW_CONSUMER",
                            1.0,
                            f"{self.max_unacked} events unacknowledged; resume with "
                            f"after_seq = {self.last_acked} (the last acknowledged)",
                            metadata={"afterSeq": str(self.last_acked)},
                        ) from None
                self.unacked.append(event.seq)
                self.out.put_nowait(R.ConnectResponse(event=event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.out.put_nowait(self._error("", exc))
        self.out.put_nowait(None)


SERVICER_CLASS = InteractionServicer


def create_servicer(runtime: Runtime) -> InteractionServicer:
    servicer = InteractionServicer(runtime)
    servicer.start_background()
    return servicer
