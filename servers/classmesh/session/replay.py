"""Folding a session's event log back into its state (the tables must equal the fold).

    status, roster = fold_session_events(events)

`events` are `classmesh.events.v1.Event`s (as WatchSession / ListSessionEvents return them)
or `core.events.EventRecord`s (as `read_events` returns them), in seq order. The result uses
the database's words so it compares directly with the tables:

* `status`: `sessions.status` ('scheduled', 'live', 'ended', 'cancelled'; '' for no events);
* `roster`: `{user_id: session_participants.status}` for every user who ever joined
  ('lobby', 'admitted', 'disconnected', 'left', 'removed').

`seats(roster)` is then `sessions.current_occupancy`. Events of other services (chat, polls,
...) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from classmesh.core.eventproto import to_event
from classmesh.core.events import EventRecord
from classmesh.events.v1 import events_pb2
from classmesh.session.v1 import session_pb2

__all__ = ["fold_session_events", "seats", "SESSION_STATUS_WORDS", "PARTICIPANT_STATUS_WORDS"]

S = session_pb2

SESSION_STATUS_WORDS = {
    S.SESSION_STATUS_SCHEDULED: "scheduled",
    S.SESSION_STATUS_LIVE: "live",
    S.SESSION_STATUS_ENDED: "ended",
    S.SESSION_STATUS_CANCELLED: "cancelled",
}
PARTICIPANT_STATUS_WORDS = {
    S.PARTICIPANT_STATUS_LOBBY: "lobby",
    S.PARTICIPANT_STATUS_ADMITTED: "admitted",
    S.PARTICIPANT_STATUS_REMOVED: "removed",
    S.PARTICIPANT_STATUS_LEFT: "left",
    S.PARTICIPANT_STATUS_DISCONNECTED: "disconnected",
}
_SEATED = frozenset({"lobby", "admitted", "disconnected"})

#: Event type -> the session status it leads to (None: the snapshot's status).
_SESSION_EVENTS: dict[str, str | None] = {
    "session_created": None,
    "session_updated": None,
    "session_started": "live",
    "session_ended": "ended",
    "session_cancelled": "cancelled",
}
#: Event type -> the participant status it leads to (None: the snapshot's status, used
#: where the event allows either, e.g. a join lands in the lobby or is admitted directly).
_PARTICIPANT_EVENTS: dict[str, str | None] = {
    "participant_joined": None,
    "participant_reconnected": None,
    "participant_admitted": "admitted",
    "participant_removed": "removed",
    "participant_left": "left",
    "participant_disconnected": "disconnected",
}


def fold_session_events(
    events: Iterable[events_pb2.Event | EventRecord],
) -> tuple[str, dict[str, str]]:
    """(session status, {user_id: participant status}) after applying `events` in order."""
    status = ""
    roster: dict[str, str] = {}
    for item in events:
        event = to_event(item) if isinstance(item, EventRecord) else item
        kind = event.WhichOneof("payload")
        if kind is None:
            continue
        payload = getattr(event, kind)
        if kind in _SESSION_EVENTS:
            fixed = _SESSION_EVENTS[kind]
            status = fixed or SESSION_STATUS_WORDS.get(payload.session.status, status) or status
            if kind == "session_ended":
                # Nobody stays in an ended session (End lets everyone go first; this keeps
                # the fold right for logs written before that rule too).
                for user, st in roster.items():
                    if st in _SEATED:
                        roster[user] = "left"
        elif kind in _PARTICIPANT_EVENTS:
            participant = payload.participant
            fixed = _PARTICIPANT_EVENTS[kind]
            word = fixed or PARTICIPANT_STATUS_WORDS.get(participant.status)
            if participant.user_id and word:
                roster[participant.user_id] = word
    return status, roster


def seats(roster: dict[str, str]) -> int:
    """Seats held by a folded roster (lobby, admitted, disconnected in grace)."""
    return sum(1 for st in roster.values() if st in _SEATED)
