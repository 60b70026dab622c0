"""AdminService and the auth model end to end: a real `classmesh up`, driven through the SDK.

This module runs its own mesh on its own throwaway database (rather than the shared `mesh`
fixture) because two things need the database's DSN: `classmesh tenant create` for the
"other tenant's key" case, and a key list no other test adds to, so counts are exact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2

from classmesh.admin.v1 import admin_pb2
from classmesh.common.v1 import common_pb2
from classmesh.core.auth import AccessToken
from classmesh.session.v1 import session_pb2
from classmesh_sdk import (
    NO_RETRY,
    AlreadyExistsError,
    ClassMeshClient,
    ClassMeshError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from tests.conftest import ROOT, create_database, drop_database
from tests.support.mesh import MeshProcess, start_mesh

DOMAIN = "classmesh.dev"
ALL_CAPS = ["publish", "subscribe", "chat", "moderate", "record", "admin"]


@dataclass
class AdminMesh:
    proc: MeshProcess
    dsn: str
    redis_url: str

    @property
    def target(self) -> str:
        return self.proc.target

    @property
    def token(self) -> str:
        return self.proc.token

    @property
    def tenant_id(self) -> str:
        return self.proc.tenant_id


@dataclass(frozen=True)
class Key:
    key_id: str
    secret: str
    tenant_id: str

    def token(self, role: str = "admin", **kw: object) -> AccessToken:
        return (
            AccessToken(self.key_id, self.secret)
            .with_tenant(self.tenant_id)
            .with_identity(kw.pop("sub", "u-e2e"), "E2E")  # type: ignore[arg-type]
            .with_grants(session="*", role=role, caps=ALL_CAPS)
        )


@pytest.fixture(scope="module")
async def admin_mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AdminMesh]:
    dsn = await create_database(admin_database_url)
    logdir = tmp_path_factory.mktemp("admin_mesh")
    proc = start_mesh(
        {
            "CLASSMESH_DATABASE_URL": dsn,
            "CLASSMESH_REDIS_URL": redis_url,
            "CLASSMESH_REDIS_PREFIX": f"cm_admin_{logdir.name}",
            "CLASSMESH_DATA_DIR": str(logdir / "data"),
        },
        str(logdir / "stderr.log"),
    )
    try:
        proc.wait_ready()
        yield AdminMesh(proc, dsn, redis_url)
    finally:
        if proc.proc.poll() is None:
            proc.terminate()
        proc.kill()
        await drop_database(admin_database_url, dsn)


@pytest.fixture
async def client(admin_mesh: AdminMesh) -> AsyncIterator[ClassMeshClient]:
    async with ClassMeshClient(admin_mesh.target, token=admin_mesh.token) as c:
        yield c


@pytest.fixture(scope="module")
async def key(admin_mesh: AdminMesh) -> Key:
    """A fresh admin API key of the dev tenant, made through the API."""
    async with ClassMeshClient(admin_mesh.target, token=admin_mesh.token) as c:
        resp = await c.admin.create_api_key(name="e2e signing key")
    assert resp.secret and resp.api_key.id
    return Key(resp.api_key.id, resp.secret, admin_mesh.tenant_id)


async def _all_key_ids(client: ClassMeshClient) -> list[str]:
    resp = await client.admin.list_api_keys(page_size=100)
    assert not resp.next_page_token, "more than 100 keys: the test needs a bigger page"
    return [k.id for k in resp.api_keys]


async def _get_tenant_as(admin_mesh: AdminMesh, token: str | None) -> str:
    async with ClassMeshClient(admin_mesh.target, token=token) as c:
        resp = await c.admin.get_tenant(retry=NO_RETRY, timeout=10)
    return str(resp.tenant.id)


async def _rejected(admin_mesh: AdminMesh, token: str | None) -> UnauthenticatedError:
    with pytest.raises(UnauthenticatedError) as info:
        await _get_tenant_as(admin_mesh, token)
    assert info.value.domain == DOMAIN
    return info.value


def _b64(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _second_boundary() -> int:
    """A whole second that has only just begun, so expiry edges are not off by one."""
    while True:
        now = time.time()
        if now - math.floor(now) < 0.2:
            return math.floor(now)
        await asyncio.sleep(math.ceil(now) - now + 0.01)


# ------------------------------------------------------------------------------ admin


async def test_get_tenant_returns_the_dev_tenant(
    client: ClassMeshClient, admin_mesh: AdminMesh
) -> None:
    resp = await client.admin.get_tenant()
    assert resp.tenant.id == admin_mesh.tenant_id
    assert resp.tenant.name == "dev"
    assert resp.tenant.create_time.seconds > 0


async def test_create_api_key_is_idempotent_under_concurrency(client: ClassMeshClient) -> None:
    before = set(await _all_key_ids(client))
    request_id = str(uuid.uuid4())

    responses = await asyncio.gather(
        *(
            client.admin.create_api_key(request_id=request_id, name="twenty", retry=NO_RETRY)
            for _ in range(20)
        )
    )

    assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1
    assert len({r.api_key.id for r in responses}) == 1
    assert len({r.secret for r in responses}) == 1 and responses[0].secret
    after = set(await _all_key_ids(client))
    assert after - before == {responses[0].api_key.id}


async def test_same_request_id_with_other_parameters_is_rejected(
    client: ClassMeshClient,
) -> None:
    request_id = str(uuid.uuid4())
    await client.admin.create_api_key(request_id=request_id, name="first")
    count = len(await _all_key_ids(client))

    with pytest.raises(AlreadyExistsError) as info:
        await client.admin.create_api_key(request_id=request_id, name="second")

    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert info.value.domain == DOMAIN
    assert len(await _all_key_ids(client)) == count


async def test_list_api_keys_pages_walk_every_key_once(client: ClassMeshClient) -> None:
    for i in range(5):
        await client.admin.create_api_key(name=f"page {i}")
    everything = await _all_key_ids(client)
    assert len(everything) >= 6

    seen: list[str] = []
    token = ""
    for _ in range(len(everything) + 2):
        resp = await client.admin.list_api_keys(page_size=2, page_token=token)
        assert len(resp.api_keys) <= 2
        seen.extend(k.id for k in resp.api_keys)
        token = resp.next_page_token
        if not token:
            break
    assert not token, "paging did not end"
    assert len(seen) == len(set(seen)), "a key was listed twice"
    assert sorted(seen) == sorted(everything)


BAD_PAGE_TOKENS = [
    "garbage!!",
    "W10",
    base64.urlsafe_b64encode(b'["not a time","x"]').decode(),
    base64.urlsafe_b64encode(b'["2024-01-01T00:00:00+00:00",null]').decode(),
    "x" * 2000,
]


@pytest.mark.parametrize("page_token", BAD_PAGE_TOKENS)
async def test_garbage_page_token_is_invalid_argument(
    client: ClassMeshClient, page_token: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.admin.list_api_keys(page_size=2, page_token=page_token)
    err = info.value
    assert [f for f, _ in err.field_violations] == ["page_token"]
    assert err.reason == "PAGE_TOKEN_INVALID" and err.domain == DOMAIN
    assert "Traceback" not in err.message


async def test_bad_page_token_answers_as_the_session_service_does(
    client: ClassMeshClient,
) -> None:
    """One answer to a page token the API did not hand out, whichever service lists."""
    for page_token in BAD_PAGE_TOKENS:
        answers = []
        for call in (client.admin.list_api_keys, client.sessions.list_sessions):
            with pytest.raises(InvalidArgumentError) as info:
                await call(page_size=2, page_token=page_token, retry=NO_RETRY)
            err = info.value
            answers.append((err.code, err.reason, err.domain, [f for f, _ in err.field_violations]))
        assert answers[0] == answers[1], (page_token, answers)


async def test_revoked_key_stops_verifying_at_once(
    client: ClassMeshClient, admin_mesh: AdminMesh
) -> None:
    created = await client.admin.create_api_key(name="to revoke")
    doomed = Key(created.api_key.id, created.secret, admin_mesh.tenant_id)
    token = doomed.token().with_ttl(timedelta(minutes=5)).to_jwt()
    # Verified once, so the key sits in the server's key cache when it is revoked.
    assert await _get_tenant_as(admin_mesh, token) == admin_mesh.tenant_id

    revoked = await client.admin.revoke_api_key(api_key_id=doomed.key_id)
    assert revoked.api_key.revoke_time.seconds > 0

    err = await _rejected(admin_mesh, token)
    assert err.reason == "API_KEY_UNKNOWN"


# ------------------------------------------------------------------------ auth matrix


async def test_missing_token(admin_mesh: AdminMesh) -> None:
    assert (await _rejected(admin_mesh, None)).reason == "TOKEN_MISSING"


async def test_expiry_has_sixty_seconds_of_leeway(admin_mesh: AdminMesh, key: Key) -> None:
    def expired_since(now: int, seconds: int) -> str:
        ttl = timedelta(minutes=5)
        iat = datetime.fromtimestamp(now - seconds, UTC) - ttl
        return key.token().with_issued_at(iat).with_ttl(ttl).to_jwt()

    now = await _second_boundary()
    assert await _get_tenant_as(admin_mesh, expired_since(now, 59)) == admin_mesh.tenant_id
    assert (await _rejected(admin_mesh, expired_since(now, 61))).reason == "TOKEN_EXPIRED"


async def test_future_nbf_is_rejected(admin_mesh: AdminMesh, key: Key) -> None:
    later = datetime.now(UTC) + timedelta(minutes=5)
    token = key.token().with_nbf(later).with_ttl(timedelta(minutes=10)).to_jwt()
    assert (await _rejected(admin_mesh, token)).reason == "TOKEN_NOT_YET_VALID"


async def test_bad_signature_is_rejected(admin_mesh: AdminMesh, key: Key) -> None:
    forged = Key(key.key_id, secrets.token_urlsafe(48), key.tenant_id).token().to_jwt()
    assert (await _rejected(admin_mesh, forged)).reason == "TOKEN_INVALID"
    good = key.token().to_jwt()
    header, claims, sig = good.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    assert (await _rejected(admin_mesh, f"{header}.{claims}.{flipped}")).reason == "TOKEN_INVALID"


async def test_alg_none_is_rejected(admin_mesh: AdminMesh, key: Key) -> None:
    claims = key.token().claims()
    for alg in ("none", "None", "NONE"):
        unsigned = f"{_b64({'alg': alg, 'typ': 'JWT', 'kid': key.key_id})}.{_b64(claims)}."
        assert (await _rejected(admin_mesh, unsigned)).reason == "TOKEN_INVALID"


async def test_unknown_kid_is_rejected(admin_mesh: AdminMesh) -> None:
    stranger = Key(f"ck_{secrets.token_hex(8)}", secrets.token_urlsafe(48), admin_mesh.tenant_id)
    assert (await _rejected(admin_mesh, stranger.token().to_jwt())).reason == "API_KEY_UNKNOWN"


async def create_tenant_with_key_cli(admin_mesh: AdminMesh) -> Key:
    """A new tenant and its admin key, made with `classmesh tenant create`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
    env.update(
        CLASSMESH_DATABASE_URL=admin_mesh.dsn,
        CLASSMESH_REDIS_URL=admin_mesh.redis_url,
        CLASSMESH_DATA_DIR=str(Path(admin_mesh.proc._stderr_path).parent / "cli"),  # type: ignore[attr-defined]
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "classmesh.cli",
        "tenant",
        "create",
        f"other-{secrets.token_hex(3)}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    fields = dict(line.split(": ", 1) for line in out.decode().splitlines() if ": " in line)
    return Key(fields["key_id"], fields["secret"], fields["tenant_id"])


async def test_other_tenants_key_cannot_sign_for_this_tenant(admin_mesh: AdminMesh) -> None:
    other = await create_tenant_with_key_cli(admin_mesh)
    assert other.tenant_id != admin_mesh.tenant_id

    # Its own token works and sees its own tenant only.
    assert await _get_tenant_as(admin_mesh, other.token().to_jwt()) == other.tenant_id
    # Signed with the other tenant's key but claiming ours: refused.
    claims_ours = Key(other.key_id, other.secret, admin_mesh.tenant_id).token().to_jwt()
    assert (await _rejected(admin_mesh, claims_ours)).reason == "TOKEN_INVALID"


async def test_student_cannot_read_the_tenant(admin_mesh: AdminMesh, key: Key) -> None:
    token = key.token(role="student").to_jwt()
    with pytest.raises(PermissionDeniedError) as info:
        await _get_tenant_as(admin_mesh, token)
    assert info.value.reason == "PERMISSION_MISSING"
    assert info.value.domain == DOMAIN


# ------------------------------------------------------------------------- exceptions


async def test_sdk_exceptions_carry_the_status_details(client: ClassMeshClient) -> None:
    with pytest.raises(ClassMeshError) as info:
        await client.admin.list_api_keys(page_size=-1, page_token="garbage!!")
    err = info.value
    assert isinstance(err, InvalidArgumentError)
    assert err.code.name == "INVALID_ARGUMENT"
    assert err.reason == "VALIDATION_FAILED"
    assert err.domain == DOMAIN
    assert err.field_violations and all(isinstance(d, str) and d for _, d in err.field_violations)
    assert {f for f, _ in err.field_violations} <= {"page_size", "page_token"}
    assert err.correlation_id, "the server's x-correlation-id is kept for support"
    assert "VALIDATION_FAILED" in str(err)


# ------------------------------------------------------------------ tenant and audit log


async def test_update_tenant_renames_idempotently_and_is_audited(
    client: ClassMeshClient, admin_mesh: AdminMesh
) -> None:
    new_name = f"renamed-{secrets.token_hex(4)}"
    request_id = str(uuid.uuid4())
    mask = field_mask_pb2.FieldMask(paths=["name"])
    try:
        first = await client.admin.update_tenant(
            request_id=request_id, tenant=admin_pb2.Tenant(name=f"  {new_name} "), update_mask=mask
        )
        again = await client.admin.update_tenant(
            request_id=request_id, tenant=admin_pb2.Tenant(name=f"  {new_name} "), update_mask=mask
        )
        assert first.tenant.name == new_name and first.tenant.id == admin_mesh.tenant_id
        assert first.SerializeToString(deterministic=True) == again.SerializeToString(
            deterministic=True
        )
        assert first.tenant.update_time.ToDatetime() >= first.tenant.create_time.ToDatetime()
        assert first.tenant.api_key_count >= 1
        got = await client.admin.get_tenant()
        assert got.tenant.name == new_name

        logs = await client.admin.list_audit_logs(
            actions=[session_pb2.AUDIT_ACTION_TENANT_UPDATED], page_size=100
        )
        mine = [e for e in logs.entries if e.request_id == request_id]
        assert len(mine) == 1, "a replayed request must not audit twice"
        entry = mine[0]
        assert entry.session_id == "" and entry.target_id == admin_mesh.tenant_id
        assert entry.actor.user_id == "dev-admin"
        assert entry.metadata["previous"]["name"] == "dev"
    finally:
        await client.admin.update_tenant(tenant=admin_pb2.Tenant(name="dev"), update_mask=mask)
    assert (await client.admin.get_tenant()).tenant.name == "dev"


@pytest.mark.parametrize(
    ("paths", "name", "field"),
    [
        ([], "x", "update_mask"),
        (["id"], "x", "update_mask"),
        (["name", "status"], "x", "update_mask"),
        (["name"], "   ", "tenant.name"),
        (["name"], "n" * 101, "tenant.name"),
    ],
)
async def test_update_tenant_rejects_bad_masks_and_names(
    client: ClassMeshClient, paths: list[str], name: str, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.admin.update_tenant(
            tenant=admin_pb2.Tenant(name=name),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            retry=NO_RETRY,
        )
    assert info.value.reason == "VALIDATION_FAILED"
    assert field in {f for f, _ in info.value.field_violations}
    assert (await client.admin.get_tenant()).tenant.name == "dev"


async def test_update_tenant_to_a_taken_name_is_already_exists(
    client: ClassMeshClient, admin_mesh: AdminMesh
) -> None:
    other = await create_tenant_with_key_cli(admin_mesh)
    async with ClassMeshClient(admin_mesh.target, token=other.token().to_jwt()) as c:
        other_name = (await c.admin.get_tenant()).tenant.name
    with pytest.raises(AlreadyExistsError) as info:
        await client.admin.update_tenant(
            tenant=admin_pb2.Tenant(name=other_name),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    assert info.value.reason == "ALREADY_EXISTS"
    assert (await client.admin.get_tenant()).tenant.name == "dev"


async def test_student_cannot_update_the_tenant_or_read_the_audit_log(
    admin_mesh: AdminMesh, key: Key
) -> None:
    async with ClassMeshClient(admin_mesh.target, token=key.token(role="student").to_jwt()) as c:
        with pytest.raises(PermissionDeniedError) as info:
            await c.admin.update_tenant(
                tenant=admin_pb2.Tenant(name="student-was-here"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        assert info.value.reason == "PERMISSION_MISSING"
        with pytest.raises(PermissionDeniedError):
            await c.admin.list_audit_logs()


async def test_audit_log_covers_key_changes_filters_and_pages(
    client: ClassMeshClient, key: Key
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=5)
    created = [
        await client.admin.create_api_key(request_id=str(uuid.uuid4()), name=f"audited {i}")
        for i in range(3)
    ]
    revoke_id = str(uuid.uuid4())
    await client.admin.revoke_api_key(request_id=revoke_id, api_key_id=created[0].api_key.id)

    # Filter by action and time: the three creations, newest first, walked in pages of 2.
    time_range = common_pb2.TimeRange()
    time_range.start_time.FromDatetime(start)
    seen: list[str] = []
    token = ""
    while True:
        page = await client.admin.list_audit_logs(
            actions=[session_pb2.AUDIT_ACTION_API_KEY_CREATED],
            time_range=time_range,
            page_size=2,
            page_token=token,
        )
        assert len(page.entries) <= 2
        seen += [e.target_id for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    ours = [c.api_key.id for c in created]
    assert [k for k in seen if k in ours] == ours[::-1]
    assert len(seen) == len(set(seen))

    revoked = await client.admin.list_audit_logs(
        actions=[session_pb2.AUDIT_ACTION_API_KEY_REVOKED], actor_user_id="dev-admin"
    )
    entry = next(e for e in revoked.entries if e.request_id == revoke_id)
    assert entry.target_id == created[0].api_key.id
    assert entry.actor.role == common_pb2.ROLE_ADMIN

    # Another actor's filter sees none of it; a range in the past sees nothing new.
    other = await client.admin.list_audit_logs(actor_user_id="nobody-" + secrets.token_hex(3))
    assert list(other.entries) == [] and other.next_page_token == ""
    past = common_pb2.TimeRange()
    past.end_time.FromDatetime(start)
    old = await client.admin.list_audit_logs(time_range=past, page_size=100)
    assert not {e.target_id for e in old.entries} & set(ours)
    # A session filter with no entries is empty, not an error.
    none = await client.admin.list_audit_logs(session_id=str(uuid.uuid4()))
    assert list(none.entries) == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"session_id": "not-a-uuid"}, "session_id"),
        ({"actions": [9999]}, "actions"),
        ({"actor_user_id": "a" * 256}, "actor_user_id"),
        ({"page_size": -1}, "page_size"),
    ],
)
async def test_list_audit_logs_rejects_bad_filters(
    client: ClassMeshClient, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.admin.list_audit_logs(retry=NO_RETRY, **fields)
    assert info.value.reason == "VALIDATION_FAILED"
    assert field in {f for f, _ in info.value.field_violations}


async def test_list_audit_logs_bad_time_range_and_page_token(client: ClassMeshClient) -> None:
    tr = common_pb2.TimeRange()
    tr.start_time.FromDatetime(datetime.now(UTC))
    tr.end_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(InvalidArgumentError) as info:
        await client.admin.list_audit_logs(time_range=tr)
    assert "time_range" in {f for f, _ in info.value.field_violations}
    for token in ("garbage!!", _b64(["x", "y"]), _b64([1])):  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError) as info:
            await client.admin.list_audit_logs(page_token=token)
        assert info.value.reason == "PAGE_TOKEN_INVALID"
