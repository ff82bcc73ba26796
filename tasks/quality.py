"""Live quality: the served model's predictions against ground truth that arrived later, and the
rollback rule for a new champion that does worse live than the one it replaced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

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
    """Accuracy and macro precision / recall / F1 over the model's labels that the rows hold as truth
    or prediction (as scikit-learn's default): a class that none of a window's rows has scored 0 and
    took its share of the macro mean (a 3-class model's window without its rare class lost a third)."""
    present = set(true) | set(predicted)
    held = [label for label in labels if label in present] or labels
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        true, predicted, labels=held, average="macro", zero_division=0)
    return {"accuracy": float(skm.accuracy_score(true, predicted)), "precision_macro": float(precision),
            "recall_macro": float(recall), "f1_macro": float(f1)}


BOOTSTRAP_DRAWS = 2000


def macro_f1_of(confusions: np.ndarray) -> np.ndarray:
    """Macro F1 of each confusion matrix (draws x true x predicted), over the labels it holds."""
    both = confusions.sum(axis=1) + confusions.sum(axis=2)  # predicted + true counts per label: 2tp + fp + fn
    f1 = np.divide(2 * np.einsum("dkk->dk", confusions), both, out=np.zeros(both.shape), where=both > 0)
    return f1.sum(axis=1) / np.maximum(1, (both > 0).sum(axis=1))


def with_resamples(counts: np.ndarray, seed: int) -> np.ndarray:
    """Row 0: the counts of each kind of labelled row; then BOOTSTRAP_DRAWS resamples of those rows,
    as multinomial counts. The live window and the test split draw with their own seeds: independent."""
    draws = np.random.default_rng(seed).multinomial(counts.sum(), counts / counts.sum(), size=BOOTSTRAP_DRAWS)
    return np.vstack([counts, draws]).astype(np.float64)


def bootstrap_f1(true: pd.Series, predictions: list[pd.Series], labels: list[str]) -> list[np.ndarray]:
    """Per prediction column, its macro F1 on the labelled rows as they are (element 0) and on
    BOOTSTRAP_DRAWS resamples of them (the rest). The rows are drawn jointly, as multinomial counts
    of the distinct (truth, predictions) rows: as cheap for 100,000 rows as for 30, and the columns
    of one draw score the same rows (a paired comparison). Rows outside the model's labels are left out."""
    index = {label: position for position, label in enumerate(labels)}
    k = len(labels)
    coded = pd.DataFrame({f"c{column}": values.map(index).to_numpy() for column, values in enumerate([true, *predictions])}).dropna()
    cells, counts = np.unique(coded.to_numpy(dtype=np.int64), axis=0, return_counts=True)
    if not len(counts):
        return [np.zeros(BOOTSTRAP_DRAWS + 1) for _ in predictions]
    weights = with_resamples(counts, seed=0)
    scores = []
    for column in range(1, cells.shape[1]):
        onehot = np.zeros((len(cells), k * k))
        onehot[np.arange(len(cells)), cells[:, 0] * k + cells[:, column]] = 1
        scores.append(macro_f1_of((weights @ onehot).reshape(-1, k, k)))
    return scores


def bias_corrected_quantile(scores: np.ndarray, level: float) -> float:
    """The bootstrap draws' quantile at `level`, moved by how far the draws' mean falls from the
    observed value (scores[0]): macro F1 on few rows reads low, a rare class's most."""
    observed, draws = scores[0], scores[1:]
    return float(np.quantile(draws, level) + observed - draws.mean())


def confusion_f1_draws(confusion: np.ndarray) -> np.ndarray:
    """Macro F1 of a confusion matrix of counts (element 0) and of BOOTSTRAP_DRAWS resamples of its rows."""
    return macro_f1_of(with_resamples(confusion.ravel(), seed=1).reshape(-1, *confusion.shape))


def f1_upper_bound(true: pd.Series, predicted: pd.Series, labels: list[str], confidence: float,
                   test_confusion: list[list[int]] | None = None) -> float:
    """The live macro F1's one-sided upper bound at `confidence` (bootstrap over labelled rows). Where
    the bundle kept its test split's confusion matrix, the test F1's own noise widens it: each draw
    of the live F1 less a draw's deviation of the test F1 (independent resamples). A test split of
    100 rows that read 0.06 high by chance made every large live window of an unchanged model alert."""
    live = bootstrap_f1(true, [predicted], labels)[0]
    test = np.asarray(test_confusion, dtype=np.int64) if test_confusion is not None else None
    if test is not None and test.shape == (len(labels), len(labels)) and test.sum():  # else: an older bundle's
        tested = confusion_f1_draws(test)
        live = live - (tested - tested[0])
    return bias_corrected_quantile(live, confidence)


def lead_lower_bound(true: pd.Series, new: pd.Series, old: pd.Series, labels: list[str], confidence: float) -> float:
    """The old version's macro-F1 lead over the new one on the same rows: its one-sided lower bound
    at `confidence` (paired bootstrap over labelled rows)."""
    new_f1, old_f1 = bootstrap_f1(true, [new, old], labels)
    return bias_corrected_quantile(old_f1 - new_f1, 1 - confidence)


@dataclass(frozen=True)
class QualityReport:
    version: str
    n_labelled: int
    judged: bool  # False: too few labelled rows to say
    metrics: dict[str, float]
    test_metrics: dict[str, float]
    f1_drop: float | None  # test F1 - live F1
    alert: bool
    f1_upper: float | None = None  # live F1's upper bound at monitoring.quality_confidence
    confidence: float = 0.99

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def firing(self) -> dict[str, str]:
        if not self.alert:
            return {}
        return {"quality": f"live F1 {self.metrics['f1_macro']:.4f} on {self.n_labelled} labelled rows is "
                           f"{self.f1_drop:.4f} below the test F1 {self.test_metrics.get('f1_macro', float('nan')):.4f} "
                           f"(its {self.confidence:.0%} upper bound {self.f1_upper:.4f})"}

    def figures(self) -> dict[str, float]:
        figures = {f"live/{name}": value for name, value in self.metrics.items()}
        figures["live/n_labelled"] = self.n_labelled
        if self.f1_drop is not None:
            figures["live/f1_drop"] = self.f1_drop
        if self.f1_upper is not None:
            figures["live/f1_upper_bound"] = self.f1_upper
        return figures


def live_quality(labelled: pd.DataFrame, version: str, labels: list[str], test_metrics: dict[str, float],
                 monitoring: MonitoringConfig, test_confusion: list[list[int]] | None = None) -> QualityReport:
    """Quality of one model version on its labelled rows (columns: version, predicted, label). An
    alert needs the live F1 more than max_quality_drop under the test F1, and its upper bound
    (f1_upper_bound) under the test F1 too: 30 labelled rows of a model that had not decayed (test
    F1 0.80, three classes) were more than 0.05 under it in 35% of windows, 100 rows in 18%, each an
    alert and a retraining; with the bound at 0.99, 1.2% and 0.2% (benchmarks/false_alarms.py)."""
    mine = labelled[labelled["version"] == version]
    confidence = monitoring.quality_confidence
    if mine.empty:
        return QualityReport(version, 0, False, {}, test_metrics, None, False, confidence=confidence)
    live = label_metrics(mine["label"], mine["predicted"], labels)
    test_f1 = test_metrics.get("f1_macro", live["f1_macro"])
    drop = test_f1 - live["f1_macro"]
    judged = len(mine) >= monitoring.min_labelled_rows
    upper = f1_upper_bound(mine["label"], mine["predicted"], labels, confidence, test_confusion) if judged else None
    alert = judged and drop > monitoring.max_quality_drop and upper < test_f1
    return QualityReport(version, len(mine), judged, live, test_metrics, float(drop), alert, upper, confidence)


@dataclass(frozen=True)
class RollbackDecision:
    roll_back: bool
    reason: str
    new_f1: float | None = None
    old_f1: float | None = None
    action: str = ""  # what was done, when it rolled back

    def firing(self) -> dict[str, str]:
        return {"rollback": f"{self.action}: {self.reason}"} if self.roll_back else {}


class LiveComparison(NamedTuple):
    """Both versions' live macro F1 on the labelled rows the new champion served."""

    new_f1: float | None
    old_f1: float | None
    n_rows: int
    lead_lower: float | None = None  # the old one's lead: its lower bound at monitoring.quality_confidence

    @classmethod
    def of(cls, true: pd.Series, new: pd.Series, old: pd.Series, labels: list[str], confidence: float) -> LiveComparison:
        """Both versions' predictions on the same labelled rows, scored, with the old one's lead bounded."""
        return cls(label_metrics(true, new, labels)["f1_macro"], label_metrics(true, old, labels)["f1_macro"], len(true),
                   lead_lower_bound(true, new, old, labels, confidence))


def rollback_decision(champion_version: str, replaced_version: str | None, scores: LiveComparison,
                      monitoring: MonitoringConfig) -> RollbackDecision:
    """Roll back only on evidence: both versions scored on the same labelled rows served by the new
    champion, enough of them (min_labelled_rows), the old one ahead by more than rollback_margin,
    and its lead's lower bound (paired bootstrap) above 0. Without the bound a new champion as good
    as the one it replaced was rolled back in 43% of 30-row windows and 35% of 100-row ones; with
    it, 1% and 0.5% (benchmarks/false_alarms.py)."""
    min_rows, margin = monitoring.min_labelled_rows, monitoring.rollback_margin
    new_f1, old_f1, n_rows, lead_lower = scores
    if replaced_version is None:
        return RollbackDecision(False, f"v{champion_version} replaced no champion")
    if new_f1 is None or old_f1 is None or n_rows < min_rows:
        return RollbackDecision(False, f"{n_rows} labelled rows served by v{champion_version}; {min_rows} needed")
    same_rows = f"on the same {n_rows} labelled rows"
    if old_f1 > new_f1 + margin and (lead_lower is None or lead_lower > 0):
        return RollbackDecision(True, f"v{champion_version} live F1 {new_f1:.4f} is below replaced v{replaced_version}'s "
                                      f"{old_f1:.4f} {same_rows}", new_f1, old_f1)
    noise = (f"; its lead's {monitoring.quality_confidence:.0%} lower bound {lead_lower:+.4f} is within noise"
             if old_f1 > new_f1 + margin else "")
    return RollbackDecision(False, f"v{champion_version} live F1 {new_f1:.4f} holds against v{replaced_version}'s "
                                   f"{old_f1:.4f} {same_rows}{noise}", new_f1, old_f1)


def predicted_labels(bundle, rows: pd.DataFrame) -> np.ndarray:
    """Another version's labels for the same raw rows (for the rollback comparison)."""
    return bundle.labels_of(bundle.predict_proba(rows))


# --- in a check -------------------------------------------------------------------------------------


def check_quality(check: Check) -> QualityReport | None:
    """Live quality of the watched version on the labelled rows of the quality window."""
    if check.labelled is None:
        return None
    monitoring, watched = check.monitoring, check.watched
    metadata = watched.bundle.metadata
    return live_quality(check.labelled, watched.ref.version, watched.bundle.labels, metadata.get("metrics", {}),
                        monitoring, metadata.get("test_confusion"))


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
    scores = LiveComparison(None, None, len(mine))
    replaced = ModelRef(watched.ref.name, version=watched.replaced_version) if watched.replaced_version else None
    if replaced and len(mine) >= monitoring.min_labelled_rows:
        old = ModelBundle.load(download_bundle(replaced, check.ctx.scratch_dir("replaced")))
        rows = check.recent.inputs.iloc[mine["position"].to_numpy()]
        labels = watched.bundle.labels
        old_predicted = pd.Series(predicted_labels(old, rows), index=mine.index)
        scores = LiveComparison.of(mine["label"], mine["predicted"], old_predicted, labels, monitoring.quality_confidence)
    decision = rollback_decision(watched.ref.version, watched.replaced_version, scores, monitoring)
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
