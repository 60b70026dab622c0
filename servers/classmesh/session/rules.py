"""Pure rules of sessions: who lands where, default permissions and settings, time windows.

No I/O here, so every rule is unit-tested directly (tests/unit/test_session_rules.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from classmesh.session.v1 import session_pb2

__all__ = [
    "DEFAULT_CAPACITY",
    "GUEST_TTL_MAX",
    "GUEST_TTL_MIN",
    "JOIN_GRACE_AFTER_END",
    "MAX_CLASS_LENGTH",
    "MODERATOR_ROLES",
    "OWNER_ROLES",
    "SEATED",
    "START_WINDOW",
    "STAFF_ROLES",
    "default_permissions",
    "default_settings",
    "earliest_start",
    "guest_token_expiry",
    "join_too_late",
    "landing_status",
    "normalize_settings",
    "start_too_early",
]

#: Statuses that hold a seat: the lobby, admitted, and disconnected within the grace window.
SEATED = frozenset({"lobby", "admitted", "disconnected"})
#: StartSession is allowed from this long before scheduled_start (seed 000 STR-005).
START_WINDOW = timedelta(minutes=10)
#: Students and guests may join until scheduled_end plus this (seed 000 STR-003).
JOIN_GRACE_AFTER_END = timedelta(minutes=15)
#: A class is scheduled for at most this long.
MAX_CLASS_LENGTH = timedelta(hours=24)
GUEST_TTL_MIN = timedelta(minutes=5)
GUEST_TTL_MAX = timedelta(hours=2)
DEFAULT_CAPACITY = {"class": 500, "study_room": 50}
DEFAULT_MAX_BREAKOUT_ROOMS = 50
#: Token roles that may create sessions and run their lifecycle (instructors: their own).
OWNER_ROLES = ("instructor",)
#: Token roles that moderate a class (admit, remove, mute, permissions); admin passes too.
MODERATOR_ROLES = ("instructor", "assistant")
#: Roles that see staff-only data (join link token, attendance of others, audit log).
STAFF_ROLES = frozenset({"instructor", "assistant", "admin"})


def default_settings(kind: str) -> dict[str, Any]:
    """Settings of a session created without any (protobuf JSON field names)."""
    room = kind == "study_room"
    return {
        "lobby_enabled": not room,
        "allow_guests": False,
        "chat_enabled": True,
        "private_chat_enabled": False,
        "qa_enabled": True,
        "qa_moderation_required": False,
        "students_can_draw": False,
        "mute_on_entry": not room,
        "students_can_publish_video": True,
        "max_breakout_rooms": DEFAULT_MAX_BREAKOUT_ROOMS,
        "guest_token_ttl": f"{int(GUEST_TTL_MAX.total_seconds())}s",
        "audio_only_threshold": 0,
    }


def normalize_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the numeric "0 = default" fields of explicitly given settings."""
    out = dict(settings)
    if not out.get("max_breakout_rooms"):
        out["max_breakout_rooms"] = DEFAULT_MAX_BREAKOUT_ROOMS
    ttl = out.get("guest_token_ttl")
    if not ttl or ttl in ("0s", "0"):
        out["guest_token_ttl"] = f"{int(GUEST_TTL_MAX.total_seconds())}s"
    out.setdefault("audio_only_threshold", 0)
    return out


def guest_ttl(settings: Mapping[str, Any]) -> timedelta:
    raw = str(settings.get("guest_token_ttl") or "")
    try:
        seconds = float(raw.removesuffix("s")) if raw else 0.0
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        return GUEST_TTL_MAX
    return min(max(timedelta(seconds=seconds), GUEST_TTL_MIN), GUEST_TTL_MAX)


def landing_status(
    *, kind: str, session_status: str, role: str, settings: Mapping[str, Any]
) -> str:
    """Where a new visit starts: 'lobby' or 'admitted'.

    Study rooms admit everyone. Instructors, assistants and admins are admitted directly.
    Students and guests wait in the lobby while the class has not started (whatever the
    lobby setting: nobody may be in a class before it is live); once it is live they are
    admitted directly only when the lobby is switched off.
    """
    if kind == "study_room" or role in STAFF_ROLES:
        return "admitted"
    if session_status != "live":
        return "lobby"
    return "lobby" if settings.get("lobby_enabled", True) else "admitted"


def default_permissions(role: str, settings: Mapping[str, Any]) -> dict[str, bool]:
    """What a participant may do when they join (moderators may change it later)."""
    if role in ("instructor", "admin"):
        return {f.name: True for f in session_pb2.ParticipantPermissions.DESCRIPTOR.fields}
    staff = role == "assistant"
    return {
        "can_publish_audio": True,
        "can_publish_video": staff or bool(settings.get("students_can_publish_video", True)),
        "can_publish_screen": staff,
        "can_subscribe": True,
        "can_chat": staff or bool(settings.get("chat_enabled", True)),
        "can_draw": staff or bool(settings.get("students_can_draw", False)),
        "can_ask_questions": staff or bool(settings.get("qa_enabled", True)),
        "can_respond_to_polls": True,
        "can_raise_hand": True,
        "can_moderate": staff,
        "can_record": False,
        "can_manage_breakouts": staff,
        "can_present": staff,
    }


def earliest_start(scheduled_start: datetime) -> datetime:
    return scheduled_start - START_WINDOW


def start_too_early(now: datetime, scheduled_start: datetime) -> bool:
    """More than 10 minutes before scheduled_start (exactly 10 minutes is allowed)."""
    return now < earliest_start(scheduled_start)


def join_too_late(now: datetime, *, kind: str, role: str, scheduled_end: datetime) -> bool:
    """Students and guests cannot join a class after scheduled_end + 15 minutes.

    Staff may still join a class that runs over; study rooms have no schedule to miss.
    """
    if kind == "study_room" or role in STAFF_ROLES:
        return False
    return now > scheduled_end + JOIN_GRACE_AFTER_END


def guest_token_expiry(
    now: datetime, *, kind: str, scheduled_end: datetime, settings: Mapping[str, Any]
) -> datetime:
    """min(now + guest_token_ttl, scheduled_end + 15 min); study rooms only the TTL."""
    expiry = now + guest_ttl(settings)
    if kind != "study_room":
        expiry = min(expiry, scheduled_end + JOIN_GRACE_AFTER_END)
    return expiry
