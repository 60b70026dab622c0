"""CircuitBreaker (seed 000 STR-032) with an injected clock."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from classmesh.core.breaker import CircuitBreaker
from classmesh.core.errors import InvalidArgument, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(RuntimeError):
        async with breaker.guard():
            raise RuntimeError("router creation failed")


async def _ok(breaker: CircuitBreaker) -> None:
    async with breaker.guard():
        pass


async def test_opens_after_5_failures_in_60s_and_fails_fast_with_retry_info() -> None:
    clock = Clock()
    b = CircuitBreaker("media router", clock=clock)
    for _ in range(4):
        await _fail(b)
        clock.now += 10
    assert b.state == "closed"
    await _fail(b)  # the 5th within 60 s
    assert b.state == "open"
    clock.now += 12
    with pytest.raises(Unavailable) as err:
        await _ok(b)
    assert err.value.reason == "BACKEND_UNAVAILABLE"
    (retry,) = [d for d in err.value.details() if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry.retry_delay.seconds == 18  # until half-open


async def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    b = CircuitBreaker("x", clock=clock)
    for _ in range(4):
        await _fail(b)
    clock.now += 61
    await _fail(b)
    assert b.state == "closed"
    await _ok(b)  # a success resets the count
    for _ in range(4):
        await _fail(b)
    assert b.state == "closed"


async def test_half_open_after_30s_one_trial_success_closes_failure_reopens() -> None:
    clock = Clock()
    b = CircuitBreaker("x", clock=clock)
    for _ in range(5):
        await _fail(b)
    clock.now += 29.9
    with pytest.raises(Unavailable):
        await _ok(b)
    clock.now += 0.1
    assert b.state == "half_open"
    await _fail(b)  # the trial fails: open for another 30 s
    assert b.state == "open"
    clock.now += 30
    # Half-open admits one trial; a second concurrent call still fails fast.
    b.before()
    with pytest.raises(Unavailable):
        b.before()
    b.success()
    assert b.state == "closed"
    await _ok(b)


async def test_caller_errors_are_not_failures() -> None:
    b = CircuitBreaker("x", clock=Clock())
    for _ in range(10):
        with pytest.raises(InvalidArgument):
            async with b.guard():
                raise InvalidArgument([("f", "bad")])
    assert b.state == "closed"


async def test_media_router_creation_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from classmesh.core.config import load_config
    from classmesh.media import service as media_service
    from tests.unit.test_media_turn import SESSION, _principal

    svc = media_service.MediaService(SimpleNamespace(config=load_config({})))  # type: ignore[arg-type]
    clock = Clock()
    svc.breaker.clock = clock

    async def broken(router_id: str) -> str:
        raise OSError("no ports left")

    monkeypatch.setattr(svc.aiortc, "open_router", broken)
    for _ in range(5):
        with pytest.raises(OSError):
            await svc.create_router(_principal(), SESSION, "", check_session=False)
    with pytest.raises(Unavailable) as err:
        await svc.create_router(_principal(), SESSION, "", check_session=False)
    assert err.value.reason == "MEDIA_UNAVAILABLE" and err.value.retry_after == 30
    assert not svc.open
    await svc.close_all()  # stops the media worker the back-end started
