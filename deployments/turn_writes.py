"""Prometheus writes of /predict, folded over one turn of the event loop.

Under `bentoml serve` prometheus_client runs in multiprocess mode: every increment or observation
takes a lock, asks the kernel for the pid and packs a value into the worker's memory-mapped file
(2.6 us a counter's, 5.7 us a histogram's, in a tight loop on a Zen 3 EPYC). /predict made six a
request: in progress up and down, the request count, the duration's sum and bucket, and the
predictions by model. With one text a request at concurrency 32, taking them out lowered the event
loop's CPU a request by ~0.035 of its ~0.38 ms (paired rounds, the model replaced by a sleep so that
the loop's cost was not lost in the encoder's). The answers of one model call go out in one turn of
the loop, so their writes fold into one per metric and bucket: -0.018 ms a request so served (5
paired rounds), and the gate in-process (benchmarks/gate_cpu.py) 0.150-0.152 -> 0.127-0.143 ms.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left


class TurnWrites:
    """Increments (counters, gauges) and histogram observations, added up per metric child and
    written at the end of the running event loop's turn, before the loop polls for more requests:
    /metrics lags an answer by the rest of the turn that sent it. Outside a running loop, written
    at once."""

    def __init__(self):
        self.increments: dict[object, float] = {}
        self.observations: dict[object, list[float]] = {}
        self.due_on = None  # the loop a flush is scheduled on

    def inc(self, child, amount: float = 1.0) -> None:
        """child.inc(amount) (a gauge's child takes a negative amount)."""
        self.increments[child] = self.increments.get(child, 0.0) + amount
        self._flush_later()

    def observe(self, histogram, value: float) -> None:
        """histogram.observe(value)."""
        self.observations.setdefault(histogram, []).append(value)
        self._flush_later()

    def _flush_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self.due_on is not loop:  # not yet scheduled, or on a loop stopped before its flush ran
            loop.call_soon(self.flush)
            self.due_on = loop

    def flush(self) -> None:
        increments, observations = self.increments, self.observations
        self.increments, self.observations, self.due_on = {}, {}, None
        for child, amount in increments.items():
            if amount:
                child.inc(amount)
        for histogram, values in observations.items():
            observe_all(histogram, values)


def observe_all(histogram, values: list[float]) -> None:
    """Histogram.observe for each value, with one write to the sum and one per bucket the values
    fall in (prometheus_client's child keeps `_upper_bounds`, `_buckets` and `_sum`; a child
    without them is given each value)."""
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        index = bisect_left(bounds, value)  # the first bound >= value, as Histogram.observe picks; the last is +Inf
        counts[index] = counts.get(index, 0) + 1
    total.inc(sum(values))
    for index, count in counts.items():
        buckets[index].inc(count)


writes = TurnWrites()  # this worker's: one flush a turn for the front's metrics and the gate's
