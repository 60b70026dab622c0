"""Pure rules of InteractionService: text neutralisation, limits, timer arithmetic, who sees
which event. No I/O here, so every rule is unit-tested directly
(tests/unit/test_interaction_rules.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from classmesh.events.v1 import events_pb2
from classmesh.interaction.v1 import interaction_pb2

__all__ = [
    "ANNOUNCEMENTS",
    "FEED_TYPES",
    "INTERACTION_TYPES",
    "MODERATOR_ROLES",
    "TERMINAL_TYPES",
    "Viewer",
    "count_links",
    "neutralise",
    "timer_remaining_ms",
    "view",
]

IX = interaction_pb2

#: Token roles that moderate a class (delete chat, acknowledge hands, polls, Q&A, studio).
MODERATOR_ROLES = frozenset({"instructor", "assistant", "admin"})

_ONEOF = events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]
#: Event types InteractionService appends (fields 40-63 of the Event payload oneof).
INTERACTION_TYPES = frozenset(f.name for f in _ONEOF.fields if 40 <= f.number < 70)
#: Session-wide events a room feed carries as announcements: the session's end and the
#: breakout lifecycle (broadcasts, moves, closing) that tells a client to change rooms.
ANNOUNCEMENTS = frozenset(
    {
        "session_started",
        "session_ended",
        "session_cancelled",
        "session_deleted",
        "participant_removed",
        "breakout_rooms_created",
        "participant_assigned",
        "participant_moved",
        "breakout_broadcast",
        "breakout_rooms_extended",
        "breakout_room_closed",
        "breakout_rooms_closed",
    }
)
#: What Subscribe and Connect stream.
FEED_TYPES = INTERACTION_TYPES | ANNOUNCEMENTS
#: After one of these the session is over and a feed ends.
TERMINAL_TYPES = frozenset({"session_ended", "session_cancelled", "session_deleted"})

# ------------------------------------------------------------------------ text

# Whole elements whose content is code or markup, never text.
_BLOCKS = re.compile(
    r"<\s*(script|style|iframe|object|embed|template|noscript|svg|math)\b.*?"
    r"(?:<\s*/\s*\1\s*>|$)",
    re.IGNORECASE | re.DOTALL,
)
# Anything a browser parses as a tag, comment, doctype or processing instruction ("a < b"
# is not a tag: a name must follow the bracket).
_TAGS = re.compile(r"<[/!?]?[A-Za-z][^<>]*>|<!--.*?(?:-->|$)", re.DOTALL)
# URL schemes that run code, spelled with any case and whitespace inside (browsers drop
# tabs and newlines inside a URL): their colon is replaced.
_SCHEMES = re.compile(
    r"((?:j\s*a\s*v\s*a|v\s*b)\s*s\s*c\s*r\s*i\s*p\s*t\s*|d\s*a\s*t\s*a\s*):",
    re.IGNORECASE,
)
# Inline event handler attributes (onerror=, onload = ...) anywhere: their '=' is replaced.
_HANDLERS = re.compile(r"(on[a-z]{2,}\s*)=", re.IGNORECASE)
# C0/C1 controls but tab and newline; zero-width and bidirectional overrides (the emoji
# zero-width joiner U+200D stays: it builds emoji sequences).
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200c\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]"
)


def neutralise(text: str) -> str:
    """Plain text that cannot act as HTML or script wherever a client puts it.

    Script-like elements go with their content, every other tag goes, invisible control
    characters go. What a reader may still need is kept but made inert with its full-width
    twin, which looks the same and means nothing to a browser: a lone `<`/`>` ("a < b"),
    the colon of `javascript:`/`vbscript:`/`data:`, the `=` of `onerror=`-like handlers.
    The result is never longer than the input.
    """
    out = _INVISIBLE.sub("", text)
    out = _BLOCKS.sub("", out)
    out = _TAGS.sub("", out)
    out = _SCHEMES.sub("\\1\uff1a", out)
    out = _HANDLERS.sub("\\1\uff1d", out)
    return out.replace("<", "\uff1c").replace(">", "\uff1e").strip()


_LINK = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)


def count_links(text: str) -> int:
    return len(_LINK.findall(text))


def normalised_question(text: str) -> str:
    """What two questions must share to count as the same (spam: repeats)."""
    return " ".join(text.lower().split())


# ------------------------------------------------------------------------ timers


def timer_remaining_ms(
    *,
    status: str,
    duration_ms: int,
    elapsed_ms: int,
    ends_at: datetime | None,
    at: datetime,
) -> int:
    """Milliseconds left on a timer at time `at`."""
    if status == "running" and ends_at is not None:
        return max(0, int((ends_at - at) / timedelta(milliseconds=1)))
    if status == "paused":
        return max(0, duration_ms - elapsed_ms)
    if status == "completed":
        return 0
    return duration_ms


# ------------------------------------------------------------------------ feeds


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who a live feed streams to: what they may see of private and moderated content."""

    user_id: str
    moderator: bool


_HIDDEN_FROM_OTHERS = frozenset({IX.QUESTION_STATUS_PENDING_REVIEW, IX.QUESTION_STATUS_HIDDEN})


def _question_for(viewer: Viewer, q: interaction_pb2.Question) -> str:
    """'full', 'redacted' (id and status only) or 'none' for one viewer."""
    if viewer.moderator:
        return "full"
    own = bool(q.author.user_id) and q.author.user_id == viewer.user_id
    if q.status in _HIDDEN_FROM_OTHERS:
        return "full" if own else "redacted"
    if q.status == IX.QUESTION_STATUS_DISMISSED:
        return "redacted"
    return "full"


def view(viewer: Viewer, event: events_pb2.Event) -> events_pb2.Event | None:
    """The event as `viewer` may see it: itself, a redacted copy, or None (not for them).

    * a private chat message reaches its sender, its recipient and moderators;
    * a question awaiting review reaches moderators and its author; once hidden or
      dismissed, others get it without text and author (so their list drops it);
    * open poll results reach students only when the poll shows results live.

    `event` may be shared between feeds: it is never modified.
    """
    kind = event.WhichOneof("payload")
    if kind == "chat_message_posted":
        msg = event.chat_message_posted.message
        if msg.recipient_user_id and not viewer.moderator:
            if viewer.user_id not in (msg.recipient_user_id, msg.sender.user_id):
                return None
        return event
    if kind in ("question_asked", "question_answered", "question_moderated"):
        question = getattr(event, kind).question
        seen = _question_for(viewer, question)
        if seen == "full":
            return event
        if kind == "question_asked":
            return None
        out = events_pb2.Event()
        out.CopyFrom(event)
        q = getattr(out, kind).question
        q.text = ""
        q.ClearField("author")
        q.ClearField("answer")
        return out
    if kind == "poll_results_changed":
        changed = event.poll_results_changed
        if viewer.moderator or changed.show_results_live:
            return event
        out = events_pb2.Event()
        out.CopyFrom(event)
        out.poll_results_changed.ClearField("results")
        del out.poll_results_changed.option_indexes[:]
        return out
    return event


def setting(settings: Mapping[str, Any], name: str, default: bool) -> bool:
    value = settings.get(name, default)
    return bool(default if value is None else value)
