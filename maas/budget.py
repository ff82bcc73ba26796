"""One time budget for a training run (`budget.time_s`, `maas run --budget 10m`), split across the
stages whose cost grows with the data by a stated rule: each stage gets its share of what is left
when it starts, in proportion to its weight among itself and the stages still to come, so time an
earlier stage did not use passes on. Each stage turns its allotment into its own limit (the study's
timeout, the families' time budget, the training's and the fine-tuning's max_seconds, the text
encoder's fine-tuning and distillation) and says what
it cut. Data, evaluation, registry and packaging are not budgeted: they are seconds.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

DEFAULT_BUDGET_S = 540.0  # 9 minutes: a 200,000-row, 20-column table ran in ~500 s on 2 cores; the built-ins take < 2
# Of the run's budget, in stage order. "text" (fine-tuning and distilling the text encoder) runs only
# when asked (data.text_finetune_epochs); otherwise the later stages share the whole budget as before.
SHARES = {"text": 0.45, "tune": 0.40, "compare": 0.30, "train": 0.15, "compress": 0.15}
MIN_BUDGET_SAMPLE_ROWS = 2_000  # a smaller budget samples no fewer rows than this (folds of ~400 held-out rows)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def rows_for_budget(sample_rows: int | None, time_s: float | None) -> int | None:
    """A sample's size under the run's budget: the configured size is what the default budget pays
    for, and trial and fold cost is ~linear in rows, so the size follows the budget both ways, down to
    MIN_BUDGET_SAMPLE_ROWS (or the configured size, if smaller). A 200,000-row table under `--budget
    60s` kept 20,000-row samples: one trial ran 44 s past the study's 21 s, the families took 76 s of
    their 1 s, and the final network had no time left (154 s for the 60, test F1 0.52 against the
    default budget's 0.62). No budget keeps the configured size; None (every row) stays None."""
    if sample_rows is None or time_s is None:
        return sample_rows
    return max(min(sample_rows, MIN_BUDGET_SAMPLE_ROWS), int(sample_rows * time_s / DEFAULT_BUDGET_S))


def parse_duration(text: str) -> float:
    """'600', '90s', '10m', '1.5h', '30d' -> seconds; ValueError naming the text otherwise."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a duration (examples: 600, 90s, 10m, 1.5h, 30d)")
    return float(found.group(1)) * UNITS[found.group(2) or "s"]


@dataclass
class Budget:
    """The run's clock against its budget (None: unbounded), and what each stage was allotted and cut."""

    time_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    allotted: dict[str, float] = field(default_factory=dict)
    cuts: dict[str, str] = field(default_factory=dict)

    def allot(self, stage: str) -> float | None:
        """Seconds for `stage` now: its weight's share of what is left among it and the later stages."""
        if self.time_s is None:
            return None
        stages = list(SHARES)
        later = stages[stages.index(stage):]
        left = max(0.0, self.time_s - (time.monotonic() - self.started))
        seconds = max(1.0, left * SHARES[stage] / sum(SHARES[name] for name in later))
        self.allotted[stage] = seconds
        return seconds

    def limit(self, stage: str, configured: float | None) -> float | None:
        """The stage's own limit under the budget: the smaller of what is configured and its allotment."""
        allotted = self.allot(stage)
        if allotted is None:
            return configured
        return allotted if configured is None else min(configured, allotted)

    def progress(self, stage: str) -> tuple[float, str]:
        """How far the run is (a fraction of its budget) and one line saying so as `stage` starts."""
        elapsed = time.monotonic() - self.started
        if self.time_s is None:
            return 0.0, f"{stage}: starting at {elapsed:.0f} s (no time budget)"
        left = max(0.0, self.time_s - elapsed)
        return elapsed / self.time_s, (f"{stage}: starting at {elapsed:.0f} s of the run's {self.time_s:.0f} s budget; "
                                       f"at most ~{left:.0f} s left for the budgeted stages")

    def cut(self, stage: str, what: str) -> None:
        self.cuts[stage] = what

    def report(self) -> dict:
        return {"time_s": self.time_s, "elapsed_s": round(time.monotonic() - self.started, 1),
                "allotted_s": {stage: round(seconds, 1) for stage, seconds in self.allotted.items()},
                "cut": dict(self.cuts)}
