"""Rows of InteractionService -> protobuf resources (used for responses and event payloads)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format

from classmesh.common.v1 import common_pb2
from classmesh.core.eventproto import ROLES
from classmesh.core.timeutil import to_duration, to_timestamp
from classmesh.interaction import rules
from classmesh.interaction.store import (
    ChatRow,
    HandRow,
    PollRow,
    QuestionRow,
    SceneRow,
    StudioRow,
    TimerRow,
    WhiteboardRow,
)
from classmesh.interaction.v1 import interaction_pb2

__all__ = [
    "CHAT_TYPES",
    "LAYOUTS",
    "ROLES",
    "actor",
    "actor_from_dict",
    "chat_proto",
    "hand_proto",
    "poll_proto",
    "question_proto",
    "question_status",
    "results_proto",
    "scene_proto",
    "scope",
    "studio_proto",
    "timer_proto",
    "whiteboard_proto",
]

IX = interaction_pb2

CHAT_TYPES: dict[str, interaction_pb2.ChatMessageType.ValueType] = {
    "text": IX.CHAT_MESSAGE_TYPE_TEXT,
    "emoji": IX.CHAT_MESSAGE_TYPE_EMOJI,
    "system": IX.CHAT_MESSAGE_TYPE_SYSTEM,
    "poll": IX.CHAT_MESSAGE_TYPE_POLL,
}
#: Scene layouts as stored (lower-case enum names without the prefix).
LAYOUTS: dict[str, interaction_pb2.SceneLayout.ValueType] = {
    name.removeprefix("SCENE_LAYOUT_").lower(): number
    for name, number in IX.SceneLayout.items()
    if number != IX.SCENE_LAYOUT_UNSPECIFIED
}
_TIMER_STATUS = {
    "idle": IX.TIMER_STATUS_IDLE,
    "running": IX.TIMER_STATUS_RUNNING,
    "paused": IX.TIMER_STATUS_PAUSED,
    "completed": IX.TIMER_STATUS_COMPLETED,
}
_TIMER_MODES = {"focus": IX.TIMER_MODE_FOCUS, "break": IX.TIMER_MODE_BREAK}


def scope(session_id: str, room_id: str | None) -> common_pb2.Scope:
    return common_pb2.Scope(session_id=session_id, breakout_room_id=room_id or "")


def actor(
    user_id: str, name: str = "", role: str = "", participant_id: str = ""
) -> common_pb2.Actor:
    if not user_id:
        return common_pb2.Actor()
    if user_id == "system":
        return common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM)
    return common_pb2.Actor(
        user_id=user_id,
        display_name=(name or user_id)[:100],
        role=ROLES.get(role, common_pb2.ROLE_UNSPECIFIED),
        kind=common_pb2.ACTOR_KIND_USER,
        participant_id=participant_id,
    )


def actor_from_dict(value: Mapping[str, Any]) -> common_pb2.Actor:
    out = common_pb2.Actor()
    if value:
        json_format.ParseDict(dict(value), out, ignore_unknown_fields=True)
    return out


# ----------------------------------------------------------------------------- chat


def chat_proto(row: ChatRow) -> interaction_pb2.ChatMessage:
    out = IX.ChatMessage(
        id=row.id,
        scope=scope(row.session_id, row.room_id),
        sender=actor(row.user_id, row.sender_name, row.sender_role, row.sender_participant_id),
        text="" if row.deleted_at is not None else row.body,
        type=CHAT_TYPES.get(row.message_type, IX.CHAT_MESSAGE_TYPE_TEXT),
        recipient_user_id=row.recipient_user_id,
        deleted=row.deleted_at is not None,
        seq=row.seq,
    )
    out.send_time.CopyFrom(to_timestamp(row.sent_at))
    if row.deleted_at is not None:
        out.delete_time.CopyFrom(to_timestamp(row.deleted_at))
    return out


# ----------------------------------------------------------------------------- hands


def hand_proto(row: HandRow) -> interaction_pb2.HandRaise:
    if row.status == "raised":
        status = IX.HAND_RAISE_STATUS_ACTIVE
    elif row.status == "acknowledged":
        status = IX.HAND_RAISE_STATUS_ACKNOWLEDGED
    elif row.lowered_by == row.user_id:
        status = IX.HAND_RAISE_STATUS_LOWERED
    else:
        status = IX.HAND_RAISE_STATUS_DISMISSED
    out = IX.HandRaise(
        id=row.id,
        scope=scope(row.session_id, row.room_id),
        raiser=actor(row.user_id, row.raiser_name, row.raiser_role, row.raiser_participant_id),
        status=status,
        position=row.position if row.status == "raised" else 0,
    )
    out.raise_time.CopyFrom(to_timestamp(row.raised_at))
    if row.acknowledged_at is not None:
        out.acknowledge_time.CopyFrom(to_timestamp(row.acknowledged_at))
        out.acknowledged_by.CopyFrom(actor(row.acknowledged_by, row.acknowledged_by_name))
    if row.lowered_at is not None:
        out.lower_time.CopyFrom(to_timestamp(row.lowered_at))
        if status == IX.HAND_RAISE_STATUS_DISMISSED:
            out.acknowledged_by.CopyFrom(actor(row.lowered_by, row.lowered_by_name))
    return out


# ----------------------------------------------------------------------------- Q&A


def question_status(row: QuestionRow) -> interaction_pb2.QuestionStatus.ValueType:
    if row.deleted_at is not None:
        return IX.QUESTION_STATUS_DISMISSED
    if row.status == "pending":
        return IX.QUESTION_STATUS_PENDING_REVIEW
    if row.status == "rejected":
        return IX.QUESTION_STATUS_HIDDEN
    return IX.QUESTION_STATUS_ANSWERED if row.answered else IX.QUESTION_STATUS_OPEN


_VOTES = {1: IX.VOTE_UP, -1: IX.VOTE_DOWN, 0: IX.VOTE_NONE}


def question_proto(
    row: QuestionRow, *, reveal_author: bool, with_my_vote: bool = True
) -> interaction_pb2.Question:
    """`reveal_author`: show the author of an anonymous question (moderators, the author)."""
    out = IX.Question(
        id=row.id,
        scope=scope(row.session_id, row.room_id),
        anonymous=row.anonymous,
        text=row.body,
        status=question_status(row),
        pinned=row.pinned,
        upvotes=row.upvotes,
        downvotes=row.downvotes,
        score=row.score,
        my_vote=_VOTES.get(row.my_vote, IX.VOTE_NONE) if with_my_vote else IX.VOTE_UNSPECIFIED,
    )
    if not row.anonymous or reveal_author:
        out.author.CopyFrom(
            actor(row.user_id, row.author_name, row.author_role, row.author_participant_id)
        )
    else:
        out.author.kind = common_pb2.ACTOR_KIND_USER
    if row.answered and row.answered_at is not None:
        out.answer.text = row.answer_text
        out.answer.answered_live = row.answered_live
        out.answer.answerer.CopyFrom(actor(row.answered_by, row.answerer_name))
        out.answer.answer_time.CopyFrom(to_timestamp(row.answered_at))
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    return out


# ----------------------------------------------------------------------------- polls


def poll_proto(row: PollRow, *, with_selection: bool = True) -> interaction_pb2.Poll:
    out = IX.Poll(
        id=row.id,
        scope=scope(row.session_id, row.room_id),
        question=row.question,
        options=[IX.PollOption(index=i, text=t) for i, t in enumerate(row.options)],
        kind=IX.POLL_KIND_MULTIPLE_CHOICE if row.allow_multiple else IX.POLL_KIND_SINGLE_CHOICE,
        max_selections=row.max_selections,
        anonymous=row.anonymous,
        show_results_live=row.show_results_live,
        status=IX.POLL_STATUS_CLOSED if row.status == "closed" else IX.POLL_STATUS_OPEN,
        creator=actor(row.created_by, row.creator_name, row.creator_role),
        my_selection=row.my_selection if with_selection else [],
    )
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    if row.closed_at is not None:
        out.close_time.CopyFrom(to_timestamp(row.closed_at))
    if row.closes_at is not None:
        out.closes_at.CopyFrom(to_timestamp(row.closes_at))
    return out


def results_proto(
    row: PollRow, counts: Mapping[int, int], respondents: int, *, closed: bool | None = None
) -> interaction_pb2.PollResults:
    is_closed = row.status == "closed" if closed is None else closed
    return IX.PollResults(
        poll_id=row.id,
        options=[
            IX.PollOptionResult(
                index=i,
                count=counts.get(i, 0),
                fraction=round(counts.get(i, 0) / respondents, 6) if respondents else 0.0,
            )
            for i in range(len(row.options))
        ],
        respondent_count=respondents,
        status=IX.POLL_STATUS_CLOSED if is_closed else IX.POLL_STATUS_OPEN,
    )


# ----------------------------------------------------------------------------- whiteboard


def whiteboard_proto(
    session_id: str,
    room_id: str | None,
    row: WhiteboardRow | None,
    elements: Mapping[str, Any] | None = None,
) -> interaction_pb2.Whiteboard:
    out = IX.Whiteboard(scope=scope(session_id, room_id))
    if row is None:
        return out
    out.id = row.id
    out.version = row.version
    out.size_bytes = row.size_bytes
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    out.updated_by.CopyFrom(actor_from_dict(row.updated_actor))
    if elements:
        ordered = sorted(
            elements.items(),
            key=lambda kv: (int(kv[1].get("z_index", 0)), int(kv[1].get("_o", 0)), kv[0]),
        )
        for _, value in ordered:
            json_format.ParseDict(value, out.elements.add(), ignore_unknown_fields=True)
    return out


# ----------------------------------------------------------------------------- timers


def timer_proto(
    session_id: str, room_id: str | None, row: TimerRow | None
) -> interaction_pb2.StudyTimer:
    out = IX.StudyTimer(scope=scope(session_id, room_id))
    if row is None:
        out.status = IX.TIMER_STATUS_IDLE
        out.mode = IX.TIMER_MODE_FOCUS
        return out
    duration_ms = (row.duration_seconds or 0) * 1000
    out.status = _TIMER_STATUS.get(row.status, IX.TIMER_STATUS_IDLE)
    out.mode = _TIMER_MODES.get(row.mode, IX.TIMER_MODE_FOCUS)
    out.completed_focus_count = row.completed_focus_count
    if row.duration_seconds:
        out.duration.CopyFrom(to_duration(timedelta(seconds=row.duration_seconds)))
    remaining = rules.timer_remaining_ms(
        status=row.status,
        duration_ms=duration_ms,
        elapsed_ms=row.elapsed_ms,
        ends_at=row.ends_at,
        at=row.updated_at,
    )
    out.remaining.CopyFrom(to_duration(timedelta(milliseconds=remaining)))
    if row.started_at is not None and row.status != "idle":
        out.start_time.CopyFrom(to_timestamp(row.started_at))
    if row.status == "running" and row.ends_at is not None:
        out.ends_at.CopyFrom(to_timestamp(row.ends_at))
    if row.status == "paused" and row.paused_at is not None:
        out.pause_time.CopyFrom(to_timestamp(row.paused_at))
    out.updated_by.CopyFrom(actor_from_dict(row.updated_actor))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    return out


# ----------------------------------------------------------------------------- studio


def scene_proto(row: SceneRow) -> interaction_pb2.Scene:
    out = IX.Scene(
        id=row.id,
        session_id=row.session_id,
        name=row.name,
        layout=LAYOUTS.get(row.layout, IX.SCENE_LAYOUT_SPEAKER),
        slide_deck_id=row.slide_deck_id,
        slide_deck_url=row.slide_deck_url,
        slide_count=row.slide_count,
    )
    if row.metadata:
        out.metadata.update(row.metadata)
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    return out


def studio_proto(
    session_id: str, row: StudioRow | None, scene: SceneRow | None
) -> interaction_pb2.StudioState:
    out = IX.StudioState(session_id=session_id, layout=IX.SCENE_LAYOUT_SPEAKER)
    if row is None:
        return out
    if scene is not None:
        out.active_scene.CopyFrom(scene_proto(scene))
    out.layout = LAYOUTS.get(row.layout, IX.SCENE_LAYOUT_SPEAKER)
    out.slide.CopyFrom(
        IX.SlideState(
            deck_id=row.deck_id,
            slide_index=row.slide_index,
            slide_count=row.slide_count,
            slide_url=row.slide_url,
        )
    )
    out.seq = row.seq
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    out.updated_by.CopyFrom(actor_from_dict(row.updated_actor))
    return out


def iso(value: datetime) -> str:
    return value.isoformat()
