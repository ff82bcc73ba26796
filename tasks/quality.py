"""Live quality: the served model's predictions against ground truth that arrived later, and the
rollback rule for a new champion that does worse live than the one it replaced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from maas.bundle import ModelBundle
from maas.config import MonitoringConfig
from maas.registered import ModelRef, alias_version, aliases_held, download_bundle, move_alias
from maas.run_context import RunContext

if TYPE_CHECKING:
    from tasks.check import Check

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

    def firing(self) -> dict[str, str]:
        if not self.alert:
            return {}
        return {"quality": f"live F1 {self.metrics['f1_macro']:.4f} on {self.n_labelled} labelled rows is "
                           f"{self.f1_drop:.4f} below the test F1 {self.test_metrics.get('f1_macro', float('nan')):.4f}"}

    def figures(self) -> dict[str, float]:
        figures = {f"live/{name}": value for name, value in self.metrics.items()}
        figures["live/n_labelled"] = self.n_labelled
        if self.f1_drop is not None:
            figures["live/f1_drop"] = self.f1_drop
        return figures


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
    action: str = ""  # what was done, when it rolled back

    def firing(self) -> dict[str, str]:
        return {"rollback": f"{self.action}: {self.reason}"} if self.roll_back else {}


def rollback_decision(champion_version: str, replaced_version: str | None, new_f1: float | None,
                      old_f1: float | None, n_rows: int, monitoring: MonitoringConfig) -> RollbackDecision:
    """Roll back only on evidence: both versions scored on the same labelled rows served by the new
    champion, enough of them (min_labelled_rows), and the old one ahead by more than rollback_margin."""
    min_rows, margin = monitoring.min_labelled_rows, monitoring.rollback_margin
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
    return bundle.labels_of(bundle.predict_proba(rows))


# --- in a check -------------------------------------------------------------------------------------


def check_quality(check: Check) -> QualityReport | None:
    """Live quality of the watched version on the labelled rows of the quality window."""
    if check.labelled is None:
        return None
    monitoring, watched = check.monitoring, check.watched
    return live_quality(check.labelled, watched.ref.version, watched.bundle.labels,
                        watched.bundle.metadata.get("metrics", {}), monitoring.min_labelled_rows,
                        monitoring.max_quality_drop)


def record_quality(ctx: RunContext, quality: QualityReport | None) -> None:
    if quality is not None:
        ctx.record(metrics=quality.figures())


def check_rollback(check: Check) -> RollbackDecision | None:
    """Score the replaced champion on the labelled rows the new champion served; give the alias back
    if it wins. Only for a watched alias (a pinned NAME/3 has none to move) with labels."""
    monitoring, watched, labelled = check.monitoring, check.watched, check.labelled
    if labelled is None or not monitoring.rollback or not watched.ref.alias:
        return None
    hidden = check.hidden_inputs
    if hidden:
        return RollbackDecision(False, f"not judged: the prediction log keeps {', '.join(hidden)} under a privacy "
                                       "policy, so the replaced version cannot re-score the rows", None, None)
    mine = labelled[labelled["version"] == watched.ref.version]
    new_f1 = old_f1 = None
    replaced = ModelRef(watched.ref.name, version=watched.replaced_version) if watched.replaced_version else None
    if replaced and len(mine) >= monitoring.min_labelled_rows:
        old = ModelBundle.load(download_bundle(replaced, check.ctx.scratch_dir("replaced")))
        rows = check.recent.inputs.iloc[mine["position"].to_numpy()]
        labels = watched.bundle.labels
        new_f1 = label_metrics(mine["label"], mine["predicted"], labels)["f1_macro"]
        old_f1 = label_metrics(mine["label"], pd.Series(predicted_labels(old, rows), index=mine.index), labels)["f1_macro"]
    decision = rollback_decision(watched.ref.version, watched.replaced_version, new_f1, old_f1, len(mine), monitoring)
    if decision.roll_back:
        client, name, alias = check.ctx.client, watched.ref.name, watched.ref.alias
        with aliases_held(name):
            now = alias_version(client, name, alias)
            if now != watched.ref.version:  # a run or a person moved it while this check scored
                return replace(decision, roll_back=False, reason=f"{decision.reason}; not rolled back: @{alias} "
                                                                 f"moved to v{now} during the check")
            move_alias(client, ModelRef(name, alias, watched.replaced_version), watched.ref.version,
                       "alias.rollback", decision.reason, "monitoring flow")
            client.set_model_version_tag(name, watched.ref.version, "rolled_back", decision.reason[:500])
        decision = replace(decision, action=f"@{alias} rolled back to v{watched.replaced_version}")
    return decision


def record_rollback(ctx: RunContext, rollback: RollbackDecision | None) -> None:
    if rollback is not None and rollback.old_f1 is not None:
        ctx.record(metrics={"rollback/replaced_f1": rollback.old_f1})


@task(name="live-quality", retries=0, cache_policy=NO_CACHE)
def quality_task(check: Check) -> QualityReport | None:
    return check.ctx.run_stage("quality", partial(check_quality, check), record_quality)


@task(name="rollback", retries=0, cache_policy=NO_CACHE)
def rollback_task(check: Check) -> RollbackDecision | None:
    return check.ctx.run_stage("rollback", partial(check_rollback, check), record_rollback)
