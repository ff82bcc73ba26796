"""Drift statistics: the issue's acceptance scenario on breast_cancer, over 10 seeds, and the edges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maas.config import DataConfig, DriftConfig
from tasks.data import prepare_data
from tasks.drift import bin_count, build_reference, measure_drift, plot_drift, psi
from tests.scenarios import ORDERS_PREPROCESSING, many_names, orders

SEEDS = range(10)


def reference_and_test(seed: int):
    prepared = prepare_data(DataConfig(dataset="breast_cancer"), seed)
    splits = prepared.splits
    reference = build_reference(splits.x_train, prepared.preprocessing, splits.y_test, prepared.labels, 2000, seed)
    predicted = pd.Series(np.asarray(prepared.labels, dtype=object)[splits.y_test])
    return prepared, reference, predicted


@pytest.mark.parametrize("seed", SEEDS)
def test_one_std_shift_in_three_features_is_flagged_and_an_unshifted_sample_is_not(seed):
    prepared, reference, predicted = reference_and_test(seed)
    x_train, x_test = prepared.splits.x_train, prepared.splits.x_test
    shifted_columns = list(np.random.default_rng(seed).choice(x_test.columns, 3, replace=False))
    shifted = x_test.copy()
    for column in shifted_columns:
        shifted[column] = shifted[column] + x_train[column].std()

    drifted = measure_drift(shifted, predicted, reference, DriftConfig())
    unshifted = measure_drift(x_test, predicted, reference, DriftConfig())

    assert sorted(drifted.drifted_features) == sorted(shifted_columns)
    assert all(feature.psi > 0.2 for feature in drifted.features if feature.name in shifted_columns)
    assert drifted.alert
    assert unshifted.drifted_features == [] and not unshifted.alert  # same size, no false alarm


def test_numbers_near_the_float_limit_are_measured_and_drawn_without_overflow(tmp_path):
    """1e308 is a finite number a client may send: its mean overflowed to inf (the check's JSON
    held Infinity) and its histogram overflowed matplotlib's ticks, each a RuntimeWarning."""
    import warnings

    prepared, reference, predicted = reference_and_test(0)
    logged = prepared.splits.x_test.copy()
    column = logged.columns[0]
    logged.loc[logged.index[:5], column] = 1e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = measure_drift(logged, predicted, reference, DriftConfig())
        plot_drift(report, logged, reference, DriftConfig().psi_threshold, tmp_path / "drift.png")
    feature = next(feature for feature in report.features if feature.name == column)
    assert np.isfinite(feature.current_mean) and feature.current_mean == pytest.approx(1e308 * (5 / len(logged)), rel=1e-3)
    assert (tmp_path / "drift.png").stat().st_size > 0


