"""Rows of breakout/store.py -> classmesh.breakout.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from classmesh.breakout.store import AssignmentRow, RoomRow
from classmesh.breakout.v1 import breakout_pb2
from classmesh.common.v1 import common_pb2
from classmesh.core.timeutil import to_duration, to_timestamp

__all__ = ["CLOSE_REASONS", "ROLES", "assignment_proto", "room_proto"]

B = breakout_pb2

ROLES = {
    "instructor": common_pb2.ROLE_INSTRUCTOR,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "student": common_pb2.ROLE_STUDENT,
    "guest": common_pb2.ROLE_GUEST,
    "admin": common_pb2.ROLE_ADMIN,
}
CLOSE_REASONS = {
    "manual": B.CLOSE_REASON_MANUAL,
    "time_limit": B.CLOSE_REASON_TIME_LIMIT,
    "all_closed": B.CLOSE_REASON_ALL_CLOSED,
    "session_ended": B.CLOSE_REASON_SESSION_ENDED,
}


def assignment_proto(a: AssignmentRow) -> breakout_pb2.BreakoutAssignment:
    out = B.BreakoutAssignment(
        participant_id=a.participant_id,
        user_id=a.user_id,
        display_name=a.display_name,
        role=ROLES.get(a.role, common_pb2.ROLE_UNSPECIFIED),
    )
    out.assigned_at.CopyFrom(to_timestamp(a.assigned_at))
    if a.joined_at is not None:
        out.joined_at.CopyFrom(to_timestamp(a.joined_at))
    if a.left_at is not None:
        out.left_at.CopyFrom(to_timestamp(a.left_at))
    return out


def room_proto(
    row: RoomRow, assignments: Iterable[AssignmentRow] | None = None
) -> breakout_pb2.BreakoutRoom:
    out = B.BreakoutRoom(
        id=row.id,
        session_id=row.session_id,
        name=row.name,
        capacity=row.capacity,
        status=B.BREAKOUT_ROOM_STATUS_OPEN
        if row.status == "open"
        else B.BREAKOUT_ROOM_STATUS_CLOSED,
        participant_count=row.count,
        close_reason=CLOSE_REASONS.get(row.close_reason or "", B.CLOSE_REASON_UNSPECIFIED),
        router_id=row.router_id or "",
    )
    if row.time_limit_minutes is not None:
        out.time_limit.CopyFrom(to_duration(timedelta(minutes=row.time_limit_minutes)))
    out.opened_at.CopyFrom(to_timestamp(row.opened_at))
    if row.closes_at is not None:
        out.closes_at.CopyFrom(to_timestamp(row.closes_at))
    if row.closed_at is not None:
        out.closed_at.CopyFrom(to_timestamp(row.closed_at))
    if assignments is not None:
        mine = [a for a in assignments if a.breakout_room_id == row.id]
        out.participants.extend(assignment_proto(a) for a in mine)
    return out
