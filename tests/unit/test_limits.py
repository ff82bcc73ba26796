"""Tier limits shared by worker processes: two processes drawing on one key get its rate and its
quota once between them, not once each."""

from __future__ import annotations

import multiprocessing

from deployments.limits import SharedLimits


def no_rows_yet(key_id: str, month: str) -> int:
    return 0


def hammer(path, key_id, per_minute, attempts, results):
    limits = SharedLimits(path, no_rows_yet, capacity=64)
    results.put(sum(limits.take(key_id, per_minute).wait == 0 for _ in range(attempts)))


def reserve(path, attempts, results):
    limits = SharedLimits(path, no_rows_yet, capacity=64)
    results.put(sum(limits.reserve_rows("k1", 10, 1000, "2026-11") for _ in range(attempts)))


def run_in_two_processes(target, *args) -> list[int]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=target, args=(*args, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return [results.get(timeout=5) for _ in workers]


def test_two_processes_share_one_keys_request_rate(tmp_path):
    allowed = run_in_two_processes(hammer, tmp_path / "limits.bin", "k1", 50, 200)
    assert sum(allowed) in (50, 51)  # the bucket holds 50; a refill of ~1 token during the run at most


def test_two_processes_share_one_keys_monthly_rows(tmp_path):
    allowed = run_in_two_processes(reserve, tmp_path / "limits.bin", 80)
    assert sum(allowed) == 100  # 1000 rows of quota / 10 per request


def test_the_quota_starts_from_the_metered_rows_and_resets_with_the_month(tmp_path):
    used = {("k1", "2026-11"): 990}
    limits = SharedLimits(tmp_path / "limits.bin", lambda key, month: used.get((key, month), 0), capacity=64)
    assert limits.reserve_rows("k1", 10, 1000, "2026-11")
    assert not limits.reserve_rows("k1", 1, 1000, "2026-11")
    assert limits.reserve_rows("k1", 1000, 1000, "2026-12")
    assert limits.reserve_rows("k2", 5, 5, "2026-11") and not limits.reserve_rows("k2", 1, 5, "2026-11")


def test_a_key_waits_for_its_next_token(tmp_path):
    limits = SharedLimits(tmp_path / "limits.bin", no_rows_yet, capacity=64)
    first, second = limits.take("k1", 2), limits.take("k1", 2)
    assert (first.wait, second.wait) == (0, 0) and round(first.remaining) == 1 and round(second.remaining) == 0
    assert 25 < limits.take("k1", 2).wait <= 30  # 2 per minute: the next token in ~30 s
    assert limits.take("other", 2) == (0, 1)
