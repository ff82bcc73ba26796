"""Monitoring pieces without Prefect: the prediction log as a table, live quality, rollback rule,
health from Prometheus text, and one alert per incident (real SQLite store)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from maas.config import MonitoringConfig
from maas.errors import MaasInputError
from maas.service_store import connect, log_predictions
from tasks.alerts import new_alerts
from tasks.health import health_report, histogram_quantile, parse_counters
from tasks.prediction_log import labelled_rows, model_version, read_ground_truth, read_logged_rows, with_ground_truth
from tasks.quality import LiveComparison, label_metrics, live_quality, rollback_decision
from tests.scenarios import KEPT, THREE, WORSE, three_class_windows

LABELS = ["no", "yes"]


@pytest.fixture
def store(tmp_path):
    return connect(tmp_path / "service.db")


def log(store, request_id, at, model, rows, predicted):
    outputs = [{"label": label, "probabilities": {}} for label in predicted]
    log_predictions(store, [(request_id, at, "key", model, 200, json.dumps({"rows": rows}), json.dumps(outputs))])


def test_logged_requests_become_one_row_per_prediction_of_the_model_in_the_window(store):
    log(store, "a", 10.0, "m/1@champion", [{"x": 1.0}, {"x": 2.0}], ["no", "yes"])
    log(store, "b", 20.0, "m/2@champion", [{"x": 3.0}], ["yes"])
    log(store, "c", 20.0, "other/1@champion", [{"x": 9.0}], ["no"])
    log(store, "d", 30.0, "m/2@champion", [{"x": 4.0}], ["no"])
    logged = read_logged_rows(store, "m", since=5.0, until=20.0)
    assert list(logged.inputs["x"]) == [1.0, 2.0, 3.0]
    assert list(logged.meta["row"]) == [0, 1, 0] and list(logged.meta["version"]) == ["1", "1", "2"]
    assert model_version("maas-wine/12@champion") == "12"


def test_ground_truth_joins_on_request_and_row(store, tmp_path):
    log(store, "a", 10.0, "m/1", [{"x": 1.0}, {"x": 2.0}], ["no", "yes"])
    log(store, "b", 11.0, "m/1", [{"x": 3.0}], ["yes"])
    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["a", "b", "zzz"], "row": [1, 0, 0], "label": ["yes", "no", "no"]}).to_csv(path, index=False)
    labelled = with_ground_truth(read_logged_rows(store, "m", 0, 100), read_ground_truth(path))
    assert list(zip(labelled["request_id"], labelled["position"], labelled["label"])) == [("a", 1, "yes"), ("b", 2, "no")]


def test_labels_the_model_does_not_have_rows_labelled_twice_and_unknown_ids_are_told(store, tmp_path):
    """'maybe' is no class of the model: counted, it would read as the model's error and fire a
    quality alert. A row labelled twice keeps its last label; ids the log never had are named."""
    log(store, "a", 10.0, "m/1", [{"x": 1.0}, {"x": 2.0}], ["no", "yes"])
    log(store, "b", 11.0, "m/1", [{"x": 3.0}], ["yes"])
    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["a", "a", "b", "b"], "row": [0, 1, 0, 0],
                  "label": ["MAYBE", "Yes ", "no", "yes"]}).to_csv(path, index=False)
    logged = read_logged_rows(store, "m", 0, 100)
    labelled, notes = labelled_rows(logged, read_ground_truth(path), ["no", "yes"], str(path))
    assert list(zip(labelled["request_id"], labelled["row"], labelled["label"])) == [("a", 1, "yes"), ("b", 0, "yes")]
    assert notes == ["labels.csv: 2 label(s) for rows labelled more than once (1 with different labels): the last one kept",
                     "labels.csv: 1 label(s) not among the model's classes (no, yes), e.g. 'MAYBE': left out of live quality"]
    pd.DataFrame({"request_id": ["x-1", "x-2"], "label": ["no", "yes"]}).to_csv(path, index=False)
    labelled, notes = labelled_rows(logged, read_ground_truth(path), ["no", "yes"], str(path))
    assert labelled.empty and notes == [
        "labels.csv: none of its 2 request id(s) (e.g. 'x-1') is among the 2 logged in the quality window (e.g. 'a'); "
        "the service returns each request's id in X-Request-Id, and takes the caller's"]


def test_numeric_request_ids_in_a_column_with_a_gap_still_join(store, tmp_path):
    log(store, "12345", 10.0, "m/1", [{"x": 1.0}], ["no"])
    log(store, "12346", 11.0, "m/1", [{"x": 2.0}], ["yes"])
    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": [12345, None, 12346], "label": ["yes", "no", "yes"]}).to_csv(path, index=False)
    labelled = with_ground_truth(read_logged_rows(store, "m", 0, 100), read_ground_truth(path))
    assert list(zip(labelled["request_id"], labelled["label"])) == [("12345", "yes"), ("12346", "yes")]


def test_rows_whose_label_has_not_come_are_left_out_and_counted(store, tmp_path):
    log(store, "a", 10.0, "m/1", [{"x": 1.0}, {"x": 2.0}], ["no", "yes"])
    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["a", "a"], "row": [0, 1], "label": ["yes", None]}).to_csv(path, index=False)
    labelled, notes = labelled_rows(read_logged_rows(store, "m", 0, 100), read_ground_truth(path), ["no", "yes"],
                                    str(path))
    assert list(zip(labelled["row"], labelled["label"])) == [(0, "yes")]
    assert notes == ["labels.csv: 1 row(s) without a label: left out of live quality"]


def test_labelled_production_rows_join_a_table_whose_ignored_columns_the_log_never_kept(store, tmp_path, maas_home):
    """The table has an ID and a constant, which training dropped and the prediction log never kept.
    The labelled rows name them, and the retraining run leaves them out of the whole table: refused,
    every retraining of such a table failed; padded with gaps, the ID became an input."""
    import numpy as np

    from maas.config import DataConfig
    from tasks.data import prepare_data
    from tasks.retrain import labelled_rows_file

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"customer": [f"C{index}" for index in range(200)], "row_id": np.arange(200),
                          "country": "NL", "x": rng.normal(size=200), "y": np.tile(["no", "yes"], 100)})
    table.to_csv(tmp_path / "table.csv", index=False)
    for index in range(40):
        log(store, f"r{index}", 10.0, "m/1", [{"x": float(index)}], ["no"])
    logged = read_logged_rows(store, "m", 0, 100)
    pd.DataFrame({"request_id": [f"r{index}" for index in range(40)], "label": ["yes", "no"] * 20}).to_csv(
        tmp_path / "labels.csv", index=False)
    labelled, _ = labelled_rows(logged, read_ground_truth(tmp_path / "labels.csv"), LABELS, "labels.csv")
    extra = labelled_rows_file(logged, labelled, "y", ["customer", "row_id", "country"])
    prepared = prepare_data(DataConfig(dataset=str(tmp_path / "table.csv"), target="y", extra_paths=[str(extra)]), 0)
    assert prepared.n_rows == 240 and [column["name"] for column in prepared.preprocessing["numeric"]] == ["x"]
    assert "column(s) country, customer, row_id left out: the labelled production rows appended lack them, as the " \
           "model they were answered by ignored them" in prepared.notes
    plain = pd.read_parquet(extra)
    plain.attrs.clear()
    plain.to_parquet(tmp_path / "plain.parquet")  # the same rows, saying nothing: refused by name
    with pytest.raises(MaasInputError, match=r"plain.parquet: extra rows for .*table.csv lacks column\(s\) customer, "
                                             r"row_id, country"):
        prepare_data(DataConfig(dataset=str(tmp_path / "table.csv"), target="y",
                                extra_paths=[str(tmp_path / "plain.parquet")]), 0)


def test_a_ground_truth_file_without_labels_is_one_clear_error(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["a"], "truth": ["no"]}).to_csv(path, index=False)
    with pytest.raises(MaasInputError, match="lacks column.*label"):
        read_ground_truth(path)
    with pytest.raises(MaasInputError, match="not found"):
        read_ground_truth(tmp_path / "missing.csv")


def labelled_frame(predicted, truth, version="3"):
    return pd.DataFrame({"version": version, "predicted": predicted, "label": truth})


POLICY = MonitoringConfig(min_labelled_rows=30, max_quality_drop=0.05)


def test_decayed_labels_raise_a_quality_alert_and_matching_ones_do_not():
    test_metrics = {"f1_macro": 0.97}
    truth = ["no", "yes"] * 20
    good = live_quality(labelled_frame(truth, truth), "3", LABELS, test_metrics, POLICY)
    decayed_predictions = truth[:28] + [("yes" if label == "no" else "no") for label in truth[28:]]
    decayed = live_quality(labelled_frame(decayed_predictions, truth), "3", LABELS, test_metrics, POLICY)
    assert good.metrics["f1_macro"] == 1.0 and not good.alert
    assert decayed.metrics["accuracy"] == pytest.approx(0.7) and decayed.alert
    too_few = live_quality(labelled_frame(decayed_predictions[:10], truth[:10]), "3", LABELS, test_metrics, POLICY)
    assert not too_few.judged and not too_few.alert
    assert live_quality(labelled_frame(truth, truth, "2"), "3", LABELS, test_metrics, POLICY).n_labelled == 0


def test_a_class_no_labelled_row_holds_is_left_out_of_the_live_macro_f1():
    """A 3-class model's window without its rare class scored that class 0 and lost a third of its
    macro F1 (an alert without a decay); a class predicted wrongly and never true still counts."""
    labels = ["a", "b", "c"]
    truth, predicted = pd.Series(["a", "a", "b", "b"]), pd.Series(["a", "a", "b", "a"])
    assert label_metrics(truth, predicted, labels)["f1_macro"] == pytest.approx(
        f1_score(truth, predicted, labels=["a", "b"], average="macro"))
    assert label_metrics(truth, pd.Series(["a", "a", "b", "c"]), labels)["f1_macro"] == pytest.approx(
        f1_score(truth, ["a", "a", "b", "c"], labels=labels, average="macro", zero_division=0))


def test_a_small_window_of_a_model_that_has_not_decayed_raises_no_quality_alert_and_a_decayed_one_does():
    """Live F1 on 30-100 labelled rows swings by more than the 0.05 tolerance: the rule alone alerted
    (and retrained) in a third of such windows of an unchanged model. The live F1's upper bound must
    be under the test F1 too."""
    window, labels = three_class_windows(np.random.default_rng(0)), THREE
    population = window(50_000, KEPT)
    test_metrics = {"f1_macro": f1_score(population["label"], population["predicted"], average="macro")}
    for n in (30, 100):
        unchanged = [live_quality(window(n, KEPT), "3", labels, test_metrics, POLICY) for _ in range(60)]
        assert sum(report.alert for report in unchanged) <= 2
        assert sum(report.f1_drop > 0.05 for report in unchanged) >= 10  # what alerted before
        assert all(report.f1_upper >= report.metrics["f1_macro"] for report in unchanged)
    decayed = [live_quality(window(100, WORSE), "3", labels, test_metrics, POLICY) for _ in range(20)]
    assert sum(report.alert for report in decayed) >= 18
    alerted = next(report for report in decayed if report.alert)
    assert "upper bound" in alerted.firing()["quality"]
    from flows.summaries import CheckSummary
    from tasks.alerts import AlertOutcome
    from tasks.drift import DriftReport

    drift = DriftReport(0, False, 2, [], 0.0, None, {}, False)
    printed = CheckSummary("m/3@champion", 0.0, 0.0, None, "r", "url", drift, alerted, None, None, AlertOutcome({}),
                           None).render()
    assert f"(test {test_metrics['f1_macro']:.4f}; live's 99% upper bound {alerted.f1_upper:.4f})" in printed


def test_a_test_f1_that_read_high_by_chance_does_not_make_every_large_window_alert():
    """A 100-row test split scored an unchanged model 0.06 over what it does: 3,000 live labels then
    sit more than 0.05 under it, well beyond their own noise, on every check. The bundle's test
    confusion matrix lets the bound weigh the test split's noise too; a real decay still alerts."""
    window, labels = three_class_windows(np.random.default_rng(3)), THREE
    population = window(50_000, KEPT)
    true_f1 = label_metrics(population["label"], population["predicted"], labels)["f1_macro"]
    lucky = next(test for test in (window(100, KEPT) for _ in range(500))
                 if label_metrics(test["label"], test["predicted"], labels)["f1_macro"] > true_f1 + 0.06)
    test_metrics = label_metrics(lucky["label"], lucky["predicted"], labels)
    test_confusion = pd.crosstab(lucky["label"], lucky["predicted"]).reindex(index=labels, columns=labels, fill_value=0)
    live = window(3000, KEPT)
    assert live_quality(live, "3", labels, test_metrics, POLICY).alert  # the test figure alone: an alert
    assert not live_quality(live, "3", labels, test_metrics, POLICY, test_confusion.to_numpy().tolist()).alert
    assert live_quality(window(3000, WORSE), "3", labels, test_metrics, POLICY, test_confusion.to_numpy().tolist()).alert


