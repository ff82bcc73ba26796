"""Tier limits shared by service replicas on several hosts (`serving.limits_backend: redis`).

The `local` backend (deployments/limits.py) shares a key's token bucket and monthly rows between
the workers of one `bentoml serve`; replicas behind a load balancer would each let a key through
at its full rate. Here both live in Redis and each check is one Lua script, so the read, the
decision and the write are atomic across every replica. The bucket refills on Redis's own clock
(`TIME`), not the replicas', so hosts whose clocks disagree still share one rate.

Keys, under `serving.limits_prefix`: `bucket:<key id>` (a hash: tokens, last refill; it expires
after two idle minutes, by when it would be full again anyway) and `rows:<key id>:<YYYY-MM>` (the
month's rows; it starts from the local usage table the first time a month is seen, and expires
after 40 days).

The checks are coroutines on redis-py's asyncio client: a worker's event loop answers other
requests while one waits on Redis. With the blocking client it waited out every round trip, two a
request: one worker answered ~1,700 one-row requests a second at concurrency 32 on loopback, against
2,600-2,700 now and 4,200-5,800 with the local backend (a Zen 4 EPYC, its 2 cores shared with Redis
and the client), at 0.48 ms of the service's CPU a request against 0.39-0.40; on a network a round
trip weighs more (`benchmarks/results/team.md` has the replicas on PostgreSQL).

If Redis cannot be reached, a check lets the request through and says so (one warning per 10 s
at most): the default of Envoy's rate limit filter, since limits that stop the service when their
store is down turn a Redis outage into an API outage. Every answered request is still metered in
the usage table, so a bill is right even when a limit was not enforced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from deployments.limits import Taken

logger = logging.getLogger("maas")

TAKE_TOKEN = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = rate
else
  tokens = math.min(rate, tokens + (now - tonumber(state[2])) * rate / 60)
end
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) * 60 / rate
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return tostring(wait) .. ' ' .. tostring(tokens)
"""

RESERVE_ROWS = """
local found = redis.call('GET', KEYS[1])
if not found then
  return -1
end
local used = tonumber(found)
local rows = tonumber(ARGV[1])
if used + rows <= tonumber(ARGV[2]) then
  redis.call('INCRBY', KEYS[1], rows)
  return 1
end
return 0
"""

MONTH_TTL_S = 40 * 24 * 3600
WARN_EVERY_S = 10.0


class RedisLimits:
    """The same two checks as SharedLimits, against one Redis for every replica, as coroutines."""

    awaited = True  # take and reserve_rows return coroutines (deployments/gate.py awaits them)

    def __init__(self, url: str, prefix: str, rows_so_far: Callable[[str, str], int]):
        """rows_so_far(key_id, month "YYYY-MM"): rows already metered for a key this month (a month
        Redis has not seen yet starts there)."""
        import redis

        self.url, self.prefix, self.rows_so_far, self.warned_at = url, prefix, rows_so_far, float("-inf")
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._loop, self._bound = None, None  # the running loop's client and scripts (_scripts)

    def _scripts(self):
        """(client, take script, reserve script) of the running event loop. An asyncio client's
        connections belong to the loop that opened them: a worker has one loop, but a caller that
        runs each check in a loop of its own (asyncio.run) gets a client per loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            self._loop = loop
            self._bound = client, client.register_script(TAKE_TOKEN), client.register_script(RESERVE_ROWS)
        return self._bound

    async def take(self, key_id: str, per_minute: int) -> Taken:
        """wait 0 if the key may make a request now (and the token is spent), else the seconds to wait."""
        try:
            _, take_token, _ = self._scripts()
            wait, tokens = (await take_token(keys=[f"{self.prefix}bucket:{key_id}"], args=[per_minute])).split()
            return Taken(float(wait), float(tokens))
        except self._errors as error:
            self._unreachable(error)
            return Taken(0.0, float(per_minute))

    async def reserve_rows(self, key_id: str, rows: int, monthly_rows: int, month: str) -> bool:
        """Count `rows` against the key's monthly quota if they fit; False (nothing counted) if not."""
        counter = f"{self.prefix}rows:{key_id}:{month}"
        try:
            client, _, reserve = self._scripts()
            fits = await reserve(keys=[counter], args=[rows, monthly_rows])  # one round trip once the month is seeded
            if fits == -1:  # the month is new to Redis: the first replica seeds it, the others keep that seed
                # (rows_so_far reads the usage table on the loop's thread: once per key and month)
                await client.set(counter, self.rows_so_far(key_id, month), nx=True, ex=MONTH_TTL_S)
                fits = await reserve(keys=[counter], args=[rows, monthly_rows])
            return fits == 1
        except self._errors as error:
            self._unreachable(error)
            return True

    def _unreachable(self, error: Exception) -> None:
        if time.monotonic() - self.warned_at >= WARN_EVERY_S:
            self.warned_at = time.monotonic()
            logger.warning("tier limits not enforced: Redis unreachable (%s: %s); requests are let through and metered",
                           error.__class__.__name__, str(error)[:200])


def check_reachable(url: str) -> None:
    """Before a service starts on the redis backend: a wrong URL or a server that is down is one
    line naming it (the password left out), not a service that silently enforces nothing."""
    import redis

    from maas.errors import MaasInputError
    from maas.tracking import redact_url

    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, ValueError) as error:
        raise MaasInputError(f"serving.redis_url: cannot reach {redact_url(url)} for the tier limits "
                             f"({error.__class__.__name__}: {str(error)[:200]})") from None
