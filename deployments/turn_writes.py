"""Work put off to the end of an event-loop turn: /predict's Prometheus writes, folded (TurnWrites),
and its access lines, written together (predict_first.AccessLog).

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
from abc import ABC, abstractmethod
from bisect import bisect_left


class EndOfTurn(ABC):
    """What `flush` does, put off to the end of the running event loop's turn, once however many
    times it is asked for in the turn: before the loop polls for more requests. Outside a running
    loop, done at once. A loop stopped before its flush ran leaves the work to the next loop's."""

    due_on = None  # the loop a flush is scheduled on

    def flush_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self.due_on is not loop:  # not yet scheduled, or on a loop stopped before its flush ran
            loop.call_soon(self._flush_due)
            self.due_on = loop

    def _flush_due(self) -> None:
        self.due_on = None
        self.flush()

    @abstractmethod
    def flush(self) -> None:
        """The work put off."""


class TurnWrites(EndOfTurn):
    """Increments (counters, gauges) and histogram observations, added up per metric child and
    written at the end of the turn (EndOfTurn): /metrics lags an answer by the rest of the turn
    that sent it."""

    def __init__(self):
        self.increments: dict[object, float] = {}
        self.observations: dict[object, list[float]] = {}

    def inc(self, child, amount: float = 1.0) -> None:
        """child.inc(amount) (a gauge's child takes a negative amount)."""
        self.increments[child] = self.increments.get(child, 0.0) + amount
        self.flush_later()

    def observe(self, histogram, value: float) -> None:
        """histogram.observe(value)."""
        self.observations.setdefault(histogram, []).append(value)
        self.flush_later()

    def flush(self) -> None:
        increments, observations = self.increments, self.observations
        self.increments, self.observations = {}, {}
        for child, amount in increments.items():
            if amount:
                child.inc(amount)
        for histogram, values in observations.items():
            observe_all(histogram, values)


def observe_all(histogram, values: list[float]) -> None:
    """Histogram.observe for each value, with one write to the sum and one per bucket the values
    fall in, through the child's `_upper_bounds`, `_buckets` and `_sum` (prometheus_client as the
    lock file pins it; the turn-writes test in tests/unit/test_gate.py checks the result against
    observing each)."""
    counts: dict[int, int] = {}
    for value in values:
        index = bisect_left(histogram._upper_bounds, value)  # the first bound >= value, as observe picks; the last is +Inf
        counts[index] = counts.get(index, 0) + 1
    histogram._sum.inc(sum(values))
    for index, count in counts.items():
        histogram._buckets[index].inc(count)


writes = TurnWrites()  # this worker's: one flush a turn for the front's metrics and the gate's