def test_a_new_champion_as_good_as_the_one_it_replaced_is_not_rolled_back_by_a_small_windows_noise():
    """Two versions that err as often, scored on the same 30 labelled rows: the old one led by more
    than the 0.02 margin in about 4 windows of 10, and each was a rollback. Its lead must also be
    above 0 at its lower bound (paired bootstrap); a clearly worse new one is still rolled back."""
    rng = np.random.default_rng(1)
    policy = MonitoringConfig()

    def window(n, new_accuracy, old_accuracy=0.85):
        truth = rng.choice(LABELS, n)
        flipped = {"no": "yes", "yes": "no"}
        new = [label if rng.uniform() < new_accuracy else flipped[label] for label in truth]
        old = [label if rng.uniform() < old_accuracy else flipped[label] for label in truth]
        truth, new, old = pd.Series(truth), pd.Series(new), pd.Series(old)
        scores = LiveComparison.of(truth, new, old, LABELS, policy.quality_confidence)
        return rollback_decision("3", "2", scores, policy), scores

    equal = [window(30, 0.85) for _ in range(40)]
    assert sum(decision.roll_back for decision, _ in equal) <= 2
    assert sum(scores.old_f1 > scores.new_f1 + policy.rollback_margin for _, scores in equal) >= 10  # rolled back before
    assert any("within noise" in decision.reason for decision, _ in equal)
    worse = [window(200, 0.6, 0.9)[0] for _ in range(10)]
    assert all(decision.roll_back for decision in worse)


