"""The patched BentoML TimeoutMiddleware: its per-request timer is cancelled, a request past the
timeout still gets 504, and a request that fails before answering does not wait for the timer. The
workers' own listening sockets: new connections are dealt to them, never left on the shared one;
a worker holding two more connections than another closes one."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from deployments.bentoml_fixes import cancel_bentoml_timeout_timers
from deployments.connections import ConnectionShares, own_listener

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


def accepted(listener: socket.socket) -> int:
    """How many connections wait in a listening socket's queue (accepted here and closed)."""
    count = 0
    while True:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT dealing is Linux's")
def test_connections_are_dealt_to_the_workers_own_sockets_not_the_shared_one():
    """As BentoML's arbiter binds the port first and its workers each add one (own_listener): 64
    connections land on the workers' sockets only, both of them."""
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    shared.bind(("127.0.0.1", 0))
    shared.listen(128)
    shared.setblocking(False)
    owned = [own_listener(shared, 2) for _ in range(2)]
    clients = []
    try:
        assert all(own is not None for own in owned)
        for own in owned:
            own.listen(128)  # as the worker's event loop does once it serves
        for _ in range(64):
            clients.append(socket.create_connection(shared.getsockname(), timeout=5))
        time.sleep(0.2)
        dealt = [accepted(own) for own in owned]
        assert accepted(shared) == 0 and sum(dealt) == 64 and min(dealt) >= 12, dealt
    finally:
        for open_socket in [*clients, *(own for own in owned if own is not None), shared]:
            open_socket.close()


def test_no_socket_of_its_own_where_the_port_is_not_shared():
    """A shared socket without SO_REUSEPORT (another server than BentoML's arbiter) and a single
    worker keep serving the shared socket alone."""
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen(8)
        assert own_listener(plain, 2) is None
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        assert own_listener(plain, 1) is None


def test_a_worker_two_connections_over_the_least_loaded_closes_one(tmp_path):
    """Two workers' sets of connections, counted in one mapped file as BentoML's workers share it."""
    first = ConnectionShares(tmp_path / "shares", 1, 2)
    second = ConnectionShares(tmp_path / "shares", 2, 2)
    for connection in range(5):
        first.add(connection)
    assert first.over_share() and not second.over_share()  # 5 against 0
    for connection in range(3):
        second.add(connection)
    assert first.over_share()  # 5 against 3
    first.discard(0)
    assert not first.over_share() and not second.over_share()  # 4 against 3
    second.remove(0)
    second.discard(1)
    assert list(second.counts) == [4, 1] and first.over_share() and not second.over_share()
