"""InteractionService's pure rules: text neutralisation, links, timer arithmetic, and what a
live feed shows to whom."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh.interaction import rules
from classmesh.interaction.v1 import interaction_pb2

IX = interaction_pb2
DANGER = ("<script", "javascript:", "vbscript:", "onerror=", "onload=", "<iframe", "<img", "<")


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("<>/=:\"' \t\nscriptjavaonerrolimg(1)AB")), max_size=80)
)
def test_neutralised_text_has_no_markup_handlers_or_script_urls(text: str) -> None:
    out = rules.neutralise(text)
    assert len(out) <= len(text)
    squashed = "".join(out.lower().split())
    for bad in DANGER:
        assert bad not in squashed, (text, out)
    assert rules.neutralise(out) == out  # stable: neutralising twice changes nothing


@given(
    st.text(
        alphabet=st.characters(
            blacklist_characters="<>=:", blacklist_categories=("Cc", "Cf", "Cs")
        ),
        max_size=200,
    )
)
def test_plain_text_passes_unchanged_but_trimmed(text: str) -> None:
    assert rules.neutralise(text) == text.strip()


def test_examples() -> None:
    assert rules.neutralise("<b>bold</b> move") == "bold move"
    assert rules.neutralise("x<script>\nsteal()\n</script>y") == "xy"
    assert rules.neutralise("a < b") == "a \uff1c b"
    assert rules.neutralise("JAVA script:x") == "JAVA script\uff1ax"
    assert rules.neutralise("img onerror = x") == "img onerror \uff1d x"
    assert rules.neutralise("\u202eevil\u200b") == "evil"
    assert rules.neutralise("\U0001f468\u200d\U0001f469\u200d\U0001f467") == (
        "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # the emoji joiner stays
    )


def test_links_and_duplicates() -> None:
    assert rules.count_links("see http://a.b and https://c.d or www.e.f") == 3
    assert rules.count_links("no links here") == 0
    assert rules.normalised_question("  What   IS\tthis? ") == "what is this?"


def test_timer_remaining() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    run = dict(duration_ms=60_000, elapsed_ms=0)
    assert rules.timer_remaining_ms(status="idle", ends_at=None, at=t0, **run) == 60_000
    ends = t0 + timedelta(seconds=45)
    assert rules.timer_remaining_ms(status="running", ends_at=ends, at=t0, **run) == 45_000
    assert rules.timer_remaining_ms(status="running", ends_at=t0, at=ends, **run) == 0
    assert (
        rules.timer_remaining_ms(
            status="paused", duration_ms=60_000, elapsed_ms=15_500, ends_at=None, at=t0
        )
        == 44_500
    )
    assert rules.timer_remaining_ms(status="completed", ends_at=None, at=t0, **run) == 0


def _chat(sender: str, recipient: str = "") -> events_pb2.Event:
    e = events_pb2.Event(seq=1)
    e.chat_message_posted.message.sender.user_id = sender
    e.chat_message_posted.message.recipient_user_id = recipient
    e.chat_message_posted.message.text = "hi"
    return e


def test_private_messages_are_for_sender_recipient_and_moderators() -> None:
    dm = _chat("a", "b")
    assert rules.view(rules.Viewer("a", False), dm) is dm
    assert rules.view(rules.Viewer("b", False), dm) is dm
    assert rules.view(rules.Viewer("c", False), dm) is None
    assert rules.view(rules.Viewer("t", True), dm) is dm
    public = _chat("a")
    assert rules.view(rules.Viewer("c", False), public) is public


def test_questions_under_review_or_hidden() -> None:
    e = events_pb2.Event(seq=2)
    q = e.question_asked.question
    q.status = IX.QUESTION_STATUS_PENDING_REVIEW
    q.author.CopyFrom(common_pb2.Actor(user_id="a"))
    q.text = "secret"
    assert rules.view(rules.Viewer("a", False), e) is e
    assert rules.view(rules.Viewer("b", False), e) is None
    m = events_pb2.Event(seq=3)
    m.question_moderated.question.CopyFrom(q)
    m.question_moderated.question.status = IX.QUESTION_STATUS_HIDDEN
    seen = rules.view(rules.Viewer("b", False), m)
    assert seen is not None and seen is not m
    assert seen.question_moderated.question.text == ""
    assert not seen.question_moderated.question.HasField("author")
    assert m.question_moderated.question.text == "secret"  # the shared event is untouched
    assert rules.view(rules.Viewer("t", True), m) is m


def test_open_poll_results_only_when_live_or_for_moderators() -> None:
    e = events_pb2.Event(seq=4)
    e.poll_results_changed.poll_id = "p"
    e.poll_results_changed.results.respondent_count = 3
    e.poll_results_changed.option_indexes.append(1)
    student = rules.view(rules.Viewer("s", False), e)
    assert student is not None and not student.poll_results_changed.HasField("results")
    assert list(student.poll_results_changed.option_indexes) == []
    assert e.poll_results_changed.results.respondent_count == 3
    assert rules.view(rules.Viewer("t", True), e) is e
    e.poll_results_changed.show_results_live = True
    assert rules.view(rules.Viewer("s", False), e) is e


def test_feed_types() -> None:
    assert "chat_message_posted" in rules.INTERACTION_TYPES
    assert "slide_changed" in rules.INTERACTION_TYPES
    assert "participant_joined" not in rules.FEED_TYPES
    assert rules.TERMINAL_TYPES <= rules.ANNOUNCEMENTS
