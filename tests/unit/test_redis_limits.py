"""Tier limits shared by replicas through Redis (serving.limits_backend: redis), against the real
server: two processes standing for two hosts get one key's rate and quota once between them. Each
test uses its own key prefix and deletes it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from deployments.redis_limits import RedisLimits, check_reachable
from maas.errors import MaasInputError
from tests.unit.test_gate import wine  # noqa: F401 - the fixture
from tests.unit.test_limits import no_rows_yet, run_in_two_processes

pytestmark = pytest.mark.team

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix():
    """A fresh key prefix on the machine's Redis, removed afterwards; skips where there is no Redis."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 (team tests need it)")
    name = f"maas-test-{uuid.uuid4().hex[:12]}:"
    yield name
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)


def hammer(prefix, per_minute, attempts, results):
    limits = RedisLimits(REDIS_URL, prefix, no_rows_yet)

    async def takes():
        return sum([(await limits.take("k1", per_minute)).wait == 0 for _ in range(attempts)])

    results.put(asyncio.run(takes()))


def reserve(prefix, attempts, results):
    limits = RedisLimits(REDIS_URL, prefix, no_rows_yet)

    async def reserves():
        return sum([await limits.reserve_rows("k1", 10, 1000, "2026-11") for _ in range(attempts)])

    results.put(asyncio.run(reserves()))


def test_two_replicas_share_one_keys_request_rate(prefix):
    allowed = run_in_two_processes(hammer, prefix, 50, 200)
    assert sum(allowed) in (50, 51)  # the bucket holds 50, not 50 per replica; ~1 token of refill at most


def test_two_replicas_share_one_keys_monthly_rows(prefix):
    allowed = run_in_two_processes(reserve, prefix, 80)
    assert sum(allowed) == 100  # 1000 rows of quota / 10 per request, between both


def test_the_quota_starts_from_the_metered_rows_and_resets_with_the_month(prefix):
    used = {("k1", "2026-11"): 990}
    limits = RedisLimits(REDIS_URL, prefix, lambda key, month: used.get((key, month), 0))
    assert asyncio.run(limits.reserve_rows("k1", 10, 1000, "2026-11"))
    assert not asyncio.run(limits.reserve_rows("k1", 1, 1000, "2026-11"))  # a loop of its own: a client of its own
    assert asyncio.run(limits.reserve_rows("k1", 1000, 1000, "2026-12"))
    other_replica = RedisLimits(REDIS_URL, prefix, lambda key, month: 0)  # its own usage table knows nothing
    assert not asyncio.run(other_replica.reserve_rows("k1", 1, 1000, "2026-11"))  # the month's count is Redis's, seeded once


def test_a_key_waits_for_its_next_token(prefix):
    limits = RedisLimits(REDIS_URL, prefix, no_rows_yet)

    async def checks():
        first, second = await limits.take("k1", 2), await limits.take("k1", 2)
        assert (first.wait, second.wait) == (0, 0) and round(first.remaining) == 1 and round(second.remaining) == 0
        assert 25 < (await limits.take("k1", 2)).wait <= 30  # 2 per minute: the next token in ~30 s
        assert await limits.take("other", 2) == (0, 1)

    asyncio.run(checks())


def test_a_check_waiting_on_redis_leaves_the_event_loop_to_other_requests(prefix):
    """Redis paused for 0.5 s (CLIENT PAUSE, from another connection): a check waits it out, while
    the worker's event loop keeps running (here a ticker every 10 ms). A blocking client held the
    loop for the whole pause, and every other request of the worker with it."""
    import redis

    limits = RedisLimits(REDIS_URL, prefix, no_rows_yet)

    async def check_during_a_pause() -> tuple[int, float]:
        await limits.take("k1", 100)  # connected before the pause
        ticks, done = 0, asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        redis.Redis.from_url(REDIS_URL).execute_command("CLIENT", "PAUSE", 500, "WRITE")
        started = time.perf_counter()
        taken = await limits.take("k1", 100)
        waited = time.perf_counter() - started
        done.set()
        await ticking
        assert taken.wait == 0
        return ticks, waited

    ticks, waited = asyncio.run(check_during_a_pause())
    assert waited > 0.3, waited  # the check did wait for Redis
    assert ticks >= 10, ticks  # ~50 ticks of 10 ms while it waited; a blocked loop ticks none


def test_an_unreachable_redis_lets_requests_through_and_says_so(caplog):
    limits = RedisLimits("redis://127.0.0.1:1/0", "maas-test-nowhere:", no_rows_yet)  # nothing listens on port 1
    with caplog.at_level("WARNING", logger="maas"):
        assert asyncio.run(limits.take("k1", 1)).wait == 0 and asyncio.run(limits.take("k1", 1)).wait == 0
        assert asyncio.run(limits.reserve_rows("k1", 10, 1, "2026-11"))
    warnings = [record for record in caplog.records if "tier limits not enforced" in record.message]
    assert len(warnings) == 1  # once per 10 s, not once per request
    with pytest.raises(MaasInputError, match=r"serving.redis_url: cannot reach redis://u:\*\*\*@127.0.0.1:1/0"):
        check_reachable("redis://u:secret@127.0.0.1:1/0")


def test_two_gates_on_the_redis_backend_are_one_tier_limit(wine, maas_home, prefix):
    from maas.api_keys import create_key
    from maas.service_store import connect
    from tests.unit.test_gate import call, gate_for

    bundle, rows = wine
    _, free = create_key(connect(), "f", "free")  # 2 requests a minute
    replicas = [gate_for(bundle, limits_backend="redis", redis_url=REDIS_URL, limits_prefix=prefix) for _ in range(2)]
    request = ("POST", "/predict", {"json": {"rows": rows[:1]}, "headers": {"X-API-Key": free}})
    statuses = [call(replicas[index % 2], [request])[0].status_code for index in range(3)]
    assert statuses == [200, 200, 429]  # the second replica's request took the key's last token
