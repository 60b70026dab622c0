"""An async client of the Janus HTTP API (Janus 1.x): one Janus session, its handles,
transactions, the long poll and the keep-alive.

    client = JanusClient("http://10.0.0.5:8088/janus", on_event=handler)
    await client.start()                          # POST /janus {"janus":"create"}
    handle = await client.attach("janus.plugin.videoroom")
    reply = await client.message(handle, {"request": "create", ...})
    reply = await client.message(handle, {"request": "joinandconfigure", ...}, jsep=offer)
    await client.close()                          # detaches nothing: destroys the session

Requests are correlated by `transaction`. A synchronous plugin request (create, destroy,
moderate, list...) is answered in the POST's response (`success` + `plugindata`); an
asynchronous one (join, configure, start, subscribe...) is answered `ack` and its result
arrives later as an `event` with the same transaction on the long poll
(`GET /janus/<session>?maxev=N`), which is why the waiting future is registered before the
POST is sent. Every other event (a plugin's unsolicited `event`, `webrtcup`, `hangup`,
`media`, `slowlink`, `trickle`, `detached`) goes to `on_event(handle_id, message)`.

Janus drops a session after 60 s without activity: a keep-alive goes out every
`KEEPALIVE_SECONDS`. When Janus answers that the session is gone (it restarted, or the
session timed out), `on_session_lost()` is called once; the owner decides what to rebuild.

Errors become ClassMeshError: Janus unreachable, timing out or answering with a server
error -> Unavailable MEDIA_UNAVAILABLE (so the media service's circuit breaker around
router creation counts it); Janus and videoroom error codes map by meaning (`_map_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from classmesh.core.errors import (
    ClassMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = [
    "JanusClient",
    "JanusReply",
    "JanusSessionLost",
    "KEEPALIVE_SECONDS",
    "map_error",
]

log = logging.getLogger("classmesh.media.janus")

#: Janus's default session timeout is 60 s.
KEEPALIVE_SECONDS = 25.0
#: Events fetched per long-poll round trip.
MAX_EVENTS = 20
#: Janus holds a long poll for 30 s.
POLL_TIMEOUT = 45.0

EventHandler = Callable[[int, dict[str, Any]], Awaitable[None]]

# Janus core error codes (janus/apierror.h).
_SESSION_NOT_FOUND = 458
_HANDLE_NOT_FOUND = 459
_JSEP_CODES = {464, 465, 469}  # unknown JSEP type, invalid SDP, unexpected answer
# Videoroom error codes (plugins/janus_videoroom.c).
_NO_SUCH_ROOM = 426
_NO_SUCH_FEED = 428
_VIDEOROOM_SDP = {431, 437}  # invalid SDP type, invalid SDP
_VIDEOROOM_INPUT = {422, 423, 429, 430}  # invalid JSON / request / missing / invalid element


class JanusSessionLost(Unavailable):
    """Janus no longer knows our session (restarted, or the session timed out)."""


def map_error(code: int, reason: str, *, what: str = "") -> ClassMeshError:
    """A Janus (core or videoroom) error as the ClassMeshError that says what it means."""
    text = f"Janus: {reason} ({code})"
    if code == _SESSION_NOT_FOUND:
        return JanusSessionLost("MEDIA_UNAVAILABLE", 1.0, text)
    if code == _NO_SUCH_ROOM:
        return NotFound("router", what or "?", text, reason="ROUTER_NOT_FOUND")
    if code == _NO_SUCH_FEED:
        return NotFound("track", what or "?", text, reason="TRACK_NOT_FOUND")
    if code in _JSEP_CODES or code in _VIDEOROOM_SDP:
        return InvalidArgument([("signal.sdp", text)], reason="SDP_INVALID")
    if code in _VIDEOROOM_INPUT:
        # Our request was wrong, not the client's: a state Janus does not accept.
        return FailedPrecondition("MEDIA_UNAVAILABLE", text)
    if code == _HANDLE_NOT_FOUND:
        return FailedPrecondition("MEDIA_UNAVAILABLE", f"{text}: the peer is gone")
    return Unavailable("MEDIA_UNAVAILABLE", 1.0, text)


@dataclass
class JanusReply:
    """A plugin's answer: its `data` and, for negotiations, the JSEP it sent."""

    data: dict[str, Any]
    jsep: dict[str, Any] | None = None
    sender: int = 0


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    what: str = ""


