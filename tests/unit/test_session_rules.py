"""Pure session rules: landing status, time windows, permissions, settings, the log fold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classmesh.core.errors import FailedPrecondition, PermissionDenied
from classmesh.core.eventproto import log_payload
from classmesh.core.events import EventRecord
from classmesh.core.sessionguard import check_live, check_participant, check_usable
from classmesh.events.v1 import events_pb2
from classmesh.session import convert, rules
from classmesh.session.replay import fold_session_events, seats
from classmesh.session.v1 import session_pb2

S = session_pb2
T0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
CLASS_SETTINGS = rules.default_settings("class")
ROOM_SETTINGS = rules.default_settings("study_room")


# ------------------------------------------------------------------------ landing


@pytest.mark.parametrize("role", ["student", "guest"])
def test_students_wait_in_the_lobby_of_a_live_class(role: str) -> None:
    got = rules.landing_status(
        kind="class", session_status="live", role=role, settings=CLASS_SETTINGS
    )
    assert got == "lobby"


@pytest.mark.parametrize("role", ["instructor", "assistant", "admin"])
def test_staff_are_admitted_directly(role: str) -> None:
    for status in ("scheduled", "live"):
        got = rules.landing_status(
            kind="class", session_status=status, role=role, settings=CLASS_SETTINGS
        )
        assert got == "admitted"


def test_no_lobby_admits_students_only_once_live() -> None:
    open_class = {**CLASS_SETTINGS, "lobby_enabled": False}
    live = rules.landing_status(
        kind="class", session_status="live", role="student", settings=open_class
    )
    early = rules.landing_status(
        kind="class", session_status="scheduled", role="student", settings=open_class
    )
    assert (live, early) == ("admitted", "lobby")


def test_study_rooms_admit_everyone() -> None:
    for role in ("student", "guest", "assistant"):
        got = rules.landing_status(
            kind="study_room", session_status="live", role=role, settings=ROOM_SETTINGS
        )
        assert got == "admitted"


# ------------------------------------------------------------------------ time windows


def test_start_window_is_ten_minutes() -> None:
    start = T0
    assert rules.start_too_early(start - timedelta(minutes=10, seconds=1), start)
    assert not rules.start_too_early(start - timedelta(minutes=10), start)
    assert not rules.start_too_early(start - timedelta(minutes=5), start)
    assert not rules.start_too_early(start + timedelta(hours=3), start)
    assert rules.earliest_start(start) == start - timedelta(minutes=10)


def test_join_closes_fifteen_minutes_after_the_end_for_students_only() -> None:
    end = T0
    late = end + timedelta(minutes=15, seconds=1)
    edge = end + timedelta(minutes=15)
    assert rules.join_too_late(late, kind="class", role="student", scheduled_end=end)
    assert rules.join_too_late(late, kind="class", role="guest", scheduled_end=end)
    assert not rules.join_too_late(edge, kind="class", role="student", scheduled_end=end)
    assert not rules.join_too_late(late, kind="class", role="instructor", scheduled_end=end)
    assert not rules.join_too_late(late, kind="study_room", role="student", scheduled_end=end)


def test_guest_token_expiry_is_bounded_by_ttl_and_schedule() -> None:
    now = T0
    far_end = now + timedelta(hours=5)
    assert rules.guest_token_expiry(
        now, kind="class", scheduled_end=far_end, settings=CLASS_SETTINGS
    ) == now + timedelta(hours=2)
    near_end = now + timedelta(minutes=10)
    assert rules.guest_token_expiry(
        now, kind="class", scheduled_end=near_end, settings=CLASS_SETTINGS
    ) == near_end + timedelta(minutes=15)
    short = {**CLASS_SETTINGS, "guest_token_ttl": "600s"}
    assert rules.guest_token_expiry(
        now, kind="class", scheduled_end=far_end, settings=short
    ) == now + timedelta(minutes=10)
    # Study rooms have no schedule to bound the token.
    assert rules.guest_token_expiry(
        now, kind="study_room", scheduled_end=now, settings=ROOM_SETTINGS
    ) == now + timedelta(hours=2)


# ------------------------------------------------------------------------ settings, permissions


def test_default_settings_per_kind() -> None:
    assert CLASS_SETTINGS["lobby_enabled"] and CLASS_SETTINGS["mute_on_entry"]
    assert not ROOM_SETTINGS["lobby_enabled"] and not ROOM_SETTINGS["mute_on_entry"]
    for settings in (CLASS_SETTINGS, ROOM_SETTINGS):
        proto = convert.settings_proto(settings)
        assert proto.max_breakout_rooms == 50
        assert proto.guest_token_ttl.seconds == 7200
        assert convert.settings_dict(proto) == settings


def test_explicit_settings_fill_numeric_defaults_only() -> None:
    given_settings = convert.settings_dict(S.SessionSettings(allow_guests=True))
    got = rules.normalize_settings(given_settings)
    assert got["allow_guests"] and not got["lobby_enabled"]  # an explicit message is literal
    assert got["max_breakout_rooms"] == 50 and got["guest_token_ttl"] == "7200s"


def test_default_permissions() -> None:
    instructor = rules.default_permissions("instructor", CLASS_SETTINGS)
    assert all(instructor.values()) and set(instructor) == set(convert.PERMISSION_FIELDS)
    student = rules.default_permissions("student", CLASS_SETTINGS)
    assert student["can_chat"] and student["can_publish_audio"] and student["can_subscribe"]
    assert not student["can_moderate"] and not student["can_record"]
    assert not student["can_draw"]
    quiet = {**CLASS_SETTINGS, "chat_enabled": False, "students_can_publish_video": False}
    muted = rules.default_permissions("student", quiet)
    assert not muted["can_chat"] and not muted["can_publish_video"]
    assistant = rules.default_permissions("assistant", quiet)
    assert assistant["can_moderate"] and assistant["can_chat"] and not assistant["can_record"]


def test_permissions_round_trip() -> None:
    perms = rules.default_permissions("student", CLASS_SETTINGS)
    assert convert.permissions_dict(convert.permissions_proto(perms)) == perms


# ------------------------------------------------------------------------ guard rules


def test_guard_reasons() -> None:
    check_usable("s", "live")
    check_usable("s", "scheduled")
    for status, reason in (("ended", "SESSION_ENDED"), ("cancelled", "SESSION_CANCELLED")):
        with pytest.raises(FailedPrecondition) as info:
            check_usable("s", status)
        assert info.value.reason == reason
    with pytest.raises(FailedPrecondition) as info:
        check_live("s", "scheduled")
    assert info.value.reason == "SESSION_NOT_LIVE"
    cases = [
        (None, "NOT_IN_SESSION"),
        ("left", "NOT_IN_SESSION"),
        ("removed", "PARTICIPANT_REMOVED"),
        ("lobby", "NOT_ADMITTED"),
    ]
    for status, reason in cases:
        with pytest.raises(PermissionDenied) as denied:
            check_participant("s", status)
        assert denied.value.reason == reason, status
    check_participant("s", "lobby", admitted=False)
    check_participant("s", "admitted")
    check_participant("s", "disconnected")


# ------------------------------------------------------------------------ fold


def _session(status: int) -> session_pb2.Session:
    return session_pb2.Session(id="s", status=status)


def _p(user: str, status: int) -> session_pb2.Participant:
    return session_pb2.Participant(user_id=user, status=status)


def _record(seq: int, payload: object) -> EventRecord:
    type_, body = log_payload(payload)  # type: ignore[arg-type]
    return EventRecord(
        tenant_id="00000000-0000-0000-0000-000000000001",
        session_id="00000000-0000-0000-0000-000000000002",
        seq=seq,
        type=type_,
        payload=body,
        created_at=T0 + timedelta(seconds=seq),
    )


def test_fold_rebuilds_the_str006_state() -> None:
    E = events_pb2
    log = [
        E.SessionCreated(session=_session(S.SESSION_STATUS_SCHEDULED)),
        E.SessionStarted(session=_session(S.SESSION_STATUS_LIVE)),
        E.ParticipantJoined(participant=_p("t", S.PARTICIPANT_STATUS_ADMITTED)),
        E.ParticipantJoined(participant=_p("a", S.PARTICIPANT_STATUS_LOBBY)),
        E.ParticipantJoined(participant=_p("b", S.PARTICIPANT_STATUS_LOBBY)),
        E.ParticipantAdmitted(participant=_p("a", S.PARTICIPANT_STATUS_ADMITTED)),
        E.ParticipantMuted(participant=_p("a", S.PARTICIPANT_STATUS_ADMITTED), audio=True),
        E.ParticipantRemoved(participant=_p("b", S.PARTICIPANT_STATUS_REMOVED)),
    ]
    records = [_record(i + 1, m) for i, m in enumerate(log)]
    status, roster = fold_session_events(records)
    assert (status, roster) == ("live", {"t": "admitted", "a": "admitted", "b": "removed"})
    assert seats(roster) == 2
    ended = records + [_record(9, E.SessionEnded(session=_session(S.SESSION_STATUS_ENDED)))]
    status, roster = fold_session_events(ended)
    assert (status, roster) == ("ended", {"t": "left", "a": "left", "b": "removed"})
    assert seats(roster) == 0


def test_fold_follows_presence() -> None:
    E = events_pb2
    log = [
        E.SessionCreated(session=_session(S.SESSION_STATUS_LIVE)),
        E.ParticipantJoined(participant=_p("u", S.PARTICIPANT_STATUS_ADMITTED)),
        E.ParticipantDisconnected(participant=_p("u", S.PARTICIPANT_STATUS_DISCONNECTED)),
    ]
    records = [_record(i + 1, m) for i, m in enumerate(log)]
    assert fold_session_events(records) == ("live", {"u": "disconnected"})
    back = records + [
        _record(4, E.ParticipantReconnected(participant=_p("u", S.PARTICIPANT_STATUS_ADMITTED)))
    ]
    assert fold_session_events(back)[1] == {"u": "admitted"}
    gone = records + [_record(4, E.ParticipantLeft(participant=_p("u", S.PARTICIPANT_STATUS_LEFT)))]
    assert fold_session_events(gone)[1] == {"u": "left"}
    # Typed events and records fold the same.
    from classmesh.core.eventproto import to_event

    assert fold_session_events([to_event(r) for r in gone]) == fold_session_events(gone)


def test_fold_of_nothing() -> None:
    assert fold_session_events([]) == ("", {})


_ops = st.lists(
    st.tuples(st.sampled_from(["join", "leave", "kick"]), st.integers(min_value=0, max_value=5)),
    max_size=40,
)


@given(_ops)
def test_fold_seats_match_a_simple_model(ops: list[tuple[str, int]]) -> None:
    """Random join/leave/kick sequences: the fold's seats equal the model's occupancy."""
    E = events_pb2
    model: dict[str, str] = {}
    log: list[object] = [E.SessionCreated(session=_session(S.SESSION_STATUS_LIVE))]
    for op, n in ops:
        user = f"u{n}"
        state = model.get(user)
        if op == "join" and state in (None, "left"):
            model[user] = "admitted"
            log.append(E.ParticipantJoined(participant=_p(user, S.PARTICIPANT_STATUS_ADMITTED)))
        elif op == "leave" and state == "admitted":
            model[user] = "left"
            log.append(E.ParticipantLeft(participant=_p(user, S.PARTICIPANT_STATUS_LEFT)))
        elif op == "kick" and state == "admitted":
            model[user] = "removed"
            log.append(E.ParticipantRemoved(participant=_p(user, S.PARTICIPANT_STATUS_REMOVED)))
    status, roster = fold_session_events([_record(i + 1, m) for i, m in enumerate(log)])
    assert status == "live"
    assert roster == model
    assert seats(roster) == sum(1 for v in model.values() if v == "admitted")
