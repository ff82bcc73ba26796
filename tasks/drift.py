"""Data drift: logged inputs and predictions against the training reference kept in the bundle.

The reference (`reference.json` in the model bundle) holds, per input column, a sample of the
training values (numeric) or the category shares (categorical), and the predicted-label shares on
the test split. A check compares the rows logged since the last one with it:

- PSI per feature: a number's on bins cut at the reference's quantiles, fewer for small samples
  (PSI's expected value under no drift is about (bins - 1) x (1/n + 1/m), so 10 bins over 100 rows
  alone reach ~0.1 and false alarms follow; with 25 rows per bin it stays near 0.03); a category's
  on a bin per category with enough rows, the rarer pooled (category_bins).
- A two-sample KS test for numeric features, a chi-square test of the counts for categorical ones. A
  feature counts as drifted only when both agree (PSI above its threshold and the test rejecting),
  which keeps one noisy statistic from alarming.
- The share of drifted features, and PSI of the predicted-label distribution.
- A date column whose logged dates are mostly newer than training's newest tenth has seen time move
  on, as an order or sign-up date does once a model serves past its training period: it is reported
  (the share of rows dated after training's last date, and how far), not counted as drift. Counted, it
  fired on every check, and each retraining moved it only as far as the next day's rows (Evidently
  leaves a table's datetime column out of its drift alike). `drift.judge_recent_dates` counts it.
- A text column is watched through numeric views of it, each judged as a numeric feature: its length
  in tokens and its share of unknown tokens (the tokenizer alone), and where its sentence embedding
  falls on the training embeddings' first two principal components (the encoder): a new topic or
  language moves the embedding before any label comes back.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.bundle import as_categories, column_numbers
from maas.config import DriftConfig, PrivacyConfig
from maas.run_context import RunContext, write_file

if TYPE_CHECKING:
    from tasks.check import Check

REFERENCE_FILE = "reference.json"
MISSING = "(missing)"
UNSEEN_SHOWN = 5  # unseen values named per categorical feature
CATEGORY_BIN_ROWS = 5  # logged rows a category's bin expects at least (rarer categories share one)
# what column_numbers reads a logged value by, kept in the reference beside the training sample: a date
# in the file's own format, a number with currency or digit-group marks, a time of day
READING_KEYS = ("date", "date_format", "number_format", "time_of_day")
EPSILON = 1e-4  # share given to an empty bin, so a bin seen on one side only scores high, not infinite
# time moved on: at least RECENT_SHARE of the logged dates lie past the reference's RECENT_QUANTILE, where
# a sample of training's own dates puts a tenth (50 such rows reach a half with a chance below 1e-20)
RECENT_QUANTILE = 0.9
RECENT_SHARE = 0.5


def build_reference(
    x_train: pd.DataFrame, preprocessing: dict[str, Any], predicted_test: np.ndarray, labels: list[str],
    max_rows: int, seed: int,
) -> dict[str, Any]:
    """What drift is measured against: training inputs per column, predicted-label shares on test."""
    rng = np.random.default_rng(seed)
    numeric = {}
    for column in preprocessing["numeric"]:
        values = column_numbers(x_train[column["name"]], column)
        present = values[np.isfinite(values)]
        latest = {"latest": float(present.max())} if column.get("date") and len(present) else {}
        if len(present) > max_rows:
            present = rng.choice(present, max_rows, replace=False)
        numeric[column["name"]] = {"sample": np.sort(present).tolist(),
                                   "missing_share": float(1 - np.isfinite(values).mean()),
                                   **latest, **{key: column[key] for key in READING_KEYS if column.get(key)}}
    categorical = {}
    for column in preprocessing["categorical"]:
        raw = x_train[column["name"]]
        text = raw.astype(str).where(raw.notna(), MISSING)
        categorical[column["name"]] = {"shares": text.value_counts(normalize=True).to_dict()}
    text = {}
    for column in preprocessing.get("text", []):
        raw = x_train[column["name"]]
        keep = rng.choice(len(raw), max_rows, replace=False) if len(raw) > max_rows else np.arange(len(raw))
        text[column["name"]] = text_reference(raw.iloc[np.sort(keep)], column)
    counts = np.bincount(np.asarray(predicted_test, dtype=int), minlength=len(labels))
    return {
        "n_rows": len(x_train),
        "numeric": numeric,
        "categorical": categorical,
        "text": text,
        "predictions": {"source": "test split", "shares": dict(zip(labels, (counts / max(1, counts.sum())).tolist()))},
    }


PRINCIPAL_COMPONENTS = 2


def text_views(values: pd.Series, column: dict[str, Any], projection: dict[str, Any]) -> dict[str, np.ndarray]:
    """The numeric views of a text column that drift watches (NaN where the text is missing)."""
    from maas.bundle import as_texts, text_encoder

    missing = values.isna().to_numpy()
    texts = as_texts(values.tolist())
    encoder = text_encoder(column)
    lengths, unknown = encoder.token_stats(texts)
    components = (encoder.embed(texts) - np.asarray(projection["mean"])) @ np.asarray(projection["components"]).T
    views = {"tokens": lengths, "unknown share": unknown,
             **{f"embedding pc{index + 1}": components[:, index] for index in range(components.shape[1])}}
    return {view: np.where(missing, np.nan, numbers) for view, numbers in views.items()}


def text_reference(values: pd.Series, column: dict[str, Any]) -> dict[str, Any]:
    """A text column's reference: the training embeddings' principal axes and each view's sample."""
    from maas.bundle import as_texts, text_encoder

    embedded = text_encoder(column).embed(as_texts(values.dropna().tolist())).astype(np.float64)
    mean = embedded.mean(axis=0)
    _, _, axes = np.linalg.svd(embedded - mean, full_matrices=False)
    projection = {"mean": mean.round(7).tolist(), "components": axes[:PRINCIPAL_COMPONENTS].round(7).tolist()}
    views = {}
    for view, numbers in text_views(values, column, projection).items():
        present = numbers[np.isfinite(numbers)]
        views[view] = {"sample": np.sort(present).tolist(), "missing_share": float(1 - np.isfinite(numbers).mean())}
    return {"projection": projection, "views": views}