class JanusClient:
    """One Janus session over the HTTP API (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        admin_url: str = "",
        admin_secret: str = "",
        api_secret: str = "",
        timeout: float = 10.0,
        on_event: EventHandler | None = None,
        on_session_lost: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.admin_url = admin_url.rstrip("/")
        self.admin_secret = admin_secret
        self.api_secret = api_secret
        self.timeout = timeout
        self.on_event = on_event
        self.on_session_lost = on_session_lost
        self.session_id = 0
        self._http: aiohttp.ClientSession | None = None
        self._pending: dict[str, _Pending] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rid = itertools.count(1)
        self._closed = False
        self._lost = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the Janus session and start the long poll and the keep-alive."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                connector=aiohttp.TCPConnector(limit=64),
            )
        for task in self._tasks:  # a restart after a lost session
            task.cancel()
        self._closed = False
        self._lost = False
        answer = await self._post(self.url, {"janus": "create"})
        self.session_id = int(answer["data"]["id"])
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self._keepalive())]

    async def close(self) -> None:
        """Destroy the session (Janus detaches its handles) and stop every task."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.session_id and not self._lost:
            with contextlib.suppress(ClassMeshError):
                await self._post(self._session_url, {"janus": "destroy"}, timeout=3.0)
        self._fail_pending(Unavailable("MEDIA_UNAVAILABLE", 1.0, "the Janus client closed"))
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def _session_url(self) -> str:
        return f"{self.url}/{self.session_id}"

    # ------------------------------------------------------------------ requests

    async def info(self) -> dict[str, Any]:
        """`GET /janus/info`: the server's version, plugins and transports."""
        return await self._request("GET", f"{self.url}/info", None, self.timeout)

    async def attach(self, plugin: str) -> int:
        answer = await self._post(self._session_url, {"janus": "attach", "plugin": plugin})
        return int(answer["data"]["id"])

    async def detach(self, handle_id: int) -> None:
        """Detach a handle (closes its PeerConnection); a handle already gone is fine."""
        try:
            await self._post(f"{self._session_url}/{handle_id}", {"janus": "detach"})
        except (NotFound, FailedPrecondition, Unavailable):
            return

    async def hangup(self, handle_id: int) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition, Unavailable):
            await self._post(f"{self._session_url}/{handle_id}", {"janus": "hangup"})

    async def message(
        self,
        handle_id: int,
        body: Mapping[str, Any],
        *,
        jsep: Mapping[str, Any] | None = None,
        what: str = "",
        timeout: float | None = None,
    ) -> JanusReply:
        """Send a plugin request; returns the plugin's answer (sync) or event (async).
        A plugin error (`error_code` in its data) raises the mapped ClassMeshError;
        `what` names the resource for NotFound errors."""
        payload: dict[str, Any] = {"janus": "message", "body": dict(body)}
        if jsep is not None:
            payload["jsep"] = dict(jsep)
        answer = await self._post(
            f"{self._session_url}/{handle_id}", payload, what=what, timeout=timeout
        )
        plugindata = answer.get("plugindata") or {}
        data = dict(plugindata.get("data") or {})
        if "error_code" in data:
            raise map_error(int(data["error_code"]), str(data.get("error", "")), what=what)
        return JanusReply(data=data, jsep=answer.get("jsep"), sender=int(answer.get("sender", 0)))

    async def trickle(
        self,
        handle_id: int,
        candidate: str = "",
        sdp_mid: str = "",
        sdp_mline_index: int = 0,
        *,
        completed: bool = False,
    ) -> None:
        cand: dict[str, Any]
        if completed or not candidate:
            cand = {"completed": True}
        else:
            cand = {"candidate": candidate, "sdpMLineIndex": sdp_mline_index}
            if sdp_mid:
                cand["sdpMid"] = sdp_mid
        await self._post(
            f"{self._session_url}/{handle_id}", {"janus": "trickle", "candidate": cand}
        )

    async def admin(
        self, request: str, *, handle_id: int = 0, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """An admin API request on our session (or one handle of it)."""
        if not self.admin_url:
            raise FailedPrecondition(
                "FEATURE_DISABLED",
                "the Janus admin API is not configured (CLASSMESH_JANUS_ADMIN_URL)",
            )
        url = f"{self.admin_url}/{self.session_id}"
        if handle_id:
            url = f"{url}/{handle_id}"
        body = {"janus": request, "admin_secret": self.admin_secret, **(extra or {})}
        return await self._post(url, body, pending=False)

    # ------------------------------------------------------------------ transport

    async def _post(
        self,
        url: str,
        body: dict[str, Any],
        *,
        what: str = "",
        timeout: float | None = None,
        pending: bool = True,
    ) -> dict[str, Any]:
        transaction = secrets.token_hex(8)
        body = {**body, "transaction": transaction}
        if self.api_secret and "admin_secret" not in body:
            body["apisecret"] = self.api_secret
        limit = timeout or self.timeout
        waiter: _Pending | None = None
        if pending:
            waiter = _Pending(asyncio.get_running_loop().create_future(), what)
            self._pending[transaction] = waiter
        try:
            answer = await self._request("POST", url, body, limit)
            kind = answer.get("janus")
            if kind == "error":
                err = answer.get("error") or {}
                raise map_error(int(err.get("code", 0)), str(err.get("reason", "")), what=what)
            if kind != "ack" or waiter is None:
                return answer
            # An asynchronous plugin request: its event comes on the long poll.
            try:
                return await asyncio.wait_for(asyncio.shield(waiter.future), limit)
            except TimeoutError as exc:
                raise Unavailable(
                    "MEDIA_UNAVAILABLE",
                    1.0,
                    f"Janus did not answer {body.get('body', {}).get('request', kind)!r} "
                    f"within {limit:.0f} s",
                ) from exc
        except JanusSessionLost:
            await self._session_lost()
            raise
        finally:
            self._pending.pop(transaction, None)

    async def _request(
        self, method: str, url: str, body: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        if self._http is None:
            raise Unavailable("MEDIA_UNAVAILABLE", 1.0, "the Janus client is not started")
        try:
            async with self._http.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status == 404 and method == "GET":
                    # A long poll on a session this Janus does not know (it restarted).
                    raise JanusSessionLost(
                        "MEDIA_UNAVAILABLE", 1.0, f"Janus at {self.url} does not know {url}"
                    )
                if response.status >= 500:
                    raise Unavailable(
                        "MEDIA_UNAVAILABLE",
                        1.0,
                        f"Janus at {self.url} answered HTTP {response.status}",
                    )
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise Unavailable(
                "MEDIA_UNAVAILABLE",
                1.0,
                f"Janus at {self.url} is unreachable: {type(exc).__name__} {exc}".strip(),
            ) from exc
        if isinstance(answer, list):  # a long poll with maxev answers a list of events
            return {"janus": "events", "events": answer}
        if not isinstance(answer, dict):
            raise Unavailable("MEDIA_UNAVAILABLE", 1.0, f"Janus at {self.url}: not a JSON object")
        return answer

    async def _poll(self) -> None:
        failures = 0
        while not self._closed:
            url = f"{self._session_url}?maxev={MAX_EVENTS}&rid={next(self._rid)}"
            try:
                answer = await self._request("GET", url, None, POLL_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except JanusSessionLost:
                await self._session_lost()
                return
            except Unavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("Janus long poll failed", extra={"detail": exc.message})
                # Janus drops the session after 60 s without us: past that, start over.
                if failures * 2 > 60:
                    await self._session_lost()
                    return
                await asyncio.sleep(2.0)
                continue
            failures = 0
            messages = answer["events"] if answer.get("janus") == "events" else [answer]
            for message in messages:
                if not isinstance(message, dict):
                    continue
                if message.get("janus") == "error":
                    code = int((message.get("error") or {}).get("code", 0))
                    if code == _SESSION_NOT_FOUND:
                        await self._session_lost()
                        return
                    continue
                await self._dispatch(message)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("janus")
        if kind == "keepalive":
            return
        waiter = self._pending.get(str(message.get("transaction", "")))
        if waiter is not None and kind == "event" and not waiter.future.done():
            waiter.future.set_result(message)
            return
        if self.on_event is None:
            return
        try:
            await self.on_event(int(message.get("sender", 0)), message)
        except Exception:  # one bad event must not stop the poll
            log.exception("Janus event handler failed", extra={"kind": kind})

    async def _keepalive(self) -> None:
        while not self._closed:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            try:
                await self._post(self._session_url, {"janus": "keepalive"}, pending=False)
            except JanusSessionLost:
                return
            except Unavailable as exc:
                log.warning("Janus keep-alive failed", extra={"detail": exc.message})

    async def _session_lost(self) -> None:
        if self._lost or self._closed:
            return
        self._lost = True
        log.warning("Janus session lost", extra={"session": self.session_id})
        self._fail_pending(
            Unavailable("MEDIA_UNAVAILABLE", 1.0, "Janus lost our session (it restarted?)")
        )
        if self.on_session_lost is not None:
            asyncio.get_running_loop().create_task(self.on_session_lost())

    def _fail_pending(self, error: ClassMeshError) -> None:
        for waiter in list(self._pending.values()):
            if not waiter.future.done():
                waiter.future.set_exception(error)
                waiter.future.exception()  # retrieved: no "never retrieved" warning
