"""Every error row of seed 000 STR-003 and STR-005, validation, and the auth/role matrix.

Each case asserts the gRPC code, `ErrorInfo.reason` (domain classmesh.dev; the code each
reason travels with is the one its `ErrorReason` comment names), and that the database did
not change. Rows (seed 000):

STR-003  session not found (404)            NOT_FOUND            NOT_FOUND
         join link expired (403)            FAILED_PRECONDITION  TOO_LATE
         capacity exceeded (403)            RESOURCE_EXHAUSTED   SESSION_FULL + RetryInfo
         invalid status transition (400)    FAILED_PRECONDITION  (state unchanged)
STR-005  start > 10 min early (403)         FAILED_PRECONDITION  TOO_EARLY
         start already-live (409)           ABORTED              SESSION_ALREADY_LIVE
         join ended session (403)           FAILED_PRECONDITION  SESSION_ENDED
         admit non-existent student (404)   OK, skipped and reported
         remove last instructor (400)       FAILED_PRECONDITION  LAST_INSTRUCTOR
         SFU unavailable (503, retry 30 s)  UNAVAILABLE          MEDIA_UNAVAILABLE + RetryInfo
"""

from __future__ import annotations

import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from classmesh.common.v1 import common_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError
from tests.e2e.test_session_lifecycle import (
    CLASS,
    STUDY_ROOM,
    Code,
    S,
    SessionMesh,
    create_session,
    db_event_types,
    db_participants,
    db_session,
    dur,
    expect_error,
    live_class,
    now,
    session_mesh,
    time_range,
    ts,
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
        "errors",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


GUESTS = session_pb2.SessionSettings(lobby_enabled=True, allow_guests=True, chat_enabled=True)


async def _session_count(sm: SessionMesh) -> int:
    return int(await sm.pool.fetchval("SELECT count(*) FROM sessions"))


# ============================================================================ STR-003


async def test_str003_session_not_found(sm: SessionMesh) -> None:
    admin = sm.admin()
    ghost = str(uuid.uuid4())
    for call in (
        admin.sessions.get_session(session_id=ghost, retry=NO_RETRY),
        admin.sessions.start_session(session_id=ghost, retry=NO_RETRY),
        admin.sessions.end_session(session_id=ghost, retry=NO_RETRY),
        admin.sessions.join_session(session_id=ghost, retry=NO_RETRY),
        admin.sessions.list_participants(session_id=ghost, retry=NO_RETRY),
        admin.sessions.admit_participants(session_id=ghost, all=True, retry=NO_RETRY),
    ):
        await expect_error(call, Code.NOT_FOUND, "NOT_FOUND")
    # A soft-deleted session is gone too.
    s = await create_session(admin, instructor_id=uid("teacher"))
    await admin.sessions.delete_session(session_id=s.id)
    await expect_error(
        admin.sessions.get_session(session_id=s.id, retry=NO_RETRY), Code.NOT_FOUND, "NOT_FOUND"
    )
    assert (await db_session(sm.pool, s.id))["deleted_at"] is not None


async def test_str003_other_tenants_session_is_not_found(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    key = await sm.other_tenant()
    stranger = sm.client(sm.token("admin-b", "admin", key=key))
    for call in (
        stranger.sessions.get_session(session_id=s.id, retry=NO_RETRY),
        stranger.sessions.join_session(session_id=s.id, retry=NO_RETRY),
        stranger.sessions.end_session(session_id=s.id, retry=NO_RETRY),
        stranger.sessions.list_session_events(session_id=s.id, retry=NO_RETRY),
        stranger.sessions.list_participants(session_id=s.id, retry=NO_RETRY),
    ):
        await expect_error(call, Code.NOT_FOUND, "NOT_FOUND")
    assert (await db_session(sm.pool, s.id))["status"] == "live"
    listed = await stranger.sessions.list_sessions(page_size=100)
    assert s.id not in {x.id for x in listed.sessions}


async def test_str003_join_link_expired_is_too_late(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, settings=GUESTS)
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    anon = sm.client(None)
    # 14 minutes after scheduled_end the link still works ...
    await sm.pool.execute(
        "UPDATE sessions SET scheduled_start = now() - interval '2 hours', "
        "scheduled_end = now() - interval '14 minutes' WHERE id = $1",
        uuid.UUID(s.id),
    )
    ok = await anon.sessions.join_session(join_link_token=link, display_name="Early Guest")
    assert ok.access_token
    # ... 16 minutes after it, it does not.
    await sm.pool.execute(
        "UPDATE sessions SET scheduled_end = now() - interval '16 minutes' WHERE id = $1",
        uuid.UUID(s.id),
    )
    before = await db_participants(sm.pool, s.id)
    await expect_error(
        anon.sessions.join_session(join_link_token=link, display_name="Late Guest", retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "TOO_LATE",
    )
    assert await db_participants(sm.pool, s.id) == before


async def test_str003_capacity_exceeded_is_session_full(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=2)
    a, b, c = uid("student"), uid("student"), uid("student")
    await sm.as_user(a).sessions.join_session(session_id=s.id)
    await sm.as_user(b).sessions.join_session(session_id=s.id)
    err = await expect_error(
        sm.as_user(c).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "SESSION_FULL",
    )
    assert err.retry_after is not None and err.retry_after > 0
    rows = await db_participants(sm.pool, s.id)
    assert c not in rows and set(rows) == {a, b}
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 2
    got = (await inst.sessions.get_session(session_id=s.id)).session
    assert (got.current_occupancy, got.available_spots) == (2, 0)
    # Staff are admitted directly but need a seat too.
    await expect_error(
        inst.sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "SESSION_FULL",
    )


async def test_str003_invalid_status_transitions_leave_state_unchanged(sm: SessionMesh) -> None:
    admin = sm.admin()
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    scheduled = await create_session(admin, instructor_id=teacher, start_in=timedelta(minutes=1))
    live, _, _ = await live_class(sm, instructor=teacher)
    ended, _, _ = await live_class(sm, instructor=teacher)
    await inst.sessions.end_session(session_id=ended.id)
    cancelled = await create_session(admin, instructor_id=teacher)
    await inst.sessions.cancel_session(session_id=cancelled.id)

    cases: list[tuple[str, Any, set[str]]] = [
        (
            scheduled.id,
            inst.sessions.end_session(session_id=scheduled.id, retry=NO_RETRY),
            {"SESSION_NOT_LIVE"},
        ),
        (
            live.id,
            inst.sessions.cancel_session(session_id=live.id, retry=NO_RETRY),
            {"INVALID_STATE_TRANSITION"},
        ),
        (
            live.id,
            admin.sessions.delete_session(session_id=live.id, retry=NO_RETRY),
            {"INVALID_STATE_TRANSITION"},
        ),
        (
            ended.id,
            inst.sessions.start_session(session_id=ended.id, retry=NO_RETRY),
            {"SESSION_ENDED"},
        ),
        (
            ended.id,
            inst.sessions.end_session(session_id=ended.id, retry=NO_RETRY),
            {"SESSION_ENDED"},
        ),
        (
            cancelled.id,
            inst.sessions.start_session(session_id=cancelled.id, retry=NO_RETRY),
            {"SESSION_CANCELLED"},
        ),
    ]
    for sid, call, reasons in cases:
        before = dict(await db_session(sm.pool, sid))
        types = await db_event_types(sm.pool, sid)
        await expect_error(call, Code.FAILED_PRECONDITION, reasons)
        after = dict(await db_session(sm.pool, sid))
        assert after == before, sid
        assert await db_event_types(sm.pool, sid) == types


# ============================================================================ STR-005


async def test_str005_start_more_than_ten_minutes_early(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    s = await create_session(inst, start_in=timedelta(minutes=10, seconds=40))
    await expect_error(
        inst.sessions.start_session(session_id=s.id, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "TOO_EARLY",
    )
    assert (await db_session(sm.pool, s.id))["status"] == "scheduled"


async def test_str005_start_already_live(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    s = await create_session(inst, start_in=timedelta(minutes=2))
    rid = str(uuid.uuid4())
    first = await inst.sessions.start_session(session_id=s.id, request_id=rid)
    row = await db_session(sm.pool, s.id)
    # Same request_id: the identical first response, nothing changes.
    again = await inst.sessions.start_session(session_id=s.id, request_id=rid)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    # Another request_id: SESSION_ALREADY_LIVE with the code its ErrorReason comment names,
    # carrying the current state (STR-005: "return current session state").
    err = await expect_error(
        inst.sessions.start_session(session_id=s.id, retry=NO_RETRY),
        Code.ABORTED,
        "SESSION_ALREADY_LIVE",
    )
    assert err.metadata.get("status") == "SESSION_STATUS_LIVE", err.metadata
    assert dict(await db_session(sm.pool, s.id)) == dict(row)
    assert (await db_event_types(sm.pool, s.id)).count("session_started") == 1


async def test_str005_join_ended_session(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, settings=GUESTS)
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    await inst.sessions.end_session(session_id=s.id)
    student = uid("student")
    await expect_error(
        sm.as_user(student).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )
    await expect_error(
        sm.client(None).sessions.join_session(
            join_link_token=link, display_name="Guest", retry=NO_RETRY
        ),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )
    assert student not in await db_participants(sm.pool, s.id)


async def test_str005_admit_unknown_ids_are_skipped_and_reported(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm)
    waiting, admitted_already = uid("student"), uid("student")
    await sm.as_user(waiting).sessions.join_session(session_id=s.id)
    await sm.as_user(admitted_already).sessions.join_session(session_id=s.id)
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[admitted_already])
    ghost = "nobody-" + secrets.token_hex(4)
    resp = await inst.sessions.admit_participants(
        session_id=s.id, user_ids=[ghost, waiting, admitted_already]
    )
    assert [p.user_id for p in resp.admitted] == [waiting]
    assert set(resp.skipped_user_ids) == {ghost, admitted_already}
    rows = await db_participants(sm.pool, s.id)
    assert rows[waiting]["status"] == "admitted"
    assert ghost not in rows


async def test_str005_remove_last_instructor(sm: SessionMesh) -> None:
    s, teacher, inst = await live_class(sm)
    admin = sm.admin()
    co = uid("coteacher")
    await inst.sessions.join_session(session_id=s.id)
    await sm.as_user(co, "instructor").sessions.join_session(session_id=s.id)
    # With two instructors present one may go ...
    await admin.sessions.remove_participant(session_id=s.id, user_id=co, reason="wrong class")
    # ... but not the last one: neither by removal nor by demotion.
    await expect_error(
        admin.sessions.remove_participant(session_id=s.id, user_id=teacher, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "LAST_INSTRUCTOR",
    )
    await expect_error(
        admin.sessions.update_participant_permissions(
            session_id=s.id,
            user_id=teacher,
            role=common_pb2.ROLE_STUDENT,
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            retry=NO_RETRY,
        ),
        Code.FAILED_PRECONDITION,
        "LAST_INSTRUCTOR",
    )
    row = (await db_participants(sm.pool, s.id))[teacher]
    assert (row["status"], row["role"]) == ("admitted", "instructor")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_str005_sfu_unavailable_is_unavailable_with_retry_after(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """MediaService unreachable (not merely UNIMPLEMENTED): 503 -> UNAVAILABLE, retry 30 s."""
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "nosfu",
        {
            "CLASSMESH_PEER_TARGET": f"127.0.0.1:{_closed_port()}",
            "CLASSMESH_MEDIA_CALL_TIMEOUT_SECONDS": "3",
        },
    ) as m:
        teacher = uid("teacher")
        inst = m.as_user(teacher, "instructor")
        s = await create_session(inst, start_in=timedelta(minutes=1))
        err = await expect_error(
            inst.sessions.start_session(session_id=s.id, retry=NO_RETRY, timeout=40),
            Code.UNAVAILABLE,
            "MEDIA_UNAVAILABLE",
        )
        assert err.retry_after is not None and 20 <= err.retry_after <= 40
        assert (await db_session(m.pool, s.id))["status"] == "scheduled"


# ============================================================================ more reasons


async def test_join_link_invalid_and_rotated(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, settings=GUESTS)
    anon = sm.client(None)
    await expect_error(
        anon.sessions.join_session(
            join_link_token=secrets.token_urlsafe(48), display_name="G", retry=NO_RETRY
        ),
        Code.NOT_FOUND,
        "JOIN_LINK_INVALID",
    )
    old = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    new = (await inst.sessions.rotate_join_link(session_id=s.id)).session.join_link_token
    assert len(new) == 64 and new != old
    assert (await db_session(sm.pool, s.id))["join_link_token"] == new
    await expect_error(
        anon.sessions.join_session(join_link_token=old, display_name="G", retry=NO_RETRY),
        Code.NOT_FOUND,
        "JOIN_LINK_INVALID",
    )
    ok = await anon.sessions.join_session(join_link_token=new, display_name="G")
    assert ok.participant.guest


async def test_guests_not_allowed(sm: SessionMesh) -> None:
    s, _, inst = await live_class(
        sm, settings=session_pb2.SessionSettings(lobby_enabled=True, allow_guests=False)
    )
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    await expect_error(
        sm.client(None).sessions.join_session(
            join_link_token=link, display_name="G", retry=NO_RETRY
        ),
        Code.PERMISSION_DENIED,
        "GUESTS_NOT_ALLOWED",
    )
    assert await db_participants(sm.pool, s.id) == {}


async def test_join_cancelled_session(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    s = await create_session(sm.admin(), instructor_id=teacher)
    await sm.as_user(teacher, "instructor").sessions.cancel_session(session_id=s.id)
    assert (await db_session(sm.pool, s.id))["status"] == "cancelled"
    await expect_error(
        sm.as_user(uid("student")).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "SESSION_CANCELLED",
    )


async def test_capacity_below_occupancy(sm: SessionMesh) -> None:
    s, teacher, inst = await live_class(sm, capacity=10)
    for _ in range(3):
        await sm.as_user(uid("student")).sessions.join_session(session_id=s.id)
    await expect_error(
        inst.sessions.update_session(
            session=session_pb2.Session(id=s.id, capacity=2),
            update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
            retry=NO_RETRY,
        ),
        Code.FAILED_PRECONDITION,
        "CAPACITY_BELOW_OCCUPANCY",
    )
    assert (await db_session(sm.pool, s.id))["capacity"] == 10
    ok = await inst.sessions.update_session(
        session=session_pb2.Session(id=s.id, capacity=3),
        update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
    )
    assert (ok.session.capacity, ok.session.available_spots) == (3, 0)


async def test_idempotency_key_reused_with_another_request(sm: SessionMesh) -> None:
    teacher = uid("teacher")
    inst = sm.as_user(teacher, "instructor")
    rid = str(uuid.uuid4())
    start = now() + timedelta(hours=1)
    kw: dict[str, Any] = dict(
        scheduled_start=ts(start), scheduled_end=ts(start + timedelta(hours=1)), request_id=rid
    )
    first = await inst.sessions.create_session(title="one", **kw)
    again = await inst.sessions.create_session(title="one", **kw)
    assert again.session.id == first.session.id
    count = await _session_count(sm)
    await expect_error(
        inst.sessions.create_session(title="two", retry=NO_RETRY, **kw),
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert await _session_count(sm) == count


async def test_removed_participant_is_locked_out(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm)
    kid = uid("student")
    kc = sm.as_user(kid)
    await kc.sessions.join_session(session_id=s.id)
    await inst.sessions.remove_participant(session_id=s.id, user_id=kid, reason="spam")
    for call in (
        kc.sessions.join_session(session_id=s.id, retry=NO_RETRY),
        kc.sessions.heartbeat(session_id=s.id, retry=NO_RETRY),
        kc.sessions.get_session(session_id=s.id, retry=NO_RETRY),
        kc.sessions.list_participants(session_id=s.id, retry=NO_RETRY),
        kc.sessions.leave_session(session_id=s.id, retry=NO_RETRY),
    ):
        await expect_error(call, Code.PERMISSION_DENIED, "PARTICIPANT_REMOVED")
    # A fresh token of the same user is refused as well.
    fresh = sm.as_user(kid)
    await expect_error(
        fresh.sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )
    assert (await db_participants(sm.pool, s.id))[kid]["status"] == "removed"
    # Only this session: the same user still joins another one.
    other, _, _ = await live_class(sm)
    ok = await kc.sessions.join_session(session_id=other.id)
    assert ok.status == S.PARTICIPANT_STATUS_LOBBY


async def test_heartbeat_of_a_non_participant(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    await expect_error(
        sm.as_user(uid("student")).sessions.heartbeat(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "NOT_IN_SESSION",
    )


async def test_page_token_invalid(sm: SessionMesh) -> None:
    admin = sm.admin()
    await expect_error(
        admin.sessions.list_sessions(page_token="garbage!!", retry=NO_RETRY),
        Code.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )


# ============================================================================ validation


def _fields(err: ClassMeshError) -> set[str]:
    return {f for f, _ in err.field_violations}


def _has_field(err: ClassMeshError, name: str) -> bool:
    return any(f == name or f.endswith("." + name) for f in _fields(err))


def _create_kwargs(**over: Any) -> dict[str, Any]:
    start = now() + timedelta(hours=2)
    kw: dict[str, Any] = dict(
        title="Valid",
        scheduled_start=ts(start),
        scheduled_end=ts(start + timedelta(hours=1)),
    )
    kw.update(over)
    return {k: v for k, v in kw.items() if v is not None}


def _ends(offset: timedelta) -> dict[str, Any]:
    start = now() + timedelta(hours=2)
    return {"scheduled_start": ts(start), "scheduled_end": ts(start + offset)}


CREATE_CASES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("empty title", lambda: {"title": ""}, "title"),
    ("blank title", lambda: {"title": "   "}, "title"),
    ("long title", lambda: {"title": "x" * 256}, "title"),
    ("capacity too big", lambda: {"capacity": 1001}, "capacity"),
    ("negative capacity", lambda: {"capacity": -1}, "capacity"),
    ("end == start", lambda: _ends(timedelta(0)), "scheduled_end"),
    ("end < start", lambda: _ends(-timedelta(minutes=5)), "scheduled_end"),
    ("longer than 24 h", lambda: _ends(timedelta(hours=24, minutes=1)), "scheduled_end"),
    ("no start", lambda: {"scheduled_start": None}, "scheduled_start"),
    ("no end", lambda: {"scheduled_end": None}, "scheduled_end"),
    ("long description", lambda: {"description": "d" * 5001}, "description"),
    ("long lms ref", lambda: {"lms_course_ref": "c" * 256}, "lms_course_ref"),
    ("long instructor id", lambda: {"instructor_id": "i" * 129}, "instructor_id"),
    ("long request id", lambda: {"request_id": "r" * 129}, "request_id"),
    ("unknown kind", lambda: {"kind": 99}, "kind"),
    (
        "too many breakouts",
        lambda: {"settings": session_pb2.SessionSettings(max_breakout_rooms=51)},
        "max_breakout_rooms",
    ),
    (
        "guest ttl > 2 h",
        lambda: {"settings": session_pb2.SessionSettings(guest_token_ttl=dur(3 * 3600))},
        "guest_token_ttl",
    ),
]


@pytest.mark.parametrize(("label", "over", "field"), CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
async def test_create_session_validation(
    sm: SessionMesh, label: str, over: Callable[[], dict[str, Any]], field: str
) -> None:
    admin = sm.admin()
    before = await _session_count(sm)
    err = await expect_error(
        admin.sessions.create_session(retry=NO_RETRY, **_create_kwargs(**over())),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert _has_field(err, field), (label, err.field_violations)
    assert await _session_count(sm) == before


async def test_create_session_reports_every_bad_field_at_once(sm: SessionMesh) -> None:
    err = await expect_error(
        sm.admin().sessions.create_session(
            retry=NO_RETRY, **_create_kwargs(title="", capacity=5000)
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert _has_field(err, "title") and _has_field(err, "capacity"), err.field_violations


async def test_create_session_defaults(sm: SessionMesh) -> None:
    admin = sm.admin()
    cls = await create_session(admin, instructor_id=uid("teacher"))
    room = await create_session(admin, instructor_id=uid("teacher"), kind=STUDY_ROOM)
    assert (cls.kind, cls.capacity, cls.recording_enabled) == (CLASS, 500, True)
    assert cls.settings.lobby_enabled and not cls.settings.allow_guests
    assert (room.kind, room.capacity, room.current_occupancy) == (STUDY_ROOM, 50, 0)
    assert not room.settings.lobby_enabled
    links = {cls.join_link_token, room.join_link_token}
    assert len(links) == 2 and all(len(t) == 64 for t in links)


def _validation_calls(sid: str) -> list[tuple[str, Callable[[ClassMeshClient], Any], str]]:
    mask = field_mask_pb2.FieldMask
    return [
        ("get bad id", lambda c: c.sessions.get_session(session_id="nope"), "session_id"),
        ("get no id", lambda c: c.sessions.get_session(session_id=""), "session_id"),
        (
            "update no mask",
            lambda c: c.sessions.update_session(session=session_pb2.Session(id=sid, title="x")),
            "update_mask",
        ),
        (
            "update unknown path",
            lambda c: c.sessions.update_session(
                session=session_pb2.Session(id=sid), update_mask=mask(paths=["status"])
            ),
            "update_mask",
        ),
        (
            "update capacity 0",
            lambda c: c.sessions.update_session(
                session=session_pb2.Session(id=sid, capacity=0),
                update_mask=mask(paths=["capacity"]),
            ),
            "capacity",
        ),
        (
            "update empty title",
            lambda c: c.sessions.update_session(
                session=session_pb2.Session(id=sid, title=""), update_mask=mask(paths=["title"])
            ),
            "title",
        ),
        (
            "join nothing",
            lambda c: c.sessions.join_session(display_name="x"),
            "session_id|join_link_token|target",
        ),
        (
            "join long name",
            lambda c: c.sessions.join_session(session_id=sid, display_name="n" * 101),
            "display_name",
        ),
        (
            "admit too many",
            lambda c: c.sessions.admit_participants(
                session_id=sid, user_ids=[f"u{i}" for i in range(1001)]
            ),
            "user_ids",
        ),
        (
            "remove no user",
            lambda c: c.sessions.remove_participant(session_id=sid, user_id=""),
            "user_id",
        ),
        (
            "remove long reason",
            lambda c: c.sessions.remove_participant(session_id=sid, user_id="x", reason="r" * 501),
            "reason",
        ),
        (
            "end long reason",
            lambda c: c.sessions.end_session(session_id=sid, reason="r" * 501),
            "reason",
        ),
        (
            "events negative page size",
            lambda c: c.sessions.list_session_events(session_id=sid, page_size=-1),
            "page_size",
        ),
        (
            "analytics tiny bucket",
            lambda c: c.sessions.get_session_analytics(session_id=sid, bucket_width=dur(30)),
            "bucket_width",
        ),
        ("audit no session", lambda c: c.sessions.list_audit_logs(session_id=""), "session_id"),
        (
            "room logs reversed range",
            lambda c: c.sessions.list_study_room_logs(
                time_range=time_range(now(), now() - timedelta(hours=1))
            ),
            "time_range",
        ),
    ]


async def test_validation_errors_name_the_field(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    admin = sm.admin()
    state = dict(await db_session(sm.pool, s.id))
    failures = []
    for label, make, field in _validation_calls(s.id):
        try:
            await make(admin)
        except ClassMeshError as exc:
            wanted = field.split("|")
            if (exc.code, exc.reason) != (Code.INVALID_ARGUMENT, "VALIDATION_FAILED") or not any(
                _has_field(exc, f) for f in wanted
            ):
                failures.append(f"{label}: {exc.code.name} {exc.reason} {exc.field_violations}")
        else:
            failures.append(f"{label}: succeeded")
    assert failures == []
    assert dict(await db_session(sm.pool, s.id)) == state


async def test_guest_join_needs_a_display_name(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, settings=GUESTS)
    link = (await inst.sessions.get_session(session_id=s.id)).session.join_link_token
    anon = sm.client(None)
    err = await expect_error(
        anon.sessions.join_session(join_link_token=link, retry=NO_RETRY),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert _has_field(err, "display_name"), err.field_violations
    err = await expect_error(
        anon.sessions.join_session(join_link_token="short", display_name="G", retry=NO_RETRY),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert _has_field(err, "join_link_token"), err.field_violations
    assert await db_participants(sm.pool, s.id) == {}


# ============================================================================ auth / roles


def _all_rpcs(sid: str) -> list[tuple[str, Callable[[ClassMeshClient], Any]]]:
    ss = lambda c: c.sessions  # noqa: E731
    start = now() + timedelta(hours=1)
    return [
        (
            "CreateSession",
            lambda c: ss(c).create_session(
                title="t", scheduled_start=ts(start), scheduled_end=ts(start + timedelta(hours=1))
            ),
        ),
        ("GetSession", lambda c: ss(c).get_session(session_id=sid)),
        ("ListSessions", lambda c: ss(c).list_sessions()),
        (
            "UpdateSession",
            lambda c: ss(c).update_session(
                session=session_pb2.Session(id=sid, title="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
        ),
        ("DeleteSession", lambda c: ss(c).delete_session(session_id=sid)),
        ("RotateJoinLink", lambda c: ss(c).rotate_join_link(session_id=sid)),
        ("StartSession", lambda c: ss(c).start_session(session_id=sid)),
        ("EndSession", lambda c: ss(c).end_session(session_id=sid)),
        ("CancelSession", lambda c: ss(c).cancel_session(session_id=sid)),
        ("JoinSession", lambda c: ss(c).join_session(session_id=sid)),
        ("LeaveSession", lambda c: ss(c).leave_session(session_id=sid)),
        ("Heartbeat", lambda c: ss(c).heartbeat(session_id=sid)),
        ("AdmitParticipants", lambda c: ss(c).admit_participants(session_id=sid, all=True)),
        ("RemoveParticipant", lambda c: ss(c).remove_participant(session_id=sid, user_id="x")),
        (
            "MuteParticipant",
            lambda c: ss(c).mute_participant(session_id=sid, user_id="x", audio=True),
        ),
        (
            "UnmuteParticipant",
            lambda c: ss(c).unmute_participant(session_id=sid, user_id="x", audio=True),
        ),
        (
            "UpdateParticipantPermissions",
            lambda c: ss(c).update_participant_permissions(
                session_id=sid,
                user_id="x",
                update_mask=field_mask_pb2.FieldMask(paths=["permissions.can_chat"]),
            ),
        ),
        ("GetParticipant", lambda c: ss(c).get_participant(session_id=sid, user_id="x")),
        ("ListParticipants", lambda c: ss(c).list_participants(session_id=sid)),
        ("ListSessionEvents", lambda c: ss(c).list_session_events(session_id=sid)),
        ("GetAttendance", lambda c: ss(c).get_attendance(session_id=sid)),
        ("GetSessionAnalytics", lambda c: ss(c).get_session_analytics(session_id=sid)),
        ("ListAuditLogs", lambda c: ss(c).list_audit_logs(session_id=sid)),
        ("ListStudyRooms", lambda c: ss(c).list_study_rooms()),
        ("ListStudyRoomLogs", lambda c: ss(c).list_study_room_logs()),
    ]


async def _first_event(c: ClassMeshClient, sid: str) -> Any:
    async for item in c.sessions.watch_session(session_id=sid, retry=NO_RETRY, timeout=10):
        return item
    return None


async def test_every_rpc_without_a_token_is_unauthenticated(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    anon = sm.client(None)
    failures = []
    for name, make in _all_rpcs(s.id):
        try:
            await make(anon)
        except ClassMeshError as exc:
            if (exc.code, exc.reason) != (Code.UNAUTHENTICATED, "TOKEN_MISSING"):
                failures.append(f"{name}: {exc.code.name} {exc.reason}")
        else:
            failures.append(f"{name}: succeeded")
    assert failures == []
    await expect_error(_first_event(anon, s.id), Code.UNAUTHENTICATED, "TOKEN_MISSING")


async def test_owner_only_rpcs(sm: SessionMesh) -> None:
    """Create/Update/Delete/Start/End: the session's instructor (sub == instructor_id) or admin."""
    admin = sm.admin()
    teacher = uid("teacher")
    owner = sm.as_user(teacher, "instructor")
    denied = {
        "student": sm.as_user(uid("student"), "student"),
        "assistant": sm.as_user(uid("assistant"), "assistant"),
        "other instructor": sm.as_user(uid("teacher"), "instructor"),
    }
    scheduled = await create_session(admin, instructor_id=teacher, start_in=timedelta(minutes=1))
    # Guest tokens are always scoped to one session.
    denied["guest"] = sm.as_user(uid("guest"), "guest", session=scheduled.id)
    live, _, _ = await live_class(sm, instructor=teacher)
    mask = field_mask_pb2.FieldMask(paths=["title"])
    start = now() + timedelta(hours=1)
    window = dict(scheduled_start=ts(start), scheduled_end=ts(start + timedelta(hours=1)))
    snapshot = {sid: dict(await db_session(sm.pool, sid)) for sid in (scheduled.id, live.id)}
    count = await _session_count(sm)
    failures = []
    for who, c in denied.items():
        calls = {
            "create": c.sessions.create_session(
                title="mine", instructor_id=teacher, retry=NO_RETRY, **window
            ),
            "update": c.sessions.update_session(
                session=session_pb2.Session(id=scheduled.id, title="hijack"),
                update_mask=mask,
                retry=NO_RETRY,
            ),
            "delete": c.sessions.delete_session(session_id=scheduled.id, retry=NO_RETRY),
            "start": c.sessions.start_session(session_id=scheduled.id, retry=NO_RETRY),
            "end": c.sessions.end_session(session_id=live.id, retry=NO_RETRY),
            "cancel": c.sessions.cancel_session(session_id=scheduled.id, retry=NO_RETRY),
            "rotate": c.sessions.rotate_join_link(session_id=scheduled.id, retry=NO_RETRY),
        }
        for op, call in calls.items():
            try:
                await call
            except ClassMeshError as exc:
                if (exc.code, exc.reason) != (Code.PERMISSION_DENIED, "PERMISSION_MISSING"):
                    failures.append(f"{who} {op}: {exc.code.name} {exc.reason}")
            else:
                failures.append(f"{who} {op}: succeeded")
    assert failures == []
    for sid, before in snapshot.items():
        assert dict(await db_session(sm.pool, sid)) == before
    assert await _session_count(sm) == count

    # The owner and an admin may.
    upd = await owner.sessions.update_session(
        session=session_pb2.Session(id=scheduled.id, title="renamed"), update_mask=mask
    )
    assert upd.session.title == "renamed"
    assert (await db_session(sm.pool, scheduled.id))["title"] == "renamed"
    upd = await admin.sessions.update_session(
        session=session_pb2.Session(id=scheduled.id, title="by admin"), update_mask=mask
    )
    assert upd.session.title == "by admin"
    mine = await owner.sessions.create_session(title="own", **window)
    assert mine.session.instructor_id == teacher
    assert (await admin.sessions.start_session(session_id=scheduled.id)).session.status == (
        S.SESSION_STATUS_LIVE
    )
    assert (await owner.sessions.end_session(session_id=live.id)).session.status == (
        S.SESSION_STATUS_ENDED
    )
    assert (await admin.sessions.end_session(session_id=scheduled.id)).session.status == (
        S.SESSION_STATUS_ENDED
    )
    deleted = await owner.sessions.delete_session(session_id=mine.session.id)
    assert deleted.session.HasField("delete_time")


async def test_moderation_rpcs(sm: SessionMesh) -> None:
    """Admit/Remove/Mute/Permissions: instructor, assistant or admin; never a student."""
    s, teacher, inst = await live_class(sm)
    assistant = sm.as_user(uid("assistant"), "assistant")
    admin = sm.admin()
    learners = [uid("student") for _ in range(6)]
    lc = {u: sm.as_user(u) for u in learners}
    for u in learners:
        await lc[u].sessions.join_session(session_id=s.id)
    student = lc[learners[0]]
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[learners[0]])
    target = learners[1]
    before = await db_participants(sm.pool, s.id)
    perm_mask = field_mask_pb2.FieldMask(paths=["permissions.can_chat"])
    for call in (
        student.sessions.admit_participants(session_id=s.id, all=True, retry=NO_RETRY),
        student.sessions.remove_participant(session_id=s.id, user_id=target, retry=NO_RETRY),
        student.sessions.mute_participant(
            session_id=s.id, user_id=target, audio=True, retry=NO_RETRY
        ),
        student.sessions.update_participant_permissions(
            session_id=s.id,
            user_id=target,
            permissions=session_pb2.ParticipantPermissions(can_chat=False),
            update_mask=perm_mask,
            retry=NO_RETRY,
        ),
    ):
        await expect_error(call, Code.PERMISSION_DENIED, "PERMISSION_MISSING")
    assert await db_participants(sm.pool, s.id) == before

    # Self-mute is allowed for anyone.
    me = await student.sessions.mute_participant(session_id=s.id, user_id=learners[0], audio=True)
    assert me.participant.audio_muted
    # Staff moderate.
    for who, c, u in ((inst, "instructor", learners[1]), (assistant, "assistant", learners[2])):
        got = await who.sessions.admit_participants(session_id=s.id, user_ids=[u])
        assert [p.user_id for p in got.admitted] == [u], c
    got = await admin.sessions.admit_participants(session_id=s.id, user_ids=[learners[3]])
    assert [p.user_id for p in got.admitted] == [learners[3]]
    muted = await assistant.sessions.mute_participant(
        session_id=s.id, user_id=learners[1], audio=True, video=True
    )
    assert muted.participant.audio_muted and muted.participant.video_muted
    perms = await assistant.sessions.update_participant_permissions(
        session_id=s.id,
        user_id=learners[1],
        permissions=session_pb2.ParticipantPermissions(can_chat=False),
        update_mask=perm_mask,
    )
    assert not perms.participant.permissions.can_chat
    removed = await assistant.sessions.remove_participant(
        session_id=s.id, user_id=learners[4], reason="assistant removes"
    )
    assert removed.participant.status == S.PARTICIPANT_STATUS_REMOVED
    removed = await admin.sessions.remove_participant(session_id=s.id, user_id=learners[5])
    assert removed.participant.status == S.PARTICIPANT_STATUS_REMOVED
    rows = await db_participants(sm.pool, s.id)
    assert rows[learners[1]]["audio_muted"] and rows[learners[1]]["video_muted"]
    assert rows[learners[0]]["audio_muted"]
    assert rows[learners[4]]["status"] == rows[learners[5]]["status"] == "removed"
    # Only the instructor (or admin) ends; an assistant cannot.
    await expect_error(
        assistant.sessions.end_session(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    assert teacher


async def test_reads_need_the_session_grant(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    other, _, _ = await live_class(sm)
    learner = uid("student")
    scoped = sm.as_user(learner, "student", session=s.id)
    await scoped.sessions.join_session(session_id=s.id)
    wrong = sm.as_user(learner, "student", session=other.id)
    reads: list[tuple[str, Callable[[ClassMeshClient], Any]]] = [
        ("GetSession", lambda c: c.sessions.get_session(session_id=s.id)),
        ("ListParticipants", lambda c: c.sessions.list_participants(session_id=s.id)),
        ("GetParticipant", lambda c: c.sessions.get_participant(session_id=s.id)),
        ("ListSessionEvents", lambda c: c.sessions.list_session_events(session_id=s.id)),
        ("GetAttendance", lambda c: c.sessions.get_attendance(session_id=s.id)),
        ("GetSessionAnalytics", lambda c: c.sessions.get_session_analytics(session_id=s.id)),
    ]
    failures = []
    for name, make in reads:
        try:
            await make(scoped)
        except ClassMeshError as exc:
            failures.append(f"{name} with grant: {exc.code.name} {exc.reason}")
        try:
            await make(wrong)
        except ClassMeshError as exc:
            if (exc.code, exc.reason) != (Code.PERMISSION_DENIED, "PERMISSION_MISSING"):
                failures.append(f"{name} without grant: {exc.code.name} {exc.reason}")
        else:
            failures.append(f"{name} without grant: succeeded")
    assert failures == []
    first = await _first_event(scoped, s.id)
    assert first is not None and first.event.seq == 1
    await expect_error(_first_event(wrong, s.id), Code.PERMISSION_DENIED, "PERMISSION_MISSING")
    await expect_error(
        wrong.sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    # The join link token is for staff only.
    got = (await scoped.sessions.get_session(session_id=s.id)).session
    assert got.join_link_token == ""
    assert (await sm.admin().sessions.get_session(session_id=s.id)).session.join_link_token
    helper = sm.as_user(uid("assistant"), "assistant", session=s.id)
    assert (await helper.sessions.get_session(session_id=s.id)).session.join_link_token
    # A token scoped to one session lists only that session.
    listed = await scoped.sessions.list_sessions(page_size=100)
    assert [x.id for x in listed.sessions] == [s.id]
    assert all(x.join_link_token == "" for x in listed.sessions)


async def test_audit_log_is_for_admins(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    await expect_error(
        sm.as_user(uid("student")).sessions.list_audit_logs(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    resp = await sm.admin().sessions.list_audit_logs(session_id=s.id)
    assert list(resp.entries) == []


async def test_expired_token_is_unauthenticated(sm: SessionMesh) -> None:
    s, _, _ = await live_class(sm)
    from classmesh.core.auth import AccessToken as ServerToken

    stale = (
        ServerToken(sm.key_id, sm.secret)
        .with_tenant(sm.tenant_id)
        .with_identity("stale", "Stale")
        .with_grants(session="*", role="student", caps=["subscribe"])
        .with_issued_at(now() - timedelta(hours=2))
        .with_ttl(timedelta(minutes=30))
        .to_jwt()
    )
    await expect_error(
        sm.client(stale).sessions.get_session(session_id=s.id, retry=NO_RETRY),
        Code.UNAUTHENTICATED,
        "TOKEN_EXPIRED",
    )
