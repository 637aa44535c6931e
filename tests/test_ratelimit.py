"""The per-agent rate limiter's leases, against a real Redis (several limiters = processes)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from streamproc.ingest.ratelimit import RateLimiter
from streamproc.keys import Keys

# Refill is negligible during a test (one token per 1,000 s); lease_s sets a lease of 100.
SLOW = {"rate_per_s": 0.001, "lease_s": 100_000.0}


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_several_processes_never_admit_more_than_the_bucket(
    client: aioredis.Redis, keys: Keys
) -> None:
    limiters = [RateLimiter(client, keys, burst=300, **SLOW) for _ in range(3)]
    assert limiters[0].lease == 100
    admitted = 0
    refused = [False] * 3
    while not all(refused):
        for i, limiter in enumerate(limiters):
            if not refused[i]:
                if await limiter.take("agent", 7):
                    refused[i] = True
                else:
                    admitted += 7
    assert admitted <= 300  # tokens are taken from the shared bucket before they are spent
    # what the other two hold unspent when each is refused: less than a lease plus a cost each
    assert admitted >= 300 - 3 * (100 + 7)


async def test_a_lease_serves_the_next_requests_without_redis(
    client: aioredis.Redis, keys: Keys
) -> None:
    limiter = RateLimiter(client, keys, burst=1000, **SLOW)
    before = await evalsha_calls(client)
    for _ in range(50):
        assert await limiter.take("agent", 2) == 0
    assert await evalsha_calls(client) - before == 1  # 2 + 100 taken once, 49 served here
    other = RateLimiter(client, keys, burst=1000, **SLOW)  # another process sees less left
    tokens = float(await client.hget(keys.rate_limit("agent"), "tokens") or 0)
    assert tokens == 1000 - 102
    assert await other.take("agent", 1) == 0


async def test_held_tokens_expire(client: aioredis.Redis, keys: Keys) -> None:
    limiter = RateLimiter(client, keys, burst=1000, lease_ttl_s=0.05, **SLOW)
    before = await evalsha_calls(client)
    assert await limiter.take("agent", 1) == 0
    await asyncio.sleep(0.2)  # longer than lease_ttl_s: what it held is gone
    assert await limiter.take("agent", 1) == 0
    assert await evalsha_calls(client) - before == 2
    tokens = float(await client.hget(keys.rate_limit("agent"), "tokens") or 0)
    assert abs(tokens - (1000 - 2 * 101)) < 0.01  # the expired lease is not given back


async def test_without_leases_every_request_asks_redis_and_gets_its_cost(
    client: aioredis.Redis, keys: Keys
) -> None:
    limiter = RateLimiter(client, keys, rate_per_s=0.001, burst=10, lease_s=0)
    assert limiter.lease == 0
    results = [await limiter.take("agent", 3) for _ in range(4)]
    assert results[:3] == [0, 0, 0]
    assert results[3] >= 1  # Retry-After in seconds: 2 tokens at 0.001/s is a long wait
    tokens = float(await client.hget(keys.rate_limit("agent"), "tokens") or 0)
    assert 1 <= tokens < 1.01


async def test_agents_have_their_own_buckets_and_leases(client: aioredis.Redis, keys: Keys) -> None:
    limiter = RateLimiter(client, keys, burst=150, **SLOW)
    assert await limiter.take("a", 150) == 0  # the whole bucket, nothing held
    assert await limiter.take("a", 1) >= 1
    assert await limiter.take("b", 150) == 0
    # concurrent requests: the first leases 110, the second the 40 left; the rest are served
    # from those leases, not refused while this process holds tokens
    results = await asyncio.gather(*(limiter.take("c", 10) for _ in range(20)))
    assert results.count(0) == 15
    assert all(r >= 1 for r in results[15:])