@pytest.mark.parametrize("replaced, new, old, rows, expected", [
    (None, 0.5, 0.9, 100, False),  # the first champion replaced nothing
    ("2", 0.80, 0.90, 100, True),
    ("2", 0.89, 0.90, 100, False),  # within the margin
    ("2", 0.50, 0.90, 10, False),  # too few labelled rows
    ("2", None, None, 0, False),
])
def test_rollback_needs_the_old_champion_ahead_on_enough_rows(replaced, new, old, rows, expected):
    policy = MonitoringConfig(min_labelled_rows=30, rollback_margin=0.02)
    assert rollback_decision("3", replaced, LiveComparison(new, old, rows), policy).roll_back is expected


METRICS_PAGE = """
# TYPE bentoml_service_request_total counter
bentoml_service_request_total{endpoint="/predict",http_response_code="200",service_name="s",service_version="1"} 980
bentoml_service_request_total{endpoint="/predict",http_response_code="500",service_name="s",service_version="1"} 20
bentoml_service_request_total{endpoint="/readyz",http_response_code="200",service_name="s",service_version="1"} 50
# TYPE bentoml_service_request_duration_seconds histogram
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",http_response_code="200",le="0.01",service_name="s",service_version="1"} 900
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",http_response_code="200",le="0.1",service_name="s",service_version="1"} 985
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",http_response_code="200",le="0.5",service_name="s",service_version="1"} 1000
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",http_response_code="200",le="+Inf",service_name="s",service_version="1"} 1000
# TYPE maas_process_resident_memory_bytes gauge
maas_process_resident_memory_bytes 2.5e+08
# TYPE maas_process_cpu_percent gauge
maas_process_cpu_percent 12.5
"""