def test_psi_is_zero_for_equal_shares_and_grows_with_the_gap():
    assert psi([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0)
    assert 0 < psi([0.5, 0.5], [0.6, 0.4]) < psi([0.5, 0.5], [0.9, 0.1])


def test_small_samples_get_fewer_bins():
    config = DriftConfig(max_bins=10, min_rows_per_bin=25)
    assert bin_count(40, config) == 2 and bin_count(114, config) == 4 and bin_count(100_000, config) == 10


def test_too_few_rows_are_not_judged_and_raise_no_alert():
    prepared, reference, predicted = reference_and_test(0)
    few = prepared.splits.x_test.head(10) * 3
    report = measure_drift(few, predicted.head(10), reference, DriftConfig(min_rows=50))
    assert not report.judged and not report.alert and report.drifted_features  # measured, not acted on


def test_categorical_drift_counts_unseen_and_missing_values():
    train = pd.DataFrame({"plan": ["basic"] * 60 + ["pro"] * 40, "usage": np.linspace(0, 1, 100)})
    preprocessing = {"numeric": [{"name": "usage"}], "categorical": [{"name": "plan"}]}
    reference = build_reference(train, preprocessing, np.zeros(100, dtype=int), ["no", "yes"], 2000, 0)
    same = measure_drift(train.sample(frac=1, random_state=1), pd.Series(["no"] * 100), reference, DriftConfig())
    new_plans = train.assign(plan=["enterprise"] * 50 + [None] * 50)
    changed = measure_drift(new_plans, pd.Series(["no"] * 100), reference, DriftConfig())
    assert same.drifted_features == []
    assert changed.drifted_features == ["plan"]
    assert [feature.unseen for feature in same.features if feature.kind == "categorical"] == [{}]
    plan = next(feature for feature in changed.features if feature.name == "plan")
    assert plan.unseen == {"enterprise": 0.5}  # the value that arrived, not the missing ones
    from flows.summaries import CheckSummary
    from tasks.alerts import AlertOutcome

    printed = CheckSummary("m/1@champion", 0.0, 0.0, None, "r", "url", changed, None, None, None, AlertOutcome({}),
                           None).render()
    assert "  unseen   plan: 'enterprise' 50.0%" in printed


@pytest.mark.parametrize("levels", [12, 300, 1000])
def test_a_column_of_many_categories_drifts_when_it_moves_and_not_by_chance(levels):
    """A bin per category made a 300-city column's unshifted rows drift on every check (PSI 1.1 on
    400 rows). Each seed: fresh logged rows of training's own distribution are not drifted; a
    mid-frequency category taking a quarter of the rows is."""
    rng = np.random.default_rng(levels)
    scenario = many_names(rng, levels, "city")
    reference = scenario.reference

    def city(report):
        return next(feature for feature in report.features if feature.name == "city")

    for n in (100, 400, 2000):
        predicted = pd.Series(["no"] * n)
        unshifted = [city(measure_drift(scenario.logged(rng, n, scenario.shares), predicted, reference, DriftConfig()))
                     for _ in range(10)]
        assert sum(feature.drifted for feature in unshifted) == 0, [(f.psi, f.chi2_pvalue) for f in unshifted]
        shifted = city(measure_drift(scenario.logged(rng, n, scenario.moved), predicted, reference, DriftConfig()))
        assert shifted.drifted and shifted.chi2_pvalue < 1e-4, (n, shifted)


def test_a_true_false_column_logged_in_other_spellings_has_not_drifted():
    train = pd.DataFrame({"owner": [True] * 60 + [False] * 40, "usage": np.linspace(0, 1, 100)})
    preprocessing = {"numeric": [{"name": "usage"}], "categorical": [{"name": "owner"}]}
    reference = build_reference(train, preprocessing, np.zeros(100, dtype=int), ["no", "yes"], 2000, 0)
    logged = train.assign(owner=["true", "TRUE", 1, "yes"] * 15 + ["false", 0, "No", False] * 10)
    report = measure_drift(logged, pd.Series(["no"] * 100), reference, DriftConfig())
    assert report.drifted_features == []
    assert next(feature for feature in report.features if feature.name == "owner").psi < 1e-6


@pytest.mark.filterwarnings("error::RuntimeWarning")  # scipy's KS fallback warning stays out of `maas monitor`
def test_a_date_column_logged_as_iso_strings_is_measured_in_days_against_the_training_datetimes():
    rng = np.random.default_rng(0)
    seen = pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.uniform(0, 90, 400), unit="D")
    train = pd.DataFrame({"seen": pd.Series(seen).astype("datetime64[us]"), "usage": rng.normal(size=400)})
    preprocessing = {"numeric": [{"name": "seen", "date": True}, {"name": "usage"}], "categorical": []}
    reference = build_reference(train, preprocessing, np.zeros(400, dtype=int), ["no", "yes"], 2000, 0)
    logged = train.assign(seen=train["seen"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))  # as a JSON client sent them
    same = measure_drift(logged, pd.Series(["no"] * 400), reference, DriftConfig())
    earlier = logged.assign(seen=(train["seen"] - pd.Timedelta(days=60)).dt.strftime("%Y-%m-%d"))
    moved = measure_drift(earlier, pd.Series(["no"] * 400), reference, DriftConfig())
    assert same.drifted_features == [] and moved.drifted_features == ["seen"]


def test_logged_dates_and_numbers_are_read_in_the_training_files_own_format():
    """'12/03/2026 09:30' and '$49,695.87' as the file wrote them, logged as the service got them: the
    same values do not drift, moved ones do; a reference sealed without its readings (only "date")
    is read by the watched bundle's columns."""
    rng = np.random.default_rng(0)
    opened = pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.uniform(0, 90, 400), unit="D")
    salary = rng.lognormal(10.8, 0.4, 400)
    preprocessing = {"numeric": [{"name": "opened", "date": True, "date_format": "%d/%m/%Y %H:%M"},
                                 {"name": "salary", "number_format": {"decimal": "."}}], "categorical": []}
    written = pd.DataFrame({"opened": pd.Series(opened).dt.strftime("%d/%m/%Y %H:%M"),
                            "salary": [f"${value:,.2f}" for value in salary]})
    reference = build_reference(written, preprocessing, np.zeros(400, dtype=int), ["no", "yes"], 2000, 0)
    moved = pd.DataFrame({"opened": pd.Series(opened - pd.Timedelta(days=60)).dt.strftime("%d/%m/%Y %H:%M"),
                          "salary": [f"${value * 1.5:,.2f}" for value in salary]})
    old = {**reference, "numeric": {"opened": {**reference["numeric"]["opened"], "date_format": None},
                                    "salary": {**reference["numeric"]["salary"], "number_format": None}}}
    predicted = pd.Series(["no"] * 400)
    for sealed, watched in [(reference, None), (old, preprocessing)]:
        same = measure_drift(written, predicted, sealed, DriftConfig(), watched)
        assert same.drifted_features == [], [(f.name, f.psi) for f in same.features]
        assert sorted(measure_drift(moved, predicted, sealed, DriftConfig(), watched).drifted_features) == \
            ["opened", "salary"]
    assert measure_drift(written, predicted, old, DriftConfig()).drifted_features == ["opened", "salary"]  # unread


