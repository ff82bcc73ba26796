"""Live quality: the served model's predictions against ground truth that arrived later, and the
rollback rule for a new champion that does worse live than the one it replaced."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

QUALITY_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def label_metrics(true: pd.Series, predicted: pd.Series, labels: list[str]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the model's label set."""
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        true, predicted, labels=labels, average="macro", zero_division=0)
    return {"accuracy": float(skm.accuracy_score(true, predicted)), "precision_macro": float(precision),
            "recall_macro": float(recall), "f1_macro": float(f1)}


@dataclass(frozen=True)
class QualityReport:
    version: str
    n_labelled: int
    judged: bool  # False: too few labelled rows to say
    metrics: dict[str, float]
    test_metrics: dict[str, float]
    f1_drop: float | None  # test F1 - live F1
    alert: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_quality(labelled: pd.DataFrame, version: str, labels: list[str], test_metrics: dict[str, float],
                 min_rows: int, max_drop: float) -> QualityReport:
    """Quality of one model version on its labelled rows (columns: version, predicted, label)."""
    mine = labelled[labelled["version"] == version]
    if mine.empty:
        return QualityReport(version, 0, False, {}, test_metrics, None, False)
    live = label_metrics(mine["label"], mine["predicted"], labels)
    drop = test_metrics.get("f1_macro", live["f1_macro"]) - live["f1_macro"]
    judged = len(mine) >= min_rows
    return QualityReport(version, len(mine), judged, live, test_metrics, float(drop), judged and drop > max_drop)


@dataclass(frozen=True)
class RollbackDecision:
    roll_back: bool
    reason: str
    new_f1: float | None = None
    old_f1: float | None = None


def rollback_decision(champion_version: str, replaced_version: str | None, new_f1: float | None,
                      old_f1: float | None, n_rows: int, min_rows: int, margin: float) -> RollbackDecision:
    """Roll back only on evidence: both versions scored on the same labelled rows served by the
    new champion, enough of them, and the old one ahead by more than the margin."""
    if replaced_version is None:
        return RollbackDecision(False, f"v{champion_version} replaced no champion")
    if new_f1 is None or old_f1 is None or n_rows < min_rows:
        return RollbackDecision(False, f"{n_rows} labelled rows served by v{champion_version}; {min_rows} needed")
    if old_f1 > new_f1 + margin:
        return RollbackDecision(True, f"v{champion_version} live F1 {new_f1:.4f} is below replaced v{replaced_version}'s "
                                      f"{old_f1:.4f} on the same {n_rows} labelled rows", new_f1, old_f1)
    return RollbackDecision(False, f"v{champion_version} live F1 {new_f1:.4f} holds against v{replaced_version}'s "
                                   f"{old_f1:.4f} on {n_rows} rows", new_f1, old_f1)


def predicted_labels(bundle, rows: pd.DataFrame) -> np.ndarray:
    """Another version's labels for the same raw rows (for the rollback comparison)."""
    return np.asarray(bundle.labels, dtype=object)[bundle.predict_proba(rows).argmax(1)]
