"""Attendance (durations), analytics counters (seed 004) and audit log entries (STR-038).

One class runs a known script with pauses of known length; GetAttendance, the analytics
and the audit log must agree with the script (durations within 1 s, seed 003 property 32)
and with the database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from google.protobuf import field_mask_pb2

from classmesh.common.v1 import common_pb2
from classmesh.session.v1 import session_pb2
from tests.e2e.test_session_lifecycle import (
    STUDY_ROOM,
    S,
    SessionMesh,
    create_session,
    db_audit,
    db_participants,
    dur,
    live_class,
    now,
    session_mesh,
    time_range,
    uid,
)


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "attendance",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


@dataclass
class Script:
    session_id: str
    teacher: str
    a: str
    b: str
    c: str
    a_join: datetime
    a_admit: datetime
    a_leave: datetime
    remove_request_id: str
    end_request_id: str


def _secs(d: object) -> float:
    return d.ToTimedelta().total_seconds()  # type: ignore[attr-defined]


def _dt(t: object) -> datetime:
    return t.ToDatetime(tzinfo=now().tzinfo)  # type: ignore[attr-defined]


async def run_attendance_script(sm: SessionMesh) -> Script:
    """Teacher + A (1 s in the lobby, 1.5 s admitted, leaves) + B (stays) + C (removed)."""
    s, teacher, inst = await live_class(sm, capacity=10)
    a, b, c = uid("a"), uid("b"), uid("c")
    ac, bc, cc = sm.as_user(a), sm.as_user(b), sm.as_user(c)
    await inst.sessions.join_session(session_id=s.id)
    a_join = now()
    await ac.sessions.join_session(session_id=s.id)
    await asyncio.sleep(1.0)
    a_admit = now()
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[a])
    await bc.sessions.join_session(session_id=s.id)
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[b])
    await asyncio.sleep(1.5)
    await ac.sessions.leave_session(session_id=s.id)
    a_leave = now()
    await cc.sessions.join_session(session_id=s.id)
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[c])
    await inst.sessions.update_participant_permissions(
        session_id=s.id,
        user_id=b,
        permissions=session_pb2.ParticipantPermissions(can_chat=False),
        update_mask=field_mask_pb2.FieldMask(paths=["permissions.can_chat"]),
    )
    remove_rid, end_rid = str(uuid.uuid4()), str(uuid.uuid4())
    await inst.sessions.remove_participant(
        session_id=s.id, user_id=c, reason="off topic", request_id=remove_rid
    )
    await asyncio.sleep(0.5)
    await inst.sessions.end_session(session_id=s.id, reason="done", request_id=end_rid)
    return Script(s.id, teacher, a, b, c, a_join, a_admit, a_leave, remove_rid, end_rid)


@pytest.fixture(scope="module")
async def script(sm: SessionMesh) -> Script:
    return await run_attendance_script(sm)


async def test_attendance_records_durations(sm: SessionMesh, script: Script) -> None:
    admin = sm.admin()
    sid = script.session_id
    got = await admin.sessions.get_attendance(session_id=sid)
    session = (await admin.sessions.get_session(session_id=sid)).session
    start, end = _dt(session.actual_start), _dt(session.actual_end)
    assert abs(_secs(got.session_duration) - (end - start).total_seconds()) < 0.01
    assert got.total_size == 4
    recs = {r.user_id: r for r in got.records}
    assert [r.user_id for r in got.records] == [script.teacher, script.a, script.b, script.c]

    a = recs[script.a]
    assert a.status == S.PARTICIPANT_STATUS_LEFT
    assert a.join_count == 1
    assert abs((_dt(a.first_join_time) - script.a_join).total_seconds()) < 1
    assert abs((_dt(a.last_leave_time) - script.a_leave).total_seconds()) < 1
    expected = (script.a_leave - script.a_admit).total_seconds()
    assert abs(_secs(a.total_connected) - expected) <= 1, _secs(a.total_connected)
    assert abs(_secs(a.lobby_wait) - 1.0) <= 0.7, _secs(a.lobby_wait)

    b = recs[script.b]
    assert b.status == S.PARTICIPANT_STATUS_LEFT  # marked left by EndSession
    assert abs((_dt(b.last_leave_time) - end).total_seconds()) < 1
    assert _secs(b.total_connected) > _secs(a.total_connected)

    c = recs[script.c]
    assert c.status == S.PARTICIPANT_STATUS_REMOVED
    assert c.HasField("last_leave_time")

    teacher = recs[script.teacher]
    assert teacher.role == common_pb2.ROLE_INSTRUCTOR
    assert _secs(teacher.lobby_wait) == 0
    duration = _secs(got.session_duration)
    for r in got.records:
        assert 0.0 <= r.attendance_ratio <= 1.0, r
        assert abs(r.attendance_ratio - _secs(r.total_connected) / duration) < 0.05, r
        assert r.join_count >= 1 and r.display_name

    # The report is what the table holds.
    rows = await db_participants(sm.pool, sid)
    for user, r in recs.items():
        assert abs(rows[user]["total_connected_seconds"] - _secs(r.total_connected)) <= 1, user
        assert rows[user]["join_count"] == r.join_count


async def test_analytics_counters(sm: SessionMesh, script: Script) -> None:
    admin = sm.admin()
    sid = script.session_id
    an = (await admin.sessions.get_session_analytics(session_id=sid)).analytics
    session = (await admin.sessions.get_session(session_id=sid)).session
    assert an.session_id == sid
    assert an.unique_participants == 4
    assert an.total_joins == 4
    assert an.total_leaves == 4  # A left, C removed, B and the teacher left at the end
    assert an.removals == 1
    assert an.peak_concurrency == 3
    assert _dt(session.actual_start) <= _dt(an.peak_time) <= _dt(session.actual_end)
    assert 0 < _secs(an.average_lobby_wait) <= 1.2
    assert _secs(an.average_connected) > 0
    # Interaction has not happened in this class.
    for name in (
        "chat_messages",
        "questions_asked",
        "questions_answered",
        "question_votes",
        "polls_created",
        "poll_responses",
        "hand_raises",
    ):
        assert getattr(an, name) == 0, name
    assert 0 <= an.engagement_score <= 100 and 0 <= an.health_score <= 100
    assert _secs(an.bucket_width) == 300
    starts = [_dt(bk.start_time) for bk in an.timeline]
    assert starts == sorted(starts) and len(starts) >= 1
    assert sum(bk.joins for bk in an.timeline) == an.total_joins
    assert sum(bk.leaves for bk in an.timeline) == an.total_leaves
    assert max(bk.concurrent_participants for bk in an.timeline) == an.peak_concurrency
    # A one-minute bucket width is honoured.
    fine = await admin.sessions.get_session_analytics(session_id=sid, bucket_width=dur(60))
    assert _secs(fine.analytics.bucket_width) == 60


async def test_audit_log_entries(sm: SessionMesh, script: Script) -> None:
    admin = sm.admin()
    sid = script.session_id
    entries = list((await admin.sessions.list_audit_logs(session_id=sid, page_size=100)).entries)
    by_action = {e.action: e for e in entries}
    assert set(by_action) >= {
        S.AUDIT_ACTION_PARTICIPANT_REMOVED,
        S.AUDIT_ACTION_PERMISSIONS_CHANGED,
        S.AUDIT_ACTION_SESSION_ENDED,
    }
    times = [_dt(e.create_time) for e in entries]
    assert times == sorted(times, reverse=True)  # newest first
    assert entries[0].action == S.AUDIT_ACTION_SESSION_ENDED

    removed = by_action[S.AUDIT_ACTION_PARTICIPANT_REMOVED]
    assert (removed.target_user_id, removed.reason) == (script.c, "off topic")
    assert removed.actor.user_id == script.teacher
    assert removed.request_id == script.remove_request_id
    assert (removed.session_id, removed.tenant_id) == (sid, sm.tenant_id)
    perms = by_action[S.AUDIT_ACTION_PERMISSIONS_CHANGED]
    assert perms.target_user_id == script.b
    ended = by_action[S.AUDIT_ACTION_SESSION_ENDED]
    assert (ended.reason, ended.request_id) == ("done", script.end_request_id)
    assert ended.actor.user_id == script.teacher

    # Filters.
    only = await admin.sessions.list_audit_logs(
        session_id=sid, actions=[S.AUDIT_ACTION_PARTICIPANT_REMOVED]
    )
    assert [e.id for e in only.entries] == [removed.id]
    by_actor = await admin.sessions.list_audit_logs(session_id=sid, actor_user_id="nobody")
    assert list(by_actor.entries) == []
    later = await admin.sessions.list_audit_logs(
        session_id=sid, time_range=time_range(_dt(ended.create_time))
    )
    assert [e.id for e in later.entries] == [ended.id]

    # The table holds the same entries.
    rows = await db_audit(sm.pool, sid)
    assert {str(r["id"]) for r in rows} == {e.id for e in entries}
    actions = {r["action"]: r for r in rows}
    assert {"participant_removed", "permissions_changed", "session_ended"} <= set(actions)
    assert actions["participant_removed"]["target_id"] == script.c
    assert actions["participant_removed"]["actor_id"] == script.teacher
    assert actions["participant_removed"]["request_id"] == script.remove_request_id


async def test_study_room_attendance_sums_visits(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=5, start_in=timedelta(0))
    user = uid("visitor")
    c = sm.as_user(user)
    total = 0.0
    for _ in range(2):
        await c.sessions.join_session(session_id=room.id)
        await asyncio.sleep(1.0)
        left = await c.sessions.leave_session(session_id=room.id)
        total += _secs(left.visit_duration)
    got = await sm.admin().sessions.get_attendance(session_id=room.id)
    rec = {r.user_id: r for r in got.records}[user]
    assert rec.join_count == 2
    assert abs(_secs(rec.total_connected) - total) <= 1
    assert 1.5 <= total <= 4
    an = (await sm.admin().sessions.get_session_analytics(session_id=room.id)).analytics
    assert (an.unique_participants, an.total_joins, an.total_leaves) == (1, 2, 2)


async def test_other_audited_actions(sm: SessionMesh) -> None:
    """Rotate link, moderator mute, cancel and delete are audited too (AuditAction)."""
    admin = sm.admin()
    s, teacher, inst = await live_class(sm)
    student = uid("muted")
    await sm.as_user(student).sessions.join_session(session_id=s.id)
    await inst.sessions.rotate_join_link(session_id=s.id)
    await inst.sessions.mute_participant(session_id=s.id, user_id=student, audio=True)
    actions = [e.action for e in (await admin.sessions.list_audit_logs(session_id=s.id)).entries]
    assert actions[:2] == [S.AUDIT_ACTION_PARTICIPANT_MUTED, S.AUDIT_ACTION_JOIN_LINK_ROTATED]
    c = await create_session(admin, instructor_id=teacher)
    await inst.sessions.cancel_session(session_id=c.id, reason="snow day")
    await admin.sessions.delete_session(session_id=c.id)
    entries = (await admin.sessions.list_audit_logs(session_id=c.id)).entries
    assert [e.action for e in entries] == [
        S.AUDIT_ACTION_SESSION_DELETED,
        S.AUDIT_ACTION_SESSION_CANCELLED,
    ]
    assert entries[1].reason == "snow day"
    assert {r["action"] for r in await db_audit(sm.pool, c.id)} == {
        "session_cancelled",
        "session_deleted",
    }


async def test_attendance_pages(sm: SessionMesh, script: Script) -> None:
    admin = sm.admin()
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.sessions.get_attendance(
            session_id=script.session_id, page_size=1, page_token=token
        )
        assert len(page.records) <= 1 and page.total_size == 4
        seen.extend(r.user_id for r in page.records)
        token = page.next_page_token
        if not token:
            break
    assert seen == [script.teacher, script.a, script.b, script.c]