def test_dates_newer_than_trainings_are_time_moving_on_reported_and_not_counted_as_drift():
    """An order date served past the training period drifted on every check, and each retraining
    moved it only as far as the next day's rows: it is reported, not counted. Dates inside or before
    training's range, spread otherwise, still drift; drift.judge_recent_dates counts the newer ones."""
    from flows.summaries import CheckSummary
    from tasks.alerts import AlertOutcome
    from tasks.monitor_report import render_html

    rng = np.random.default_rng(0)
    train = orders(rng, "2025-01-01", 365, 3000)
    reference = build_reference(train, ORDERS_PREPROCESSING, np.zeros(3000, dtype=int), ["no", "yes"], 500, 0)
    last_day = (pd.Timestamp(train["ordered"].max()) - pd.Timestamp(0)).days
    assert reference["numeric"]["ordered"]["latest"] == last_day  # training's own, not its 500-row sample's
    predicted = pd.Series(["no"] * 400)

    def checked(start: str, days: int, config: DriftConfig = DriftConfig()):
        logged = orders(rng, start, days, 400)
        report = measure_drift(logged, predicted, reference, config)
        return report, next(feature for feature in report.features if feature.name == "ordered"), logged

    later, feature, logged = checked("2026-03-01", 14)
    assert later.drifted_features == [] and not later.alert and not later.firing()
    assert feature.kind == "date" and feature.time_moved_on and feature.psi > 1  # measured all the same
    newest = (pd.Timestamp(logged["ordered"].max()) - pd.Timestamp(0)).days
    assert (feature.after_training, feature.training_last_day, feature.days_past_training) == (1.0, last_day, newest - last_day)
    assert later.figures()["drift/days_past_training/ordered"] == newest - last_day
    spec = reference["numeric"]["ordered"]  # a reference sealed before it kept "latest": its sample's newest
    sealed_before = {**reference, "numeric": {**reference["numeric"], "ordered": {
        key: value for key, value in spec.items() if key != "latest"}}}
    old = next(feature for feature in measure_drift(logged, predicted, sealed_before, DriftConfig()).features
               if feature.name == "ordered")
    assert old.time_moved_on and not old.drifted and old.training_last_day == max(spec["sample"])
    printed = CheckSummary("m/1@champion", 0.0, 0.0, None, "r", "url", later, None, None, None, AlertOutcome({}),
                           None).render()
    assert (f"  time     ordered: 100% of rows dated after training's last date ({train['ordered'].max()}), up to "
            f"{newest - last_day} days after it: time moved on, not counted as drift") in printed
    assert "time moved on, 100% dated after" in render_html({"model": "m", "checked_at": "now", "window_start": "then",
                                                             "alerts": [], "drift": later.to_dict(), "quality": None,
                                                             "health": None}, None)
    straddling, feature, _ = checked("2025-12-18", 28)  # the check's window spans training's last day
    assert straddling.drifted_features == [] and 0.4 < feature.after_training < 0.6
    for start, days in [("2025-03-01", 30), ("2024-06-01", 60)]:  # one month of training's year; before it
        report, feature, _ = checked(start, days)
        assert report.drifted_features == ["ordered"] and not feature.time_moved_on, start
    counted, feature, _ = checked("2026-03-01", 14, DriftConfig(judge_recent_dates=True))
    assert counted.drifted_features == ["ordered"] and counted.alert and not feature.time_moved_on
    unshifted, _, _ = checked("2025-01-01", 365)
    assert unshifted.drifted_features == []


def test_prediction_shift_shows_in_prediction_psi():
    prepared, reference, predicted = reference_and_test(0)
    x_test = prepared.splits.x_test
    flipped = pd.Series([prepared.labels[0]] * len(x_test))
    assert measure_drift(x_test, predicted, reference, DriftConfig()).prediction_psi < 0.01
    assert measure_drift(x_test, flipped, reference, DriftConfig()).prediction_psi > 0.2


def test_drift_is_measured_on_the_columns_the_log_keeps_in_clear():
    """A hashed or dropped column (serving.privacy) is not compared with its training values: it
    would read as 100% missing or all-unseen and raise a false alarm."""
    from maas.config import PrivacyConfig
    from maas.privacy import LogRedactor
    from tasks.drift import kept_reference

    prepared, reference, predicted = reference_and_test(0)
    x_test = prepared.splits.x_test
    privacy = PrivacyConfig(columns={"mean radius": "hash", "mean texture": "drop", "mean area": "mask"})
    redactor = LogRedactor(privacy, {"MAAS_LOG_HASH_SALT": "s" * 16})
    logged = pd.DataFrame([redactor.row(row) for row in x_test.to_dict("records")])
    naive = measure_drift(logged, predicted, reference, DriftConfig())
    assert {"mean radius", "mean texture", "mean area"} <= set(naive.drifted_features)  # the false alarm
    kept = measure_drift(logged, predicted, kept_reference(reference, privacy), DriftConfig())
    names = {feature.name for feature in kept.features}
    assert names == set(x_test.columns) - {"mean radius", "mean texture", "mean area"} and kept.drifted_features == []