def write_reference(bundle_dir: Path, reference: dict[str, Any]) -> None:
    (Path(bundle_dir) / REFERENCE_FILE).write_text(json.dumps(reference))


def read_reference(bundle_dir: Path) -> dict[str, Any] | None:
    path = Path(bundle_dir) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    expected = np.clip(np.asarray(expected, dtype=np.float64), EPSILON, None)
    actual = np.clip(np.asarray(actual, dtype=np.float64), EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def bin_count(n_rows: int, config: DriftConfig) -> int:
    return int(np.clip(n_rows // config.min_rows_per_bin, 2, config.max_bins))


def numeric_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares per bin (inner edges, right-closed), with missing values as a last bin of their own."""
    finite = np.isfinite(values)
    counts = np.bincount(np.searchsorted(edges, values[finite], side="right"), minlength=len(edges) + 1)
    return np.append(counts, (~finite).sum()) / max(1, len(values))


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    kind: str
    psi: float
    ks_statistic: float | None
    ks_pvalue: float | None
    drifted: bool
    reference_mean: float | None = None
    current_mean: float | None = None
    # a categorical feature's values training never had (or kept), most frequent first: value -> share
    # of the logged rows. What a PSI over "(other)" does not say: which new value arrived.
    unseen: dict[str, float] = field(default_factory=dict)
    chi2_pvalue: float | None = None  # a categorical feature's test, as KS is a numeric one's
    # a date column where time moved on (not counted as drifted): the share of logged rows dated after
    # training's last date, that date (days since 1970-01-01) and the newest logged date's days past it
    after_training: float | None = None
    training_last_day: float | None = None
    days_past_training: float | None = None

    @property
    def time_moved_on(self) -> bool:
        return self.after_training is not None

    def time_note(self) -> str:
        last = (pd.Timestamp(0) + pd.Timedelta(days=self.training_last_day)).strftime("%Y-%m-%d")
        return (f"{self.name}: {self.after_training:.0%} of rows dated after training's last date ({last}), "
                f"up to {self.days_past_training:.0f} days after it")


@dataclass(frozen=True)
class DriftReport:
    n_rows: int
    judged: bool  # False: too few rows to say
    n_bins: int
    features: list[FeatureDrift]
    drift_share: float
    prediction_psi: float | None
    prediction_shares: dict[str, float]
    alert: bool
    psi_threshold: float = 0.2  # what a feature's PSI had to exceed
    private: list[str] = field(default_factory=list)  # inputs the log keeps hashed, masked or not at all: not measured

    @property
    def drifted_features(self) -> list[str]:
        return [feature.name for feature in self.features if feature.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted_features": self.drifted_features}

    def firing(self) -> dict[str, str]:
        """The alert condition this report raises, if any: kind -> message."""
        if not self.alert:
            return {}
        return {"drift": f"{len(self.drifted_features)} of {len(self.features)} features drifted "
                         f"(PSI > {self.psi_threshold}): {', '.join(self.drifted_features[:8])}"}

    def figures(self) -> dict[str, float]:
        """The report as MLflow metrics."""
        figures = {"drift/n_rows": self.n_rows, "drift/share": self.drift_share,
                   "drift/n_drifted": len(self.drifted_features),
                   **{f"drift/psi/{feature.name}": feature.psi for feature in self.features},
                   **{f"drift/days_past_training/{feature.name}": feature.days_past_training
                      for feature in self.features if feature.time_moved_on}}
        if self.prediction_psi is not None:
            figures["drift/prediction_psi"] = self.prediction_psi
        return figures


def numeric_drift(name: str, reference: dict[str, Any], values: np.ndarray, n_bins: int,
                  config: DriftConfig) -> FeatureDrift:
    from scipy.stats import ks_2samp

    sample = np.asarray(reference["sample"], dtype=np.float64)
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, n_bins + 1)[1:-1]))
    expected = np.append(numeric_shares(sample, edges)[:-1] * (1 - reference["missing_share"]),
                         reference["missing_share"])
    score = psi(expected, numeric_shares(values, edges))
    present = values[np.isfinite(values)]
    with warnings.catch_warnings():  # scipy falls back to the asymptotic p-value by itself; its warning
        # reached the user's `maas monitor` output as a RuntimeWarning on tied values
        warnings.filterwarnings("ignore", message="ks_2samp: Exact calculation unsuccessful", category=RuntimeWarning)
        statistic, pvalue = (ks_2samp(sample, present) if len(present) else (1.0, 0.0))
    return FeatureDrift(name, "numeric", score, float(statistic), float(pvalue),
                        bool(score > config.psi_threshold and pvalue < config.ks_alpha),
                        finite_mean(sample), finite_mean(present) if len(present) else None)


def time_moved_on(drift: FeatureDrift, reference: dict[str, Any], values: np.ndarray) -> FeatureDrift:
    """A date column's drift where its logged dates are mostly newer than training's newest tenth:
    reported, not counted (see the module's docstring); else as measured."""
    sample = np.asarray(reference["sample"], dtype=np.float64)
    present = values[np.isfinite(values)]
    if not len(present) or not len(sample) or np.mean(present > np.quantile(sample, RECENT_QUANTILE)) < RECENT_SHARE:
        return drift
    last = float(reference.get("latest", sample.max()))  # a reference sealed before it kept "latest": its sample's
    return replace(drift, kind="date", drifted=False, after_training=float(np.mean(present > last)),
                   training_last_day=last, days_past_training=float(max(0.0, present.max() - last)))


def finite_mean(values: np.ndarray) -> float:
    """The mean of finite numbers, taken on values scaled by the largest: a client may send 1e308,
    which is finite, and a plain sum of two of them overflows to inf (the check's JSON then broke)."""
    largest = float(np.abs(values).max())
    return float((values / largest).mean() * largest) if largest > 0 else 0.0


def category_bins(shares: dict[str, float], n_rows: int) -> dict[str, int]:
    """Category -> its bin, so that each bin expects CATEGORY_BIN_ROWS or more of the `n_rows` logged
    rows (the chi-square test's own rule): a frequent category (twice that) has a bin of its own, the
    others are packed together in the order of their names. Packed by their training share, the
    categories ranked first by the reference sample's own noise would read as shrinking in every
    logged sample: a 1,000-name column's unshifted rows were called drifted one check in four."""
    least = CATEGORY_BIN_ROWS / max(1, n_rows)
    frequent = [category for category in shares if shares[category] >= 2 * least]
    bins = {category: number for number, category in enumerate(frequent)}
    bin_number, mass = len(frequent), 0.0
    for category in sorted(set(shares) - set(frequent)):
        if mass >= least:
            bin_number, mass = bin_number + 1, 0.0
        bins[category] = bin_number
        mass += shares[category]
    if bin_number > len(frequent) and mass < least:  # the last packed bin's leftovers join the one before
        bins = {category: min(number, bin_number - 1) for category, number in bins.items()}
    return bins


def unseen_share(shares: dict[str, float], n_train: int) -> float:
    """The share of rows a category training never had is expected to take: the share of training
    rows whose category occurs once there (Good-Turing). A long tail of names (cities, products)
    keeps bringing new ones without having drifted; a column of a few frequent codes gets ~0, so a
    renamed code still scores high."""
    return sum(share for share in shares.values() if round(share * n_train) == 1) if n_train else 0.0


def categorical_drift(name: str, reference: dict[str, Any], values: pd.Series, config: DriftConfig,
                      n_train: int) -> FeatureDrift:
    """PSI over the reference's categories (category_bins), with a bin for values training never
    had (expected: unseen_share of the n_train training rows), and a chi-square test of the logged
    counts against the training ones: drifted where both agree, as KS and PSI for numbers. PSI alone,
    a bin per category, gave a 300-city column's 400 unshifted rows 1.1 and every check an alert
    (its expected value without drift grows with bins / rows)."""
    from scipy.stats import chi2_contingency

    shares = reference["shares"]
    known = list(shares)
    spelled = as_categories(values.astype(str).to_numpy(dtype=object), {"categories": [k for k in known if k != MISSING]})
    text = pd.Series(spelled, index=values.index).where(values.notna(), MISSING)
    new = text[~text.isin(known) & (text != MISSING)]
    unseen = {str(value): count / len(text) for value, count in new.value_counts().head(UNSEEN_SHOWN).items()}
    bins = category_bins(shares, len(text))
    n_bins = max(bins.values(), default=-1) + 1
    other_share = unseen_share(shares, n_train)
    expected = np.zeros(n_bins + 1)
    np.add.at(expected, [bins[category] for category in known], [shares[category] * (1 - other_share) for category in known])
    expected[n_bins] = other_share
    counts = np.bincount(text.map(bins).fillna(n_bins).to_numpy(dtype=np.int64), minlength=n_bins + 1)
    score = psi(expected, counts / max(1, len(text)))
    table = np.vstack([expected * (n_train or len(text)), counts])
    table = table[:, table.sum(axis=0) > 0]
    pvalue = float(chi2_contingency(table, correction=False).pvalue) if table.shape[1] > 1 and len(text) else 1.0
    return FeatureDrift(name, "categorical", score, None, None,
                        bool(score > config.psi_threshold and pvalue < config.ks_alpha), unseen=unseen, chi2_pvalue=pvalue)


def read_as(reference: dict[str, Any], preprocessing: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """How each numeric column's logged values are read: as the watched bundle reads them where it
    names the column, else by the reading the reference kept. A reference sealed before it kept its
    readings knew only that a column was a date, so a logged '12/03/2026 09:30' (the file's format)
    or '$49,695.87' read as missing: a date column was judged on the one ISO value among 1,902 rows."""
    columns = {column["name"]: column for column in (preprocessing or {}).get("numeric", [])}
    return {name: columns.get(name, spec) for name, spec in reference["numeric"].items()}


def measure_drift(rows: pd.DataFrame, predicted: pd.Series, reference: dict[str, Any], config: DriftConfig,
                  preprocessing: dict[str, Any] | None = None) -> DriftReport:
    """Every feature and the predictions of the logged rows against the reference; text columns
    through their views, with the encoder that `preprocessing` (the watched bundle's) points at."""
    n_rows = len(rows)
    n_bins = bin_count(n_rows, config)
    features: list[FeatureDrift] = []
    reading = read_as(reference, preprocessing)
    if n_rows:
        for name, spec in reference["numeric"].items():
            values = column_numbers(rows[name], reading[name]) if name in rows else np.full(n_rows, np.nan)
            drift = numeric_drift(name, spec, values, n_bins, config)
            dated = reading[name].get("date") and not config.judge_recent_dates
            features.append(time_moved_on(drift, spec, values) if dated else drift)
        for name, spec in reference["categorical"].items():
            values = rows[name] if name in rows else pd.Series([None] * n_rows)
            features.append(categorical_drift(name, spec, values, config, reference.get("n_rows", 0)))
        text_columns = {column["name"]: column for column in (preprocessing or {}).get("text", [])}
        for name, spec in reference.get("text", {}).items():
            if name not in text_columns:
                continue
            values = rows[name] if name in rows else pd.Series([None] * n_rows)
            for view, numbers in text_views(values, text_columns[name], spec["projection"]).items():
                drift = numeric_drift(f"{name} [{view}]", spec["views"][view], numbers, n_bins, config)
                features.append(replace(drift, kind="text"))
    expected = reference["predictions"]["shares"]
    current = predicted.value_counts(normalize=True) if n_rows else pd.Series(dtype=float)
    prediction_shares = {label: float(current.get(label, 0.0)) for label in expected}
    prediction_psi = psi(list(expected.values()), list(prediction_shares.values())) if n_rows else None
    judged = n_rows >= config.min_rows
    share = sum(feature.drifted for feature in features) / max(1, len(features))
    return DriftReport(n_rows, judged, n_bins, features, share, prediction_psi, prediction_shares,
                       alert=judged and share >= config.alert_share, psi_threshold=config.psi_threshold)


def plot_drift(report: DriftReport, rows: pd.DataFrame, reference: dict[str, Any], threshold: float, path: Path,
               preprocessing: dict[str, Any] | None = None) -> Path:
    """PSI per feature against the threshold, and the worst features' distributions side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(report.features, key=lambda feature: feature.psi, reverse=True)
    worst = [feature for feature in ranked if feature.kind == "numeric"][:3]
    figure, axes = plt.subplots(1 + len(worst), 1, figsize=(9, 3 + 2.4 * len(worst)),
                                gridspec_kw={"height_ratios": [1.6] + [1] * len(worst)})
    axes = np.atleast_1d(axes)
    shown = ranked[:30]
    colors = ["#c0392b" if feature.drifted else "#7f8c8d" for feature in shown]
    axes[0].bar(range(len(shown)), [feature.psi for feature in shown], color=colors)
    axes[0].axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"PSI threshold {threshold}")
    axes[0].set_xticks(range(len(shown)), [feature.name for feature in shown], rotation=60, ha="right", fontsize=7)
    axes[0].set_ylabel("PSI")
    axes[0].set_title(f"Drift of {report.n_rows} logged rows: {len(report.drifted_features)} of "
                      f"{len(report.features)} features drifted (red)")
    axes[0].legend(loc="upper right")
    reading = read_as(reference, preprocessing)
    for axis, feature in zip(axes[1:], worst):
        sample = np.asarray(reference["numeric"][feature.name]["sample"])
        current = column_numbers(rows[feature.name], reading[feature.name])  # a date in days, as the reference holds it
        current = current[np.isfinite(current)]
        # the middle 99% of both, at most the reference's span past either end of it: far values (1e308
        # is a number a client may send) would squeeze the rest into one bar and overflow matplotlib's
        # ticks. The values past the range fill its end bins.
        low, high = np.quantile(np.concatenate([sample, current]), [0.005, 0.995])
        span = sample.max() - sample.min()
        low, high = max(low, sample.min() - span), min(high, sample.max() + span)
        bins = np.histogram_bin_edges([low, high], bins=30) if high > low else 30
        axis.hist(np.clip(sample, low, high), bins=bins, density=True, alpha=0.55, label="training reference")
        axis.hist(np.clip(current, low, high), bins=bins, density=True, alpha=0.55, label="logged")
        axis.set_title(f"{feature.name}: PSI {feature.psi:.2f}, KS p={feature.ks_pvalue:.2g}", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def kept_reference(reference: dict[str, Any], privacy: PrivacyConfig) -> dict[str, Any]:
    """The reference of the columns the prediction log keeps in clear (serving.privacy): a dropped,
    hashed, masked or encrypted column cannot be compared with its training values."""
    return {**reference, **{kind: {name: spec for name, spec in reference.get(kind, {}).items()
                                   if privacy.policy(name) == "keep"} for kind in ("numeric", "categorical", "text")}}


def check_drift(check: Check) -> DriftReport:
    """The rows logged since the last check against the reference sealed in the watched bundle."""
    logged = check.logged
    reference = kept_reference(check.watched.reference, check.config.serving.privacy)
    report = measure_drift(logged.inputs, logged.meta["predicted"], reference, check.monitoring.drift,
                           check.watched.bundle.preprocessing)
    return replace(report, private=check.hidden_inputs)


def record_drift(ctx: RunContext, drift: DriftReport, check: Check) -> None:
    """The figures as drift/* metrics, the chart as drift/drift.png, the table as a Prefect artifact."""
    ctx.record(metrics=drift.figures())
    if drift.n_rows and drift.features:
        png = plot_drift(drift, check.logged.inputs, check.watched.reference, check.monitoring.drift.psi_threshold,
                         ctx.scratch_dir("drift") / "drift.png", check.watched.bundle.preprocessing)
        ctx.defer(write_file, ctx.run_id, png, "drift")
    ctx.artifacts.table("drift-features", [
        {"feature": f.name, "psi": round(f.psi, 4), "ks_pvalue": f.ks_pvalue, "drifted": f.drifted}
        for f in sorted(drift.features, key=lambda feature: feature.psi, reverse=True)
    ], f"Drift of {drift.n_rows} logged rows against the training reference")


@task(name="drift", retries=0, cache_policy=NO_CACHE)
def drift_task(check: Check) -> DriftReport:
    return check.ctx.run_stage("drift", partial(check_drift, check), partial(record_drift, check=check))
