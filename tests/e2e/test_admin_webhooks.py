"""Webhooks end to end: `classmesh up` (plus a second AdminService process on the same
database) delivering session events to a real aiohttp receiver in the test.

The mesh runs with a small retry policy (3 attempts, 50-200 ms backoff, 100 ms polls) so
retries and dead letters happen within the test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from classmesh.admin.v1 import admin_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    verify_webhook,
)
from tests.support.classroom import Mesh, add_student, classroom_mesh, live_class, mesh_env
from tests.support.mesh import MeshProcess, start_mesh

MAX_ATTEMPTS = 3
MAX_WEBHOOKS = 8
WEBHOOK_ENV = {
    "CLASSMESH_WEBHOOK_POLL_INTERVAL_SECONDS": "0.1",
    "CLASSMESH_WEBHOOK_BACKOFF_BASE_SECONDS": "0.05",
    "CLASSMESH_WEBHOOK_BACKOFF_MAX_SECONDS": "0.2",
    "CLASSMESH_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "CLASSMESH_WEBHOOK_TIMEOUT_SECONDS": "3",
    "CLASSMESH_WEBHOOK_MAX_PER_TENANT": str(MAX_WEBHOOKS),
    # The receiver listens on loopback (test_admin_webhook_guard.py runs with the guard on).
    "CLASSMESH_WEBHOOK_ALLOW_PRIVATE": "1",
}
#: Functional deadline for a delivery in these tests (polls are 0.1 s; generous margin).
DEADLINE = 20.0


@dataclass
class Hit:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """An HTTP endpoint per path; each path answers with the statuses its `plan` gives."""

    base: str = ""
    hits: dict[str, list[Hit]] = field(default_factory=lambda: defaultdict(list))
    #: path -> (event id, attempt number) -> status
    plans: dict[str, Callable[[str, int], int]] = field(default_factory=dict)
    _seen: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    async def handle(self, request: web.Request) -> web.Response:
        path = request.match_info["name"]
        body = await request.read()
        self.hits[path].append(Hit(body, dict(request.headers)))
        event_id = request.headers.get("classmesh-event-id", "")
        self._seen[(path, event_id)] += 1
        plan = self.plans.get(path, lambda _e, _n: 200)
        return web.Response(status=plan(event_id, self._seen[(path, event_id)]))

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    def of_session(self, name: str, session_id: str) -> list[Hit]:
        return [
            h
            for h in self.hits[name]
            if h.headers.get("classmesh-event-id", "").startswith(session_id + ":")
        ]


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{name}", rx.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rx.base = f"http://127.0.0.1:{port}"
    try:
        yield rx
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "webhooks", WEBHOOK_ENV
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def second_admin(
    mesh: Mesh, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshProcess]:
    """Another AdminService process (its own dispatcher) on the same database."""
    logdir = tmp_path_factory.mktemp("admin2")
    env = mesh_env(mesh.dsn, redis_url, logdir, WEBHOOK_ENV)
    env["CLASSMESH_REDIS_PREFIX"] = mesh.env["CLASSMESH_REDIS_PREFIX"]
    proc = start_mesh(env, str(logdir / "stderr.log"), "serve", "admin")
    try:
        proc.wait_ready()
        assert proc.lines[-1] == "ready: classmesh.admin.v1.AdminService"
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.terminate()
        proc.kill()


async def _wait_for(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        await asyncio.sleep(0.05)


async def _create(mesh: Mesh, url: str, types: list[str] | None = None) -> tuple[str, str]:
    admin = mesh.client("hook-admin", "admin")
    resp = await admin.admin.create_webhook(
        request_id=str(uuid.uuid4()), url=url, event_types=types or [], description="e2e"
    )
    assert len(resp.secret) == 43 and resp.webhook.secret_hint == resp.secret[-4:]
    return resp.webhook.id, resp.secret


async def _delivery_rows(mesh: Mesh, webhook_id: str) -> list[dict[str, object]]:
    rows = await mesh.pool.fetch(
        "SELECT event_key, state::text AS state, attempts, response_status "
        "FROM webhook_deliveries WHERE webhook_id = $1",
        uuid.UUID(webhook_id),
    )
    return [dict(r) for r in rows]


# ------------------------------------------------------------------------- delivery


async def test_matching_events_arrive_signed_and_verify_with_the_sdk(
    mesh: Mesh, receiver: Receiver
) -> None:
    _, secret = await _create(
        mesh, receiver.url("signed"), ["session_started", "participant_joined"]
    )
    klass = await live_class(mesh, students=2)

    def arrived() -> list[Hit]:
        return receiver.of_session("signed", klass.id)

    await _wait_for(lambda: len(arrived()) >= 4, "session_started + 3 joins")
    await asyncio.sleep(0.5)  # nothing else matching may follow
    types = []
    for hit in arrived():
        event = verify_webhook(hit.body, hit.headers, secret)
        assert event.session_id == klass.id
        assert hit.headers["classmesh-event-id"] == f"{klass.id}:{event.seq}"
        assert hit.headers["classmesh-event-type"] == event.WhichOneof("payload")
        assert hit.headers["Content-Type"] == "application/json"
        types.append(event.WhichOneof("payload"))
    assert sorted(types) == ["participant_joined"] * 3 + ["session_started"]
    ids = [h.headers["classmesh-event-id"] for h in arrived()]
    assert len(ids) == len(set(ids)), "each event once"
    # The joins in the log are exactly the joins delivered.
    joins = await mesh.pool.fetchval(
        "SELECT count(*) FROM session_events WHERE session_id = $1 AND type = 'participant_joined'",
        uuid.UUID(klass.id),
    )
    assert joins == 3


async def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt(
    mesh: Mesh, receiver: Receiver
) -> None:
    receiver.plans["flaky"] = lambda _event, attempt: 503 if attempt <= 2 else 204
    webhook_id, secret = await _create(mesh, receiver.url("flaky"), ["session_started"])
    klass = await live_class(mesh)

    await _wait_for(lambda: len(receiver.of_session("flaky", klass.id)) >= 3, "3 attempts")
    hits = receiver.of_session("flaky", klass.id)
    assert [h.headers["classmesh-attempt"] for h in hits] == ["1", "2", "3"]
    assert len({h.headers["classmesh-event-id"] for h in hits}) == 1
    for hit in hits:  # every attempt is signed afresh
        assert verify_webhook(hit.body, hit.headers, secret).session_id == klass.id

    key = f"{klass.id}:" + hits[0].headers["classmesh-event-id"].split(":")[1]

    async def state() -> dict[str, object]:
        return next(r for r in await _delivery_rows(mesh, webhook_id) if r["event_key"] == key)

    end = time.monotonic() + DEADLINE
    while (await state())["state"] != "succeeded" and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert await state() == {
        "event_key": key,
        "state": "succeeded",
        "attempts": 3,
        "response_status": 204,
    }
    admin = mesh.client("hook-admin", "admin")
    listed = {w.id: w for w in (await admin.admin.list_webhooks(page_size=100)).webhooks}
    assert listed[webhook_id].consecutive_failures == 0
    assert listed[webhook_id].HasField("last_success_time")


async def test_a_receiver_that_always_fails_is_dead_lettered_after_max_attempts(
    mesh: Mesh, receiver: Receiver
) -> None:
    receiver.plans["down"] = lambda _event, _attempt: 500
    webhook_id, _ = await _create(mesh, receiver.url("down"), ["session_started"])
    klass = await live_class(mesh)

    async def dead() -> bool:
        rows = [
            r
            for r in await _delivery_rows(mesh, webhook_id)
            if str(r["event_key"]).startswith(klass.id)
        ]
        return bool(rows) and rows[0]["state"] == "dead"

    end = time.monotonic() + DEADLINE
    while not await dead():
        assert time.monotonic() < end, "not dead-lettered in time"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)  # > the largest backoff: no further attempt follows
    hits = receiver.of_session("down", klass.id)
    assert [h.headers["classmesh-attempt"] for h in hits] == [
        str(i + 1) for i in range(MAX_ATTEMPTS)
    ]
    rows = [
        r
        for r in await _delivery_rows(mesh, webhook_id)
        if str(r["event_key"]).startswith(klass.id)
    ]
    assert rows == [
        {"event_key": rows[0]["event_key"], "state": "dead", "attempts": 3, "response_status": 500}
    ]
    admin = mesh.client("hook-admin", "admin")
    listed = {w.id: w for w in (await admin.admin.list_webhooks(page_size=100)).webhooks}
    assert listed[webhook_id].consecutive_failures >= MAX_ATTEMPTS
    await admin.admin.delete_webhook(webhook_id=webhook_id)


async def test_a_deleted_webhook_gets_nothing_more(mesh: Mesh, receiver: Receiver) -> None:
    webhook_id, _ = await _create(mesh, receiver.url("gone"), ["participant_joined"])
    klass = await live_class(mesh)
    await _wait_for(lambda: len(receiver.of_session("gone", klass.id)) == 1, "the teacher's join")

    admin = mesh.client("hook-admin", "admin")
    deleted = await admin.admin.delete_webhook(request_id=str(uuid.uuid4()), webhook_id=webhook_id)
    assert deleted.webhook.id == webhook_id
    listed = await admin.admin.list_webhooks(page_size=100)
    assert webhook_id not in {w.id for w in listed.webhooks}

    # A control webhook created now sees the next joins, the deleted one does not.
    await _create(mesh, receiver.url("control"), ["participant_joined"])
    for _ in range(3):
        await add_student(mesh, klass)
    await _wait_for(lambda: len(receiver.of_session("control", klass.id)) == 3, "control joins")
    await asyncio.sleep(0.5)
    assert len(receiver.of_session("gone", klass.id)) == 1
    assert await _delivery_rows(mesh, webhook_id) == []
    with pytest.raises(NotFoundError):
        await admin.admin.delete_webhook(webhook_id=webhook_id)


async def test_two_dispatchers_deliver_each_event_once(
    mesh: Mesh, receiver: Receiver, second_admin: MeshProcess
) -> None:
    await _create(mesh, receiver.url("pair"), [])
    classes = await asyncio.gather(*(live_class(mesh, students=4) for _ in range(4)))
    for klass in classes:
        expected = await mesh.pool.fetchval(
            "SELECT count(*) FROM session_events WHERE session_id = $1", uuid.UUID(klass.id)
        )
        assert expected >= 6
        await _wait_for(
            lambda k=klass, n=expected: len(receiver.of_session("pair", k.id)) >= n,  # type: ignore[misc]
            "every event of the class",
        )
    await asyncio.sleep(0.5)
    for klass in classes:
        ids = [h.headers["classmesh-event-id"] for h in receiver.of_session("pair", klass.id)]
        seqs = sorted(int(i.split(":")[1]) for i in ids)
        last = await mesh.pool.fetchval(
            "SELECT last_seq FROM sessions WHERE id = $1", uuid.UUID(klass.id)
        )
        assert seqs == list(range(1, last + 1)), "every event exactly once"


# ------------------------------------------------------------------------- redelivery

D = admin_pb2


async def test_a_dead_delivery_retried_succeeds_once_the_receiver_is_fixed(
    mesh: Mesh, receiver: Receiver
) -> None:
    broken = [True]
    receiver.plans["fixed"] = lambda _event, _attempt: 500 if broken[0] else 200
    webhook_id, secret = await _create(mesh, receiver.url("fixed"), ["session_started"])
    klass = await live_class(mesh)
    admin = mesh.client("hook-admin", "admin")

    async def mine(*states: D.WebhookDeliveryState.ValueType) -> list[D.WebhookDelivery]:
        page = await admin.admin.list_webhook_deliveries(
            webhook_id=webhook_id, states=list(states), page_size=100
        )
        return [d for d in page.deliveries if d.event_id.startswith(klass.id + ":")]

    async def settled(state: D.WebhookDeliveryState.ValueType) -> D.WebhookDelivery:
        end = time.monotonic() + DEADLINE
        while not (found := await mine(state)):
            assert time.monotonic() < end, f"no delivery in state {state} within {DEADLINE} s"
            await asyncio.sleep(0.05)
        return found[0]

    dead = await settled(D.WEBHOOK_DELIVERY_STATE_DEAD)
    assert dead.webhook_id == webhook_id and dead.event_type == "session_started"
    assert (dead.attempts, dead.max_attempts) == (MAX_ATTEMPTS, MAX_ATTEMPTS)
    assert dead.last_error.startswith("HTTP 500") and dead.response_status == 500
    assert not dead.HasField("delivered_time") and not dead.HasField("next_attempt_time")
    assert await mine(D.WEBHOOK_DELIVERY_STATE_SUCCEEDED) == []
    assert [d.id for d in await mine()] == [dead.id]
    assert len(receiver.of_session("fixed", klass.id)) == MAX_ATTEMPTS

    broken[0] = False
    request_id = str(uuid.uuid4())
    retried = await admin.admin.retry_webhook_delivery(request_id=request_id, delivery_id=dead.id)
    assert retried.delivery.id == dead.id
    assert retried.delivery.state == D.WEBHOOK_DELIVERY_STATE_QUEUED
    assert retried.delivery.max_attempts == 2 * MAX_ATTEMPTS
    assert retried.delivery.HasField("next_attempt_time")

    done = await settled(D.WEBHOOK_DELIVERY_STATE_SUCCEEDED)
    assert (done.id, done.attempts, done.response_status) == (dead.id, MAX_ATTEMPTS + 1, 200)
    assert done.last_error == "" and done.HasField("delivered_time")
    hits = receiver.of_session("fixed", klass.id)
    assert [h.headers["classmesh-attempt"] for h in hits] == ["1", "2", "3", "4"]
    assert len({h.headers["classmesh-event-id"] for h in hits}) == 1
    assert verify_webhook(hits[-1].body, hits[-1].headers, secret).session_id == klass.id

    # The same request_id answers the first response again and sends nothing more.
    again = await admin.admin.retry_webhook_delivery(request_id=request_id, delivery_id=dead.id)
    assert again == retried
    await asyncio.sleep(0.5)
    assert len(receiver.of_session("fixed", klass.id)) == MAX_ATTEMPTS + 1

    with pytest.raises(FailedPreconditionError) as info:
        await admin.admin.retry_webhook_delivery(delivery_id=dead.id)
    assert info.value.reason == "JOB_NOT_RETRYABLE"
    assert info.value.metadata["state"] == "succeeded"
    with pytest.raises(NotFoundError):
        await admin.admin.retry_webhook_delivery(delivery_id=str(uuid.uuid4()))
    with pytest.raises(InvalidArgumentError) as bad:
        await admin.admin.retry_webhook_delivery(delivery_id="nope")
    assert "delivery_id" in {f for f, _ in bad.value.field_violations}
    with pytest.raises(PermissionDeniedError):
        await mesh.client("hook-student").admin.retry_webhook_delivery(delivery_id=dead.id)

    audit = await admin.admin.list_audit_logs(
        actions=[session_pb2.AUDIT_ACTION_JOB_RETRIED], page_size=100
    )
    entry = next(e for e in audit.entries if e.target_id == dead.id)
    assert entry.request_id == request_id and entry.session_id == ""
    assert entry.metadata["webhookId"] == webhook_id
    assert str(entry.metadata["lastError"]).startswith("HTTP 500")
    assert sum(e.target_id == dead.id for e in audit.entries) == 1
    await admin.admin.delete_webhook(webhook_id=webhook_id)


async def test_list_webhook_deliveries_pages_newest_first_and_validates(
    mesh: Mesh, receiver: Receiver
) -> None:
    webhook_id, _ = await _create(mesh, receiver.url("paged"), [])
    klass = await live_class(mesh, students=3)
    expected = await mesh.pool.fetchval(
        "SELECT count(*) FROM session_events WHERE session_id = $1", uuid.UUID(klass.id)
    )
    await _wait_for(lambda: len(receiver.of_session("paged", klass.id)) >= expected, "events")
    admin = mesh.client("hook-admin", "admin")
    seen: list[D.WebhookDelivery] = []
    token = ""
    while True:
        page = await admin.admin.list_webhook_deliveries(
            webhook_id=webhook_id, page_size=2, page_token=token
        )
        assert len(page.deliveries) <= 2
        seen += page.deliveries
        token = page.next_page_token
        if not token:
            break
    rows = await mesh.pool.fetch(
        "SELECT id FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at DESC, id DESC",
        uuid.UUID(webhook_id),
    )
    assert [d.id for d in seen] == [str(r["id"]) for r in rows]
    assert len(seen) >= expected
    assert all(d.webhook_id == webhook_id for d in seen)

    bad_lists: list[tuple[dict[str, Any], str]] = [
        ({"webhook_id": ""}, "webhook_id"),
        ({"webhook_id": "x"}, "webhook_id"),
        ({"webhook_id": webhook_id, "states": [99]}, "states"),
    ]
    for kwargs, field_name in bad_lists:
        with pytest.raises(InvalidArgumentError) as info:
            await admin.admin.list_webhook_deliveries(**kwargs)
        assert field_name in {f for f, _ in info.value.field_violations}
    with pytest.raises(InvalidArgumentError) as token_info:
        await admin.admin.list_webhook_deliveries(webhook_id=webhook_id, page_token="garbage!!")
    assert token_info.value.reason == "PAGE_TOKEN_INVALID"
    with pytest.raises(NotFoundError):
        await admin.admin.list_webhook_deliveries(webhook_id=str(uuid.uuid4()))
    with pytest.raises(PermissionDeniedError):
        await mesh.client("hook-student").admin.list_webhook_deliveries(webhook_id=webhook_id)
    await admin.admin.delete_webhook(webhook_id=webhook_id)


# ------------------------------------------------------------------------- the API


@pytest.mark.parametrize(
    ("url", "types", "field"),
    [
        ("http://example.com/hook", [], "url"),
        ("ftp://127.0.0.1/hook", [], "url"),
        ("https://", [], "url"),
        ("", [], "url"),
        ("https://user:pw@example.com/", [], "url"),
        ("https://example.com/" + "a" * 2048, [], "url"),
        ("https://example.com/hook", ["no_such_event"], "event_types"),
        ("https://example.com/hook", ["session_started"] * 101, "event_types"),
    ],
)
async def test_create_webhook_validates(mesh: Mesh, url: str, types: list[str], field: str) -> None:
    admin = mesh.client("hook-admin", "admin")
    with pytest.raises(InvalidArgumentError) as info:
        await admin.admin.create_webhook(url=url, event_types=types)
    assert info.value.reason == "VALIDATION_FAILED"
    assert field in {f for f, _ in info.value.field_violations}


async def test_create_is_idempotent_list_pages_and_never_shows_the_secret(
    mesh: Mesh, receiver: Receiver
) -> None:
    admin = mesh.client("hook-admin", "admin")
    request_id = str(uuid.uuid4())
    first = await admin.admin.create_webhook(
        request_id=request_id, url="https://example.com/a", description="idem"
    )
    again = await admin.admin.create_webhook(
        request_id=request_id, url="https://example.com/a", description="idem"
    )
    assert first.secret == again.secret and first.webhook.id == again.webhook.id

    seen: list[admin_pb2.Webhook] = []
    token = ""
    while True:
        page = await admin.admin.list_webhooks(page_size=2, page_token=token)
        assert len(page.webhooks) <= 2
        seen += page.webhooks
        token = page.next_page_token
        if not token:
            break
    assert len({w.id for w in seen}) == len(seen)
    mine = next(w for w in seen if w.id == first.webhook.id)
    assert first.secret not in mine.SerializeToString().decode("latin-1")
    assert mine.secret_hint == first.secret[-4:] and mine.enabled
    assert [w.create_time.ToNanoseconds() for w in seen] == sorted(
        (w.create_time.ToNanoseconds() for w in seen), reverse=True
    )
    tenant = await admin.admin.get_tenant()
    assert tenant.tenant.webhook_count == len(seen)
    await admin.admin.delete_webhook(webhook_id=first.webhook.id)
    with pytest.raises(InvalidArgumentError) as info:
        await admin.admin.list_webhooks(page_token="garbage!!")
    assert info.value.reason == "PAGE_TOKEN_INVALID"
    with pytest.raises(InvalidArgumentError):
        await admin.admin.delete_webhook(webhook_id="not-a-uuid")


async def test_the_per_tenant_limit(mesh: Mesh) -> None:
    admin = mesh.client("hook-admin", "admin")
    have = len((await admin.admin.list_webhooks(page_size=100)).webhooks)
    made = [
        (await admin.admin.create_webhook(url=f"https://example.com/{i}")).webhook.id
        for i in range(MAX_WEBHOOKS - have)
    ]
    with pytest.raises(FailedPreconditionError) as info:
        await admin.admin.create_webhook(url="https://example.com/one-too-many")
    assert info.value.reason == "WEBHOOK_LIMIT_REACHED"
    assert info.value.metadata["limit"] == str(MAX_WEBHOOKS)
    for webhook_id in made:
        await admin.admin.delete_webhook(webhook_id=webhook_id)
    audit = await admin.admin.list_audit_logs(page_size=100)
    deleted = {e.target_id for e in audit.entries if e.target_id in made}
    assert deleted == set(made)
