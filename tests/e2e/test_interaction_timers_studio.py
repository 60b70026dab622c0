"""Study timers (seed 003: start/pause/resume/complete/reset, the same state for everyone, a
session log row per timer event) and the teaching studio (seed 001/002: scenes, switching,
slides; events for replay chapters)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from classmesh.interaction.v1 import interaction_pb2
from classmesh.session.v1 import session_pb2
from tests.support.classroom import (
    Code,
    Feed,
    Mesh,
    add_student,
    classroom_mesh,
    db_events,
    expect_error,
    kind,
    live_class,
    scope,
)

IX = interaction_pb2
TIMER_EVENTS = ("timer_started", "timer_paused", "timer_resumed", "timer_completed", "timer_reset")


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    extra = {"CLASSMESH_INTERACTION_SWEEP_INTERVAL_SECONDS": "0.2"}
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "timers", extra
    ) as m:
        yield m


async def study_room(mesh: Mesh, members: int) -> tuple[str, dict[str, object]]:
    """A study room (seed 003) with `members` students in it."""
    klass = await live_class(mesh, kind=session_pb2.SESSION_KIND_STUDY_ROOM, capacity=50)
    for _ in range(members):
        await add_student(mesh, klass)
    return klass.id, dict(klass.students)


async def test_timer_lifecycle_is_shared_and_logged(mesh: Mesh) -> None:
    sid, students = await study_room(mesh, 3)
    users = list(students)
    clients = [students[u] for u in users]
    feeds = [Feed(c, sid) for c in clients]  # type: ignore[arg-type]
    c0, c1 = clients[0], clients[1]
    started = (
        await c0.interaction.start_timer(  # type: ignore[attr-defined]
            scope=scope(sid), duration=duration_pb2.Duration(seconds=600)
        )
    ).timer
    assert started.status == IX.TIMER_STATUS_RUNNING and started.mode == IX.TIMER_MODE_FOCUS
    assert started.duration.seconds == 600
    assert started.ends_at.ToDatetime() - started.start_time.ToDatetime() == timedelta(minutes=10)
    await expect_error(
        c1.interaction.start_timer(scope=scope(sid)),  # type: ignore[attr-defined]
        Code.FAILED_PRECONDITION,
        "TIMER_STATE_INVALID",
    )
    await asyncio.sleep(0.3)
    paused = (await c1.interaction.pause_timer(scope=scope(sid))).timer  # type: ignore[attr-defined]
    assert paused.status == IX.TIMER_STATUS_PAUSED
    left = paused.remaining.ToTimedelta()
    assert timedelta(minutes=9, seconds=58) < left < timedelta(minutes=10)
    resumed = (await c0.interaction.resume_timer(scope=scope(sid))).timer  # type: ignore[attr-defined]
    assert resumed.status == IX.TIMER_STATUS_RUNNING
    assert resumed.remaining == paused.remaining  # no time lost while paused
    assert resumed.ends_at.ToDatetime() - resumed.update_time.ToDatetime() == left
    done = (await c1.interaction.complete_timer(scope=scope(sid))).timer  # type: ignore[attr-defined]
    assert done.status == IX.TIMER_STATUS_COMPLETED and done.completed_focus_count == 1
    reset = (await c0.interaction.reset_timer(scope=scope(sid))).timer  # type: ignore[attr-defined]
    assert reset.status == IX.TIMER_STATUS_IDLE
    await expect_error(
        c0.interaction.pause_timer(scope=scope(sid)),  # type: ignore[attr-defined]
        Code.FAILED_PRECONDITION,
        "TIMER_STATE_INVALID",
    )
    # property 19: every participant receives every timer event with the same state
    expected = list(TIMER_EVENTS)
    states = []
    for feed in feeds:
        for t in TIMER_EVENTS:
            await feed.wait_count(t, 1)
        got = feed.of(*TIMER_EVENTS)
        assert [kind(e) for e in got] == expected
        states.append([getattr(e, kind(e)).timer.SerializeToString() for e in got])
    assert states[0] == states[1] == states[2]
    # property 20: one session log row per timer event, with who and when
    logs = await mesh.pool.fetch(
        "SELECT user_id, detail, kind, joined_at FROM session_logs "
        "WHERE session_id = $1::uuid AND kind = 'timer' ORDER BY joined_at",
        sid,
    )
    assert [r["detail"] for r in logs] == ["started", "paused", "resumed", "completed", "reset"]
    assert [r["user_id"] for r in logs] == [users[0], users[1], users[0], users[1], users[0]]
    listed = await clients[0].sessions.list_study_room_logs(  # type: ignore[attr-defined]
        session_id=sid, kind=session_pb2.STUDY_ROOM_LOG_KIND_TIMER
    )
    # through SessionService too (a student reads their own rows)
    assert sorted(r.detail for r in listed.logs) == ["reset", "resumed", "started"]
    assert {r.kind for r in listed.logs} == {session_pb2.STUDY_ROOM_LOG_KIND_TIMER}
    for feed in feeds:
        await feed.stop()


async def test_timer_reaching_zero_completes_for_everyone(mesh: Mesh) -> None:
    sid, students = await study_room(mesh, 2)
    a, b = students.values()
    feed = Feed(b, sid)  # type: ignore[arg-type]
    await a.interaction.start_timer(  # type: ignore[attr-defined]
        scope=scope(sid), mode=IX.TIMER_MODE_BREAK, duration=duration_pb2.Duration(seconds=60)
    )
    await mesh.pool.execute(
        "UPDATE study_timers SET ends_at = now() WHERE session_id = $1::uuid", sid
    )
    done = await feed.wait_for(lambda e: kind(e) == "timer_completed", timeout=10)
    assert done.timer_completed.elapsed
    assert done.timer_completed.timer.status == IX.TIMER_STATUS_COMPLETED
    assert done.timer_completed.timer.completed_focus_count == 0  # a break, not a focus
    timer = (await a.interaction.get_timer(scope=scope(sid))).timer  # type: ignore[attr-defined]
    assert timer.status == IX.TIMER_STATUS_COMPLETED and timer.mode == IX.TIMER_MODE_BREAK
    row = await mesh.pool.fetchrow(
        "SELECT user_id, detail FROM session_logs WHERE session_id = $1::uuid AND kind = 'timer' "
        "ORDER BY joined_at DESC LIMIT 1",
        sid,
    )
    assert (row["user_id"], row["detail"]) == ("system", "completed")
    await feed.stop()


async def test_class_timers_are_the_teachers(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    await expect_error(
        student.interaction.start_timer(scope=scope(klass.id)),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    t = (await klass.inst.interaction.start_timer(scope=scope(klass.id))).timer
    assert t.duration.seconds == 25 * 60  # the focus default
    for bad in (duration_pb2.Duration(seconds=59), duration_pb2.Duration(seconds=4 * 3600 + 1)):
        await klass.inst.interaction.reset_timer(scope=scope(klass.id))
        await expect_error(
            klass.inst.interaction.start_timer(scope=scope(klass.id), duration=bad),
            Code.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )


async def test_studio_scenes_slides_and_chapters(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    feed = Feed(student, sid)
    intro = (
        await klass.inst.interaction.create_scene(
            session_id=sid,
            name="Intro",
            layout=IX.SCENE_LAYOUT_SLIDES_WITH_SPEAKER,
            slide_deck_id="deck-1",
            slide_deck_url="https://cdn.example/deck-1.pdf",
            slide_count=12,
        )
    ).scene
    board = (
        await klass.inst.interaction.create_scene(
            session_id=sid, name="Board", layout=IX.SCENE_LAYOUT_WHITEBOARD
        )
    ).scene
    await expect_error(
        student.interaction.create_scene(session_id=sid, name="mine"),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    state = (await klass.inst.interaction.set_scene(session_id=sid, scene_id=intro.id)).studio
    assert state.active_scene.id == intro.id
    assert state.layout == IX.SCENE_LAYOUT_SLIDES_WITH_SPEAKER
    assert (state.slide.deck_id, state.slide.slide_index, state.slide.slide_count) == (
        "deck-1",
        0,
        12,
    )
    for index in (1, 2, 5):
        state = (
            await klass.inst.interaction.change_slide(
                session_id=sid, slide_index=index, slide_url=f"https://cdn.example/s{index}.png"
            )
        ).studio
    assert state.slide.slide_index == 5
    await expect_error(
        klass.inst.interaction.change_slide(session_id=sid, slide_index=12),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        klass.inst.interaction.delete_scene(session_id=sid, scene_id=intro.id),
        Code.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )
    layout_only = (
        await klass.inst.interaction.set_scene(session_id=sid, layout=IX.SCENE_LAYOUT_GRID)
    ).studio
    assert layout_only.active_scene.id == intro.id and layout_only.layout == IX.SCENE_LAYOUT_GRID
    switched = (await klass.inst.interaction.set_scene(session_id=sid, scene_id=board.id)).studio
    assert switched.active_scene.id == board.id
    assert switched.layout == IX.SCENE_LAYOUT_WHITEBOARD
    renamed = (
        await klass.inst.interaction.update_scene(
            scene=IX.Scene(id=intro.id, session_id=sid, name="Introduction", slide_count=3),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "slide_count"]),
        )
    ).scene
    assert (renamed.name, renamed.slide_count) == ("Introduction", 3)
    await klass.inst.interaction.delete_scene(session_id=sid, scene_id=intro.id)
    scenes = (await student.interaction.list_scenes(session_id=sid)).scenes
    assert [s.id for s in scenes] == [board.id]
    extra = [
        (await klass.inst.interaction.create_scene(session_id=sid, name=f"S{i}")).scene.id
        for i in range(3)
    ]
    page = await student.interaction.list_scenes(session_id=sid, page_size=2)
    rest = await student.interaction.list_scenes(
        session_id=sid, page_size=2, page_token=page.next_page_token
    )
    assert [s.id for s in [*page.scenes, *rest.scenes]] == [board.id, *extra]
    got = (await student.interaction.get_studio_state(session_id=sid)).studio
    assert got.active_scene.id == board.id and got.seq == switched.seq
    # every change is in the log in order, for replay chapters, and reached the student
    events = [r["type"] for r in await db_events(mesh.pool, sid)]
    studio = [t for t in events if t.startswith(("scene_", "slide_"))]
    assert studio == [
        "scene_created",
        "scene_created",
        "scene_changed",
        "slide_changed",
        "slide_changed",
        "slide_changed",
        "scene_changed",
        "scene_changed",
        "scene_updated",
        "scene_deleted",
        "scene_created",
        "scene_created",
        "scene_created",
    ]
    slides = await feed.wait_count("slide_changed", 3)
    assert [e.slide_changed.slide.slide_index for e in slides] == [1, 2, 5]
    assert [e.slide_changed.previous_slide_index for e in slides] == [0, 1, 2]
    changed = await feed.wait_count("scene_changed", 3)
    assert changed[-1].scene_changed.studio.seq == changed[-1].seq  # state quotes its own seq
    await feed.stop()
