"""What a partner LMS backend runs for one class: schedule, start, watch, admit, end, report.

    export CLASSMESH_TARGET=127.0.0.1:50051          # `classmesh up` prints it (grpc: ...)
    export CLASSMESH_TENANT_ID=...                    # `classmesh tenant create` prints these
    export CLASSMESH_KEY_ID=ck_...
    export CLASSMESH_KEY_SECRET=...
    python sdk/python/examples/lms_class.py --students 3

1. mint a short-lived backend token with the tenant's API key (admin role, all sessions);
2. schedule a class for an instructor, starting in 5 minutes (it may start 10 minutes early);
3. start it (this also creates the media router when MediaService runs);
4. watch the roster in a background task (WatchSession resumes by itself after drops);
5. (`--students N`: N demo students join with their own tokens, as browsers would);
6. admit everyone waiting in the lobby, then end the class;
7. print the attendance report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from classmesh_sdk import AccessToken, ClassMeshClient, ClassMeshError

ROSTER_EVENTS = {
    "participant_joined": "joined",
    "participant_admitted": "admitted",
    "participant_left": "left",
    "participant_removed": "removed",
    "participant_disconnected": "disconnected",
    "participant_reconnected": "reconnected",
}


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"lms_class: set {name}")
    return value


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def _seconds(duration: object) -> float:
    return float(duration.ToTimedelta().total_seconds())  # type: ignore[attr-defined]


async def watch_roster(client: ClassMeshClient, session_id: str) -> None:
    """Print roster changes until the class ends (the stream then ends by itself)."""
    async for item in client.sessions.watch_session(session_id=session_id):
        event = item.event
        kind = event.WhichOneof("payload")
        if kind in ROSTER_EVENTS:
            p = getattr(event, kind).participant
            print(f"  [{event.seq:>3}] {p.display_name or p.user_id}: {ROSTER_EVENTS[kind]}")
        elif kind in ("session_started", "session_ended"):
            print(f"  [{event.seq:>3}] class {kind.removeprefix('session_')}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=0, help="demo students who join")
    parser.add_argument("--instructor", default="teacher-1", help="instructor's LMS user id")
    args = parser.parse_args()

    target = _env("CLASSMESH_TARGET")
    tenant = _env("CLASSMESH_TENANT_ID")
    key = AccessToken(_env("CLASSMESH_KEY_ID"), _env("CLASSMESH_KEY_SECRET")).with_tenant(tenant)
    backend_token = (
        key.with_identity("lms-backend", "LMS backend")
        .with_grants(session="*", role="admin", caps=["moderate", "record", "admin"])
        .with_ttl(timedelta(minutes=15))
        .to_jwt()
    )

    async with ClassMeshClient(target, token=backend_token) as lms:
        start = datetime.now(UTC) + timedelta(minutes=5)
        session = (
            await lms.sessions.create_session(
                title="Algebra I - lesson 4",
                instructor_id=args.instructor,
                scheduled_start=_ts(start),
                scheduled_end=_ts(start + timedelta(minutes=50)),
                capacity=30,
                lms_course_ref="algebra-1",
                lms_lesson_ref="lesson-4",
            )
        ).session
        print(f"scheduled {session.id} ({session.title}), join link {session.join_link_token}")

        started = await lms.sessions.start_session(session_id=session.id)
        print(f"started at {started.session.actual_start.ToDatetime():%H:%M:%S} (5 min early)")
        watcher = asyncio.create_task(watch_roster(lms, session.id))

        students = []
        for n in range(args.students):
            token = (
                key.with_identity(f"student-{uuid.uuid4().hex[:6]}", f"Student {n + 1}")
                .with_grants(session=session.id, role="student", caps=["subscribe", "chat"])
                .with_ttl(timedelta(minutes=15))
                .to_jwt()
            )
            student = ClassMeshClient(target, token=token)
            students.append(student)
            await student.sessions.join_session(session_id=session.id)

        await asyncio.sleep(0.5)  # let the lobby fill (and the roster print)
        admitted = await lms.sessions.admit_participants(session_id=session.id, all=True)
        print(f"admitted {len(admitted.admitted)} from the lobby")

        await asyncio.sleep(0.5)
        ended = await lms.sessions.end_session(session_id=session.id, reason="lesson over")
        print(f"ended at {ended.session.actual_end.ToDatetime():%H:%M:%S}")
        await asyncio.wait_for(watcher, 10)
        for student in students:
            await student.close()

        report = await lms.sessions.get_attendance(session_id=session.id)
        length = _seconds(report.session_duration)
        print(f"attendance ({report.total_size} participants, class of {length:.1f} s):")
        for rec in report.records:
            print(
                f"  {rec.display_name:<12} joins={rec.join_count} "
                f"connected={_seconds(rec.total_connected):.1f}s "
                f"lobby={_seconds(rec.lobby_wait):.1f}s ratio={rec.attendance_ratio:.2f}"
            )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(asyncio.run(main()))
    except ClassMeshError as exc:
        sys.exit(f"lms_class: {exc.code.name} {exc.reason}: {exc.message}")
