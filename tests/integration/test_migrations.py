"""Migrations: complete schema up, all the way down, up again; locking; status; checks."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from classmesh.core.migrate import (
    discover,
    migrate_down,
    migrate_up,
    migration_status,
    run_migrate_command,
)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
START = datetime(2030, 1, 1, 10, tzinfo=UTC)

EXPECTED_MIGRATIONS = [
    "0001_core",
    "0002_sessions",
    "0003_breakout",
    "0004_interaction",
    "0005_recording",
    "0006_admin",
    "0007_session_service",
    "0008_interaction_service",
    "0009_webhook_delivery",
    "0010_breakout_service",
]

EXPECTED_TABLES = {
    "tenants", "api_keys", "users", "idempotency_keys",
    "sessions", "session_participants", "session_events", "guest_tokens", "session_logs",
    "session_analytics",
    "breakout_rooms", "room_assignments",
    "chat_messages", "hand_raises", "questions", "question_votes", "session_polls",
    "poll_responses", "whiteboards", "study_timers", "studio_scenes", "studio_assets",
    "studio_state",
    "session_recordings", "recording_jobs", "artifacts",
    "audit_logs", "webhooks", "webhook_deliveries", "webhook_cursors",
}  # fmt: skip

EXPECTED_ENUMS = {
    "session_kind": ["class", "study_room"],
    "session_status": ["scheduled", "live", "ended", "cancelled"],
    "participant_role": ["instructor", "assistant", "student", "guest", "admin"],
    "participant_status": ["lobby", "admitted", "removed", "left", "disconnected"],
    "leave_reason": ["left", "disconnected", "removed", "session_ended", "room_closed", "moved"],
    "breakout_room_status": ["open", "closed"],
    "chat_message_type": ["text", "emoji", "system", "poll"],
    "chat_scope": ["main", "breakout"],
    "hand_raise_status": ["raised", "lowered", "acknowledged"],
    "question_status": ["pending", "approved", "rejected"],
    "poll_status": ["open", "closed"],
    "timer_status": ["idle", "running", "paused", "completed"],
    "studio_asset_kind": ["slide", "whiteboard", "image", "video", "document"],
    "processing_status": ["pending", "processing", "available", "failed"],
    "job_state": ["queued", "running", "succeeded", "failed", "dead"],
    "artifact_type": ["transcript", "captions", "chapters", "highlights", "thumbnail"],
}

EXPECTED_CHECKS = {
    "tenants_name_check",
    "api_keys_id_check", "api_keys_role_check", "api_keys_secret_check",
    "users_display_name_check", "users_email_check", "users_external_id_check",
    "idempotency_keys_fingerprint_check", "idempotency_keys_method_check",
    "idempotency_keys_request_id_check", "idempotency_keys_ttl_check",
    "sessions_actual_times_check", "sessions_capacity_check", "sessions_description_check",
    "sessions_instructor_id_check", "sessions_join_link_token_check", "sessions_last_seq_check",
    "sessions_lms_course_ref_check", "sessions_lms_lesson_ref_check", "sessions_occupancy_check",
    "sessions_schedule_check", "sessions_settings_check", "sessions_title_check",
    "session_participants_connected_seconds_check", "session_participants_display_name_check",
    "session_participants_permissions_check", "session_participants_removed_reason_check",
    "session_participants_user_id_check",
    "session_participants_join_count_check", "session_participants_lobby_wait_check",
    "session_participants_connected_ms_check",
    "session_participants_study_session_id_check", "session_participants_email_check",
    "sessions_media_router_id_check",
    "session_events_actor_check", "session_events_payload_check",
    "session_events_request_id_check", "session_events_seq_check", "session_events_type_check",
    "guest_tokens_display_name_check", "guest_tokens_expiry_check",
    "guest_tokens_token_hash_check",
    "session_logs_duration_check", "session_logs_times_check", "session_logs_user_id_check",
    "session_logs_kind_check", "session_logs_visit_reason_check",
    "session_logs_display_name_check", "session_logs_detail_check",
    "session_logs_study_session_id_check",
    "session_analytics_counts_check", "session_analytics_metrics_check",
    "breakout_rooms_capacity_check", "breakout_rooms_closed_check",
    "breakout_rooms_closes_at_check", "breakout_rooms_name_check",
    "breakout_rooms_time_limit_check",
    "room_assignments_times_check",
    "chat_messages_body_check", "chat_messages_deleted_check", "chat_messages_scope_check",
    "chat_messages_user_id_check",
    "hand_raises_user_id_check",
    "questions_answer_text_check", "questions_answered_check", "questions_body_check",
    "questions_user_id_check", "questions_votes_check",
    "question_votes_value_check",
    "session_polls_closed_check", "session_polls_options_check", "session_polls_question_check",
    "poll_responses_selected_check",
    "whiteboards_canvas_size_check", "whiteboards_canvas_type_check", "whiteboards_version_check",
    "study_timers_duration_check", "study_timers_elapsed_check", "study_timers_paused_check",
    "study_timers_running_check",
    "studio_scenes_layout_check", "studio_scenes_metadata_check", "studio_scenes_name_check",
    "studio_scenes_slides_check",
    "studio_assets_content_url_check", "studio_assets_metadata_check",
    "studio_assets_position_check",
    "session_recordings_attempts_check", "session_recordings_available_check",
    "session_recordings_duration_check", "session_recordings_format_check",
    "session_recordings_size_check", "session_recordings_stopped_check",
    "recording_jobs_attempts_check", "recording_jobs_kind_check", "recording_jobs_payload_check",
    "artifacts_size_check",
    "audit_logs_action_check", "audit_logs_actor_id_check", "audit_logs_metadata_check",
    "audit_logs_reason_check",
    "webhooks_description_check", "webhooks_secret_check", "webhooks_url_check",
    "webhook_deliveries_attempts_check",
    "webhooks_consecutive_failures_check", "webhook_cursors_seq_check",
    "breakout_rooms_close_reason_check", "breakout_rooms_router_id_check",
    "chat_messages_seq_check",
    "session_polls_max_selections_check", "session_polls_closes_at_check",
    "whiteboards_size_bytes_check", "whiteboards_updated_actor_check",
    "study_timers_mode_check", "study_timers_elapsed_ms_check", "study_timers_ends_at_check",
    "study_timers_completed_focus_check", "study_timers_updated_actor_check",
    "studio_scenes_deck_id_check", "studio_scenes_deck_url_check",
    "studio_state_layout_check", "studio_state_deck_id_check", "studio_state_slide_check",
    "studio_state_slide_url_check", "studio_state_seq_check",
    "studio_state_updated_actor_check",
}  # fmt: skip

# unique constraints: name -> (table, columns)
EXPECTED_UNIQUES = {
    "tenants_name_key": ("tenants", ["name"]),
    "users_tenant_external_id_key": ("users", ["tenant_id", "external_id"]),
    "sessions_tenant_id_id_key": ("sessions", ["tenant_id", "id"]),
    "sessions_join_link_token_key": ("sessions", ["join_link_token"]),
    "session_participants_session_user_key": ("session_participants", ["session_id", "user_id"]),
    "session_participants_tenant_id_id_key": ("session_participants", ["tenant_id", "id"]),
    "session_events_session_request_id_key": ("session_events", ["session_id", "request_id"]),
    "guest_tokens_token_hash_key": ("guest_tokens", ["token_hash"]),
    "breakout_rooms_tenant_id_id_key": ("breakout_rooms", ["tenant_id", "id"]),
    "room_assignments_room_participant_key": (
        "room_assignments",
        ["breakout_room_id", "participant_id"],
    ),
    "questions_tenant_id_id_key": ("questions", ["tenant_id", "id"]),
    "question_votes_question_user_key": ("question_votes", ["question_id", "user_id"]),
    "session_polls_tenant_id_id_key": ("session_polls", ["tenant_id", "id"]),
    "poll_responses_poll_user_key": ("poll_responses", ["poll_id", "user_id"]),
    "whiteboards_session_room_key": ("whiteboards", ["session_id", "breakout_room_id"]),
    "study_timers_session_room_key": ("study_timers", ["session_id", "breakout_room_id"]),
    "studio_scenes_tenant_id_id_key": ("studio_scenes", ["tenant_id", "id"]),
    "studio_assets_scene_position_key": ("studio_assets", ["scene_id", "position"]),
    "session_recordings_tenant_id_id_key": ("session_recordings", ["tenant_id", "id"]),
    "artifacts_session_recording_type_key": (
        "artifacts",
        ["session_id", "recording_id", "type"],
    ),
    "webhooks_tenant_id_id_key": ("webhooks", ["tenant_id", "id"]),
    "webhook_deliveries_webhook_event_key": ("webhook_deliveries", ["webhook_id", "event_key"]),
}

EXPECTED_PRIMARY_KEYS = {
    "session_events": ["session_id", "seq"],
    "idempotency_keys": ["tenant_id", "request_id"],
    "api_keys": ["id"],
    "sessions": ["id"],
    "session_analytics": ["session_id"],
    "studio_state": ["session_id"],
}

# indexes that are not backing a constraint: name -> (table, unique?)
EXPECTED_INDEXES = {
    "api_keys_tenant_idx": ("api_keys", False),
    "idempotency_keys_expires_idx": ("idempotency_keys", False),
    "sessions_tenant_status_idx": ("sessions", False),
    "sessions_tenant_instructor_idx": ("sessions", False),
    "sessions_tenant_scheduled_start_idx": ("sessions", False),
    "sessions_tenant_kind_idx": ("sessions", False),
    "sessions_scheduled_start_idx": ("sessions", False),
    "session_participants_tenant_session_status_idx": ("session_participants", False),
    "session_participants_tenant_user_idx": ("session_participants", False),
    "session_participants_session_admitted_idx": ("session_participants", False),
    "session_participants_presence_idx": ("session_participants", False),
    "session_participants_grace_idx": ("session_participants", False),
    "session_events_tenant_created_idx": ("session_events", False),
    "guest_tokens_tenant_session_idx": ("guest_tokens", False),
    "session_logs_tenant_session_idx": ("session_logs", False),
    "session_logs_tenant_user_idx": ("session_logs", False),
    "session_logs_tenant_created_idx": ("session_logs", False),
    "session_analytics_tenant_idx": ("session_analytics", False),
    "breakout_rooms_tenant_session_idx": ("breakout_rooms", False),
    "breakout_rooms_created_idx": ("breakout_rooms", False),
    "breakout_rooms_open_name_key": ("breakout_rooms", True),
    "breakout_rooms_closes_at_idx": ("breakout_rooms", False),
    "room_assignments_one_active_key": ("room_assignments", True),
    "room_assignments_tenant_session_idx": ("room_assignments", False),
    "room_assignments_participant_idx": ("room_assignments", False),
    "chat_messages_tenant_session_sent_idx": ("chat_messages", False),
    "chat_messages_room_sent_idx": ("chat_messages", False),
    "chat_messages_tenant_user_idx": ("chat_messages", False),
    "hand_raises_one_active_key": ("hand_raises", True),
    "hand_raises_queue_idx": ("hand_raises", False),
    "questions_tenant_session_score_idx": ("questions", False),
    "questions_tenant_user_idx": ("questions", False),
    "question_votes_tenant_user_idx": ("question_votes", False),
    "session_polls_tenant_session_idx": ("session_polls", False),
    "poll_responses_tenant_user_idx": ("poll_responses", False),
    "whiteboards_tenant_session_idx": ("whiteboards", False),
    "study_timers_tenant_session_idx": ("study_timers", False),
    "studio_scenes_one_active_key": ("studio_scenes", True),
    "studio_scenes_tenant_session_idx": ("studio_scenes", False),
    "studio_assets_tenant_scene_idx": ("studio_assets", False),
    "session_recordings_one_active_key": ("session_recordings", True),
    "session_recordings_tenant_session_idx": ("session_recordings", False),
    "session_recordings_status_idx": ("session_recordings", False),
    "session_recordings_available_idx": ("session_recordings", False),
    "recording_jobs_ready_idx": ("recording_jobs", False),
    "recording_jobs_tenant_state_idx": ("recording_jobs", False),
    "recording_jobs_recording_idx": ("recording_jobs", False),
    "artifacts_tenant_session_idx": ("artifacts", False),
    "audit_logs_tenant_created_idx": ("audit_logs", False),
    "audit_logs_tenant_session_idx": ("audit_logs", False),
    "audit_logs_tenant_actor_idx": ("audit_logs", False),
    "webhooks_tenant_idx": ("webhooks", False),
    "webhook_deliveries_ready_idx": ("webhook_deliveries", False),
    "webhook_deliveries_tenant_webhook_idx": ("webhook_deliveries", False),
    "webhook_deliveries_running_idx": ("webhook_deliveries", False),
    "webhook_cursors_tenant_idx": ("webhook_cursors", False),
    "breakout_rooms_session_order_idx": ("breakout_rooms", False),
    "chat_messages_scope_seq_idx": ("chat_messages", False),
    "chat_messages_sent_at_idx": ("chat_messages", False),
    "session_polls_closes_at_idx": ("session_polls", False),
    "study_timers_ends_at_idx": ("study_timers", False),
    "studio_state_tenant_idx": ("studio_state", False),
}


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def _enums(conn: asyncpg.Connection) -> dict[str, list[str]]:
    rows = await conn.fetch(
        "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder) AS labels "
        "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "JOIN pg_enum e ON e.enumtypid = t.oid WHERE n.nspname = 'public' GROUP BY t.typname"
    )
    return {r["typname"]: list(r["labels"]) for r in rows}


async def _constraints(conn: asyncpg.Connection, kind: str) -> dict[str, tuple[str, list[str]]]:
    rows = await conn.fetch(
        "SELECT c.conname, cl.relname, "
        "array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(attnum, ord) "
        "      JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
        "      ORDER BY k.ord) AS cols "
        "FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid "
        "JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = 'public' AND c.contype::text = $1",
        kind,
    )
    return {r["conname"]: (r["relname"], list(r["cols"])) for r in rows}


async def _free_indexes(conn: asyncpg.Connection) -> dict[str, tuple[str, bool]]:
    rows = await conn.fetch(
        "SELECT ic.relname AS name, tc.relname AS tbl, i.indisunique AS uniq "
        "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid "
        "JOIN pg_class tc ON tc.oid = i.indrelid JOIN pg_namespace n ON n.oid = ic.relnamespace "
        "WHERE n.nspname = 'public' "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
    )
    return {r["name"]: (r["tbl"], r["uniq"]) for r in rows}


async def _assert_full_schema(conn: asyncpg.Connection) -> None:
    assert await _tables(conn) == EXPECTED_TABLES | {"schema_migrations"}
    assert await _enums(conn) == EXPECTED_ENUMS
    assert set(await _constraints(conn, "c")) == EXPECTED_CHECKS
    assert await _constraints(conn, "u") == EXPECTED_UNIQUES
    pks = await _constraints(conn, "p")
    for table, cols in EXPECTED_PRIMARY_KEYS.items():
        assert [c for t, c in pks.values() if t == table] == [cols], table
    assert await _free_indexes(conn) == EXPECTED_INDEXES
    # every tenant-owned table carries tenant_id, behind a foreign key and a leading index
    for table in EXPECTED_TABLES - {"tenants"}:
        has_tenant = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
            "'public' AND table_name = $1 AND column_name = 'tenant_id' AND is_nullable = 'NO')",
            table,
        )
        assert has_tenant, f"{table} has no NOT NULL tenant_id"
        leading = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
            "WHERE t.relname = $1 AND a.attname = 'tenant_id')",
            table,
        )
        assert leading, f"{table} has no index starting with tenant_id"
        fk = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (c.conkey) "
            "WHERE t.relname = $1 AND c.contype = 'f' AND a.attname = 'tenant_id')",
            table,
        )
        assert fk, f"{table}.tenant_id is not covered by a foreign key"


async def test_discover_lists_every_migration_with_up_and_down() -> None:
    assert [m.name for m in discover(MIGRATIONS_DIR)] == EXPECTED_MIGRATIONS


async def test_up_down_up_leaves_exactly_the_schema(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await migrate_up(conn, MIGRATIONS_DIR) == EXPECTED_MIGRATIONS
        await _assert_full_schema(conn)
        assert await migrate_up(conn, MIGRATIONS_DIR) == []

        reverted = await migrate_down(conn, MIGRATIONS_DIR, steps=100)
        assert reverted == list(reversed(EXPECTED_MIGRATIONS))
        assert await _tables(conn) == {"schema_migrations"}
        assert await _enums(conn) == {}
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
        leftovers = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relname NOT LIKE 'schema_migrations%'"
        )
        assert leftovers == 0
        assert await migrate_down(conn, MIGRATIONS_DIR) == []

        assert await migrate_up(conn, MIGRATIONS_DIR) == EXPECTED_MIGRATIONS
        await _assert_full_schema(conn)
    finally:
        await conn.close()


async def test_down_one_step_at_a_time(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate_up(conn, MIGRATIONS_DIR)
        for name in reversed(EXPECTED_MIGRATIONS):
            assert await migrate_down(conn, MIGRATIONS_DIR) == [name]
        with pytest.raises(ValueError):
            await migrate_down(conn, MIGRATIONS_DIR, steps=0)
    finally:
        await conn.close()


async def test_status_and_command_output(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await migration_status(conn, MIGRATIONS_DIR) == [
            (name, False) for name in EXPECTED_MIGRATIONS
        ]
        await migrate_up(conn, MIGRATIONS_DIR)
        await migrate_down(conn, MIGRATIONS_DIR, steps=2)
        assert await migration_status(conn, MIGRATIONS_DIR) == [
            (name, i < len(EXPECTED_MIGRATIONS) - 2) for i, name in enumerate(EXPECTED_MIGRATIONS)
        ]
    finally:
        await conn.close()

    # the CLI entry point finds the repository's migrations/ by itself
    status = await run_migrate_command(empty_database_url, "status")
    assert status.splitlines() == [
        "applied  0001_core",
        "applied  0002_sessions",
        "applied  0003_breakout",
        "applied  0004_interaction",
        "applied  0005_recording",
        "applied  0006_admin",
        "applied  0007_session_service",
        "applied  0008_interaction_service",
        "pending  0009_webhook_delivery",
        "pending  0010_breakout_service",
    ]
    up = await run_migrate_command(empty_database_url, "up")
    assert up.splitlines() == [
        "applied  0009_webhook_delivery",
        "applied  0010_breakout_service",
    ]
    assert await run_migrate_command(empty_database_url, "up") == "already up to date"
    down = await run_migrate_command(empty_database_url, "down", steps=2)
    assert down.splitlines() == [
        "reverted 0010_breakout_service",
        "reverted 0009_webhook_delivery",
    ]
    with pytest.raises(ValueError):
        await run_migrate_command(empty_database_url, "sideways")


async def test_concurrent_runners_apply_each_migration_once(empty_database_url: str) -> None:
    conns = [await asyncpg.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate_up(c, MIGRATIONS_DIR) for c in conns))
        applied = sorted(name for names in results for name in names)
        assert applied == EXPECTED_MIGRATIONS
        assert sorted(len(r) for r in results) == [0, 0, len(EXPECTED_MIGRATIONS)]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    finally:
        for c in conns:
            await c.close()


# --- constraints against real rows -------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def insert_tenant(conn: asyncpg.Connection) -> uuid.UUID:
    tenant_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"t-{secrets.token_hex(6)}"
    )
    return tenant_id


async def insert_session(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, **overrides: Any
) -> uuid.UUID:
    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "title": "Algebra I",
        "instructor_id": "teacher-1",
        "scheduled_start": START,
        "scheduled_end": datetime(2030, 1, 1, 11, tzinfo=UTC),
        "capacity": 30,
        "join_link_token": secrets.token_hex(32),
    }
    values.update(overrides)
    cols = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    session_id: uuid.UUID = await conn.fetchval(
        f"INSERT INTO sessions ({cols}) VALUES ({params}) RETURNING id", *values.values()
    )
    return session_id


async def insert_room(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, session_id: uuid.UUID, **overrides: Any
) -> uuid.UUID:
    values: dict[str, Any] = {"capacity": 10, "time_limit_minutes": 15, "name": "Room 1"}
    values.update(overrides)
    room_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO breakout_rooms (tenant_id, session_id, name, capacity, time_limit_minutes) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING id",
        tenant_id,
        session_id,
        values["name"],
        values["capacity"],
        values["time_limit_minutes"],
    )
    return room_id


async def insert_poll(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, session_id: uuid.UUID, options: list[str]
) -> uuid.UUID:
    poll_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO session_polls (tenant_id, session_id, question, options, created_by) "
        "VALUES ($1, $2, 'Which?', $3::jsonb, 'teacher-1') RETURNING id",
        tenant_id,
        session_id,
        json.dumps(options),
    )
    return poll_id


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"capacity": 0}, "sessions_capacity_check"),
        ({"capacity": 1001}, "sessions_capacity_check"),
        ({"title": ""}, "sessions_title_check"),
        ({"title": "   "}, "sessions_title_check"),
        ({"scheduled_end": START}, "sessions_schedule_check"),
        ({"scheduled_end": datetime(2030, 1, 1, 9, tzinfo=UTC)}, "sessions_schedule_check"),
        ({"join_link_token": "short"}, "sessions_join_link_token_check"),
    ],
)
async def test_session_checks_reject_bad_rows(
    db: asyncpg.Connection, overrides: dict[str, Any], constraint: str
) -> None:
    tenant_id = await insert_tenant(db)
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await insert_session(db, tenant_id, **overrides)
    assert err.value.constraint_name == constraint


async def test_session_boundaries_are_accepted(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    for capacity in (1, 1000):
        await insert_session(db, tenant_id, capacity=capacity, title="x" * 255)


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"capacity": 1}, "breakout_rooms_capacity_check"),
        ({"capacity": 51}, "breakout_rooms_capacity_check"),
        ({"time_limit_minutes": 0}, "breakout_rooms_time_limit_check"),
        ({"time_limit_minutes": 121}, "breakout_rooms_time_limit_check"),
        ({"name": ""}, "breakout_rooms_name_check"),
    ],
)
async def test_breakout_checks_reject_bad_rows(
    db: asyncpg.Connection, overrides: dict[str, Any], constraint: str
) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await insert_room(db, tenant_id, session_id, **overrides)
    assert err.value.constraint_name == constraint


async def test_breakout_boundaries_are_accepted(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    await insert_room(db, tenant_id, session_id, name="a", capacity=2, time_limit_minutes=1)
    await insert_room(db, tenant_id, session_id, name="b", capacity=50, time_limit_minutes=120)
    await insert_room(db, tenant_id, session_id, name="c", time_limit_minutes=None)


@pytest.mark.parametrize("count", [0, 1, 11])
async def test_poll_option_count_is_checked(db: asyncpg.Connection, count: int) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await insert_poll(db, tenant_id, session_id, [f"o{i}" for i in range(count)])
    assert err.value.constraint_name == "session_polls_options_check"


async def test_poll_options_must_be_an_array(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO session_polls (tenant_id, session_id, question, options, created_by) "
            "VALUES ($1, $2, 'q', '{\"a\": 1}'::jsonb, 'u')",
            tenant_id,
            session_id,
        )


async def test_poll_responses_are_one_per_user(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    await insert_poll(db, tenant_id, session_id, [f"o{i}" for i in range(10)])
    poll_id = await insert_poll(db, tenant_id, session_id, ["yes", "no"])
    insert = (
        "INSERT INTO poll_responses (tenant_id, poll_id, user_id, selected_options) "
        "VALUES ($1, $2, 'student-1', $3)"
    )
    await db.execute(insert, tenant_id, poll_id, [1])
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, tenant_id, poll_id, [0])


async def test_one_raised_hand_per_user(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    raise_hand = (
        "INSERT INTO hand_raises (tenant_id, session_id, user_id) VALUES ($1, $2, 's1') "
        "RETURNING id"
    )
    first = await db.fetchval(raise_hand, tenant_id, session_id)
    with pytest.raises(asyncpg.UniqueViolationError) as err:
        await db.fetchval(raise_hand, tenant_id, session_id)
    assert err.value.constraint_name == "hand_raises_one_active_key"
    await db.execute("UPDATE hand_raises SET status = 'lowered' WHERE id = $1", first)
    await db.fetchval(raise_hand, tenant_id, session_id)


async def test_one_active_breakout_assignment_per_participant(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    room_a = await insert_room(db, tenant_id, session_id, name="A")
    room_b = await insert_room(db, tenant_id, session_id, name="B")
    participant = await db.fetchval(
        "INSERT INTO session_participants (tenant_id, session_id, user_id, display_name, role) "
        "VALUES ($1, $2, 's1', 'Sam', 'student') RETURNING id",
        tenant_id,
        session_id,
    )
    assign = (
        "INSERT INTO room_assignments (tenant_id, session_id, breakout_room_id, participant_id) "
        "VALUES ($1, $2, $3, $4) RETURNING id"
    )
    first = await db.fetchval(assign, tenant_id, session_id, room_a, participant)
    with pytest.raises(asyncpg.UniqueViolationError) as err:
        await db.fetchval(assign, tenant_id, session_id, room_b, participant)
    assert err.value.constraint_name == "room_assignments_one_active_key"
    await db.execute("UPDATE room_assignments SET left_at = now() WHERE id = $1", first)
    await db.fetchval(assign, tenant_id, session_id, room_b, participant)


async def test_main_room_whiteboard_is_unique(db: asyncpg.Connection) -> None:
    tenant_id = await insert_tenant(db)
    session_id = await insert_session(db, tenant_id)
    insert = "INSERT INTO whiteboards (tenant_id, session_id) VALUES ($1, $2)"
    await db.execute(insert, tenant_id, session_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, tenant_id, session_id)


async def test_rows_cannot_point_into_another_tenant(db: asyncpg.Connection) -> None:
    tenant_a = await insert_tenant(db)
    tenant_b = await insert_tenant(db)
    session_b = await insert_session(db, tenant_b)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO chat_messages (tenant_id, session_id, user_id, body) "
            "VALUES ($1, $2, 'u', 'hi')",
            tenant_a,
            session_b,
        )
