"""The bus's per-subscriber queue policy, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from classmesh.core.bus import _Subscriber, channel_name
from classmesh.core.events import EventRecord


def rec(seq: int, tenant: str = "t") -> EventRecord:
    return EventRecord(
        tenant_id=tenant,
        session_id="s",
        seq=seq,
        type="x",
        payload={},
        created_at=datetime.now(UTC),
    )


def test_full_queue_is_cleared_and_marked_for_catch_up() -> None:
    sub = _Subscriber("t", maxsize=3, after_seq=0)
    sub.needs_catchup = False
    assert [sub.offer(rec(i)) for i in (1, 2, 3)] == [False, False, False]
    assert sub.offer(rec(4)) is True  # overflow: lagging
    assert len(sub.queue) == 0 and sub.needs_catchup and sub.lag_count == 1
    assert sub.wakeup.is_set()
    assert sub.offer(rec(5)) is False  # queues again after the drop
    assert [r.seq for r in sub.queue] == [5]


def test_duplicates_and_old_events_are_not_queued() -> None:
    sub = _Subscriber("t", maxsize=10, after_seq=4)
    sub.offer(rec(3))
    sub.offer(rec(4))
    sub.offer(rec(5))
    sub.offer(rec(5))
    assert [r.seq for r in sub.queue] == [5]
    assert not sub.behind(5) and sub.behind(6)


def test_channel_name() -> None:
    assert channel_name("classmesh", "abc") == "classmesh:session:abc"
