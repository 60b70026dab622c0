"""Database rows <-> protobuf messages of the session API (no rules, no I/O).

Shared by the servicer (responses) and the service (typed event payloads, which embed the
same Session and Participant messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format

from classmesh.common.v1 import common_pb2
from classmesh.core.eventproto import ROLES
from classmesh.core.timeutil import to_duration, to_timestamp
from classmesh.core.turn import TurnGrant
from classmesh.media.v1 import media_pb2
from classmesh.session.store import AuditRow, LogRow, ParticipantRow, SessionRow, StudyRoomRow
from classmesh.session.v1 import session_pb2

__all__ = [
    "AUDIT_ACTIONS",
    "KINDS",
    "PARTICIPANT_STATUSES",
    "PERMISSION_FIELDS",
    "ROLES",
    "SESSION_STATUSES",
    "audit_proto",
    "ice_servers_proto",
    "log_proto",
    "participant_proto",
    "permissions_dict",
    "permissions_proto",
    "session_proto",
    "settings_dict",
    "settings_proto",
    "study_room_proto",
]

S = session_pb2

SESSION_STATUSES: dict[str, session_pb2.SessionStatus.ValueType] = {
    "scheduled": S.SESSION_STATUS_SCHEDULED,
    "live": S.SESSION_STATUS_LIVE,
    "ended": S.SESSION_STATUS_ENDED,
    "cancelled": S.SESSION_STATUS_CANCELLED,
}
KINDS: dict[str, session_pb2.SessionKind.ValueType] = {
    "class": S.SESSION_KIND_CLASS,
    "study_room": S.SESSION_KIND_STUDY_ROOM,
}
PARTICIPANT_STATUSES: dict[str, session_pb2.ParticipantStatus.ValueType] = {
    "lobby": S.PARTICIPANT_STATUS_LOBBY,
    "admitted": S.PARTICIPANT_STATUS_ADMITTED,
    "removed": S.PARTICIPANT_STATUS_REMOVED,
    "left": S.PARTICIPANT_STATUS_LEFT,
    "disconnected": S.PARTICIPANT_STATUS_DISCONNECTED,
}
#: audit_logs.action text <-> AuditAction (the enum name without its prefix, lower-cased).
AUDIT_ACTIONS: dict[str, session_pb2.AuditAction.ValueType] = {
    name.removeprefix("AUDIT_ACTION_").lower(): number
    for name, number in S.AuditAction.items()
    if number != S.AUDIT_ACTION_UNSPECIFIED
}
PERMISSION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in S.ParticipantPermissions.DESCRIPTOR.fields
)

_JSON_OPTS: dict[str, Any] = {
    "preserving_proto_field_name": True,
    "always_print_fields_with_no_presence": True,
}


def settings_dict(settings: session_pb2.SessionSettings) -> dict[str, Any]:
    """The jsonb form of the settings (protobuf JSON, every field present)."""
    return json_format.MessageToDict(settings, **_JSON_OPTS)


def settings_proto(value: Mapping[str, Any]) -> session_pb2.SessionSettings:
    out = session_pb2.SessionSettings()
    json_format.ParseDict(dict(value), out, ignore_unknown_fields=True)
    return out


def permissions_dict(perms: session_pb2.ParticipantPermissions) -> dict[str, bool]:
    return {name: bool(getattr(perms, name)) for name in PERMISSION_FIELDS}


def permissions_proto(value: Mapping[str, Any]) -> session_pb2.ParticipantPermissions:
    return session_pb2.ParticipantPermissions(
        **{name: bool(value.get(name, False)) for name in PERMISSION_FIELDS}
    )


def session_proto(row: SessionRow, *, show_link: bool) -> session_pb2.Session:
    """The Session message; the join link token only when `show_link` (staff, not events)."""
    out = session_pb2.Session(
        id=row.id,
        tenant_id=row.tenant_id,
        title=row.title,
        description=row.description,
        instructor_id=row.instructor_id,
        status=SESSION_STATUSES.get(row.status, S.SESSION_STATUS_UNSPECIFIED),
        kind=KINDS.get(row.kind, S.SESSION_KIND_UNSPECIFIED),
        capacity=row.capacity,
        recording_enabled=row.recording_enabled,
        lms_course_ref=row.lms_course_ref,
        lms_lesson_ref=row.lms_lesson_ref,
        join_link_token=row.join_link_token if show_link else "",
        settings=settings_proto(row.settings),
        current_occupancy=row.current_occupancy,
        available_spots=max(0, row.capacity - row.current_occupancy),
        lobby_count=row.lobby_count,
        last_seq=row.last_seq,
    )
    out.scheduled_start.CopyFrom(to_timestamp(row.scheduled_start))
    out.scheduled_end.CopyFrom(to_timestamp(row.scheduled_end))
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    if row.actual_start is not None:
        out.actual_start.CopyFrom(to_timestamp(row.actual_start))
    if row.actual_end is not None:
        out.actual_end.CopyFrom(to_timestamp(row.actual_end))
    if row.deleted_at is not None:
        out.delete_time.CopyFrom(to_timestamp(row.deleted_at))
    return out


def connected_seconds(row: ParticipantRow, now: datetime) -> float:
    """Connected time while admitted, including the stretch still running."""
    total = row.total_connected_ms / 1000.0
    if row.connected_since is not None:
        total += max(0.0, (now - row.connected_since).total_seconds())
    return total


def _connection_state(status: str) -> session_pb2.ConnectionState.ValueType:
    if status in ("lobby", "admitted"):
        return S.CONNECTION_STATE_CONNECTED
    if status == "disconnected":
        return S.CONNECTION_STATE_RECONNECTING
    return S.CONNECTION_STATE_DISCONNECTED


def participant_proto(row: ParticipantRow, now: datetime) -> session_pb2.Participant:
    out = session_pb2.Participant(
        id=row.id,
        session_id=row.session_id,
        user_id=row.user_id,
        display_name=row.display_name,
        role=ROLES.get(row.role, common_pb2.ROLE_UNSPECIFIED),
        status=PARTICIPANT_STATUSES.get(row.status, S.PARTICIPANT_STATUS_UNSPECIFIED),
        connection_state=_connection_state(row.status),
        audio_muted=row.audio_muted,
        video_muted=row.video_muted,
        screen_muted=row.screen_muted,
        permissions=permissions_proto(row.permissions),
        breakout_room_id=row.breakout_room_id,
        guest=row.is_guest,
        join_count=row.join_count,
        removal_reason=row.removed_reason,
        study_session_id=row.study_session_id,
        hand_raised=row.hand_raised,
        connection_id=row.connection_id,
    )
    out.joined_at.CopyFrom(to_timestamp(row.joined_at))
    if row.admitted_at is not None:
        out.admitted_at.CopyFrom(to_timestamp(row.admitted_at))
    if row.left_at is not None:
        out.left_at.CopyFrom(to_timestamp(row.left_at))
    if row.last_seen_at is not None:
        out.last_seen_at.CopyFrom(to_timestamp(row.last_seen_at))
    out.total_connected.CopyFrom(
        to_duration(timedelta(seconds=round(connected_seconds(row, now), 3)))
    )
    return out


def audit_proto(row: AuditRow) -> session_pb2.AuditLogEntry:
    out = session_pb2.AuditLogEntry(
        id=row.id,
        tenant_id=row.tenant_id,
        session_id=row.session_id,
        actor=common_pb2.Actor(
            user_id=row.actor_id,
            display_name=str(row.metadata.get("actorName", ""))[:100],
            role=ROLES.get(row.actor_role, common_pb2.ROLE_UNSPECIFIED),
            kind=common_pb2.ACTOR_KIND_SYSTEM
            if row.actor_id == "system"
            else common_pb2.ACTOR_KIND_USER,
        ),
        action=AUDIT_ACTIONS.get(row.action, S.AUDIT_ACTION_UNSPECIFIED),
        target_user_id=row.target_id if row.target_type == "user" else "",
        target_id=row.target_id if row.target_type != "user" else "",
        reason=row.reason,
        request_id=row.request_id,
    )
    out.metadata.update({k: v for k, v in row.metadata.items() if k != "actorName"})
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    return out


def log_proto(row: LogRow) -> session_pb2.StudyRoomLog:
    out = session_pb2.StudyRoomLog(
        id=row.id,
        session_id=row.session_id,
        room_name=row.room_name,
        user_id=row.user_id,
        display_name=row.display_name,
        kind=S.STUDY_ROOM_LOG_KIND_VISIT if row.kind == "visit" else S.STUDY_ROOM_LOG_KIND_TIMER,
        detail=row.detail,
        study_session_id=row.study_session_id,
    )
    out.joined_at.CopyFrom(to_timestamp(row.joined_at))
    if row.kind == "visit":
        out.left_at.CopyFrom(to_timestamp(row.left_at))
        out.duration.CopyFrom(to_duration(timedelta(seconds=row.duration_seconds)))
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    return out


def study_room_proto(row: StudyRoomRow) -> session_pb2.StudyRoom:
    return session_pb2.StudyRoom(
        session_id=row.session_id,
        name=row.name,
        capacity=row.capacity,
        current_occupancy=row.current_occupancy,
        available_spots=max(0, row.capacity - row.current_occupancy),
        status=SESSION_STATUSES.get(row.status, S.SESSION_STATUS_UNSPECIFIED),
        joined=row.joined,
    )


def ice_servers_proto(grant: TurnGrant) -> list[media_pb2.IceServer]:
    """A TurnGrant's entries as the media API's IceServer messages (same order)."""
    return [
        media_pb2.IceServer(urls=list(e.urls), username=e.username, credential=e.credential)
        for e in grant.ice_servers
    ]