def test_health_from_prometheus_counters_since_the_previous_scrape():
    current = parse_counters(METRICS_PAGE)
    assert current["requests"] == 1000 and current["errors"] == 20 and current["memory_bytes"] == 2.5e8
    assert histogram_quantile(current["buckets"], 0.99) == 0.5
    previous = {**current, "at": current["at"] - 100, "requests": 500, "errors": 20,
                "buckets": {"0.01": 450, "0.1": 495, "0.5": 500, "+Inf": 500}}
    report = health_report(current, previous, max_error_rate=0.01, max_p99_ms=1000)
    assert report.request_rate == pytest.approx(5.0) and report.error_rate == 0 and not report.alerts
    first = health_report(current, None, max_error_rate=0.01, max_p99_ms=100)
    assert first.error_rate == pytest.approx(0.02) and set(first.alerts) == {"error_rate", "latency"}


def test_an_alert_fires_once_per_incident(store):
    assert [alert.kind for alert in new_alerts(store, "m", {"drift": "3 features"})] == ["drift"]
    assert new_alerts(store, "m", {"drift": "3 features"}) == []  # still the same incident
    assert new_alerts(store, "other-model", {"drift": "x"})[0].kind == "drift"
    assert new_alerts(store, "m", {}) == []  # resolved: closes the incident
    assert [alert.kind for alert in new_alerts(store, "m", {"drift": "again"})] == ["drift"]
    assert [a.kind for a in new_alerts(store, "m", {"drift": "again", "rollback": "r"})] == ["rollback"]
    assert [a.kind for a in new_alerts(store, "m", {"drift": "again", "rollback": "r2"})] == ["rollback"]  # events repeat


def test_a_monitor_watching_another_model_is_its_deployment_and_schedule_says_where_its_retrain_runs():
    """`maas schedule --set monitoring.model=maas-orders@champion` (the default config): the monitoring
    deployment is named, tagged and described after maas-orders, whose retrain is its own training's."""
    from deployments.schedules import build_deployments, deployment_names, retrain_elsewhere
    from maas.config import load_config

    config = load_config(None, None, None, ["monitoring.model=maas-orders@champion"])
    assert deployment_names(config) == ("maas-breast_cancer-train", "maas-orders-monitor")
    training, monitoring = build_deployments(config)
    assert "model:maas-orders" in monitoring.tags and "model:maas-breast_cancer" in training.tags
    assert "of maas-orders@champion;" in monitoring.description
    assert retrain_elsewhere(config).startswith("note: the monitor watches maas-orders, whose retrain runs "
                                                "maas-train/maas-orders-train")
    own = load_config(None, None, None, [])
    assert deployment_names(own) == ("maas-breast_cancer-train", "maas-breast_cancer-monitor")
    assert retrain_elsewhere(own) is None
    named = load_config(None, None, None, ["monitoring.model=maas-orders", "monitoring.retrain_deployment=a/b"])
    assert retrain_elsewhere(named) is None
