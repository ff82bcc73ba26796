"""The patched BentoML TimeoutMiddleware: its per-request timer is cancelled, a request past the
timeout still gets 504, and a request that fails before answering does not wait for the timer."""

from __future__ import annotations

import asyncio
import time

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from deployments.bentoml_fixes import cancel_bentoml_timeout_timers

cancel_bentoml_timeout_timers()


def call(app, timeout: float) -> tuple[list[dict], int]:
    """Run one HTTP request through the middleware; (sent messages, timers left on the loop)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def run():
        await TimeoutMiddleware(app, timeout=timeout)({"type": "http", "path": "/predict"}, receive, send)
        return len([handle for handle in asyncio.get_running_loop()._scheduled if not handle.cancelled()])

    return sent, asyncio.run(run())


async def answers(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_finished_request_leaves_no_timer_behind():
    sent, timers_left = call(answers, timeout=30)
    assert sent[0]["status"] == 200 and timers_left == 0


def test_a_slow_request_still_gets_504():
    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent, _ = call(slow, timeout=0.05)
    assert sent[0]["status"] == 504


def test_a_request_that_fails_before_answering_raises_at_once():
    async def fails(scope, receive, send):
        raise RuntimeError("model exploded")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="model exploded"):
        call(fails, timeout=30)
    assert time.monotonic() - started < 5
