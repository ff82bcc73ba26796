"""Seeded monitoring scenarios: what the drift and quality tests and `benchmarks/false_alarms.py`
draw their logged rows and labels from, so the figures the README cites and the tests check are
one and the same scenario."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from tasks.drift import build_reference

# a 3-class model: the classes' shares, and P(predicted | true) of a model as tested (macro F1 ~0.80),
# of one that decayed to ~0.66, and of one that decayed much further
THREE, THREE_SHARES = ["a", "b", "c"], np.array([0.6, 0.3, 0.1])
KEPT = np.array([[0.9, 0.07, 0.03], [0.12, 0.8, 0.08], [0.1, 0.15, 0.75]])
DECAYED = np.array([[0.8, 0.15, 0.05], [0.25, 0.65, 0.1], [0.2, 0.25, 0.55]])
WORSE = np.array([[0.7, 0.2, 0.1], [0.35, 0.5, 0.15], [0.3, 0.3, 0.4]])

ORDERS_PREPROCESSING = {"numeric": [{"name": "ordered", "date": True}, {"name": "amount"}], "categorical": []}


def three_class_windows(rng: np.random.Generator, version: str = "3"):
    """window(n, confusion): n labelled rows (version, predicted, label) of a 3-class model that errs
    as `confusion` says."""
    def window(n: int, confusion: np.ndarray) -> pd.DataFrame:
        true = rng.choice(3, n, p=THREE_SHARES)
        predicted = (rng.uniform(size=(n, 1)) < np.cumsum(confusion[true], axis=1)).argmax(axis=1)
        return pd.DataFrame({"version": version, "predicted": np.array(THREE)[predicted], "label": np.array(THREE)[true]})
    return window


class ManyNames(NamedTuple):
    """A categorical column of many names: training's reference, the names' shares, and the shares
    once a mid-frequency name takes a quarter of the rows."""

    column: str
    names: np.ndarray
    shares: np.ndarray
    moved: np.ndarray
    reference: dict

    def logged(self, rng: np.random.Generator, n: int, shares: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({self.column: rng.choice(self.names, n, p=shares), "usage": rng.normal(size=n)})


def many_names(rng: np.random.Generator, levels: int, column: str) -> ManyNames:
    """3,000 training rows of a column of `levels` names (Dirichlet shares) beside a numeric one."""
    shares = rng.dirichlet(np.full(levels, 2.0))
    names = np.array([f"{column} {index}" for index in range(levels)], dtype=object)
    train = pd.DataFrame({column: rng.choice(names, 3000, p=shares), "usage": rng.normal(size=3000)})
    preprocessing = {"numeric": [{"name": "usage"}], "categorical": [{"name": column}]}
    reference = build_reference(train, preprocessing, np.zeros(3000, dtype=int), ["no", "yes"], 2000, 0)
    moved = shares * 0.75
    moved[np.argsort(shares)[levels // 2]] += 0.25
    return ManyNames(column, names, shares, moved, reference)


def orders(rng: np.random.Generator, start: str, days: int, n: int) -> pd.DataFrame:
    """n orders dated within `days` from `start` (ISO strings, as a JSON client sends them)."""
    ordered = pd.Timestamp(start) + pd.to_timedelta(rng.integers(0, days, n), unit="D")
    return pd.DataFrame({"ordered": ordered.strftime("%Y-%m-%d"), "amount": rng.lognormal(4, 0.8, n)})
