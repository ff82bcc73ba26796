"""The training flow for real: Prefect run, MLflow store, registry, and the model loaded back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from flows.summaries import CONTRACT_KEYS
from maas.tracking import mlflow_client
from tasks.data import prepare_data
from tests.conftest import flow_run_artifacts

pytestmark = pytest.mark.slow


def test_summary_follows_the_cli_contract(trained):
    _, _, summary = trained
    assert CONTRACT_KEYS <= set(summary)
    assert {"accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc"} <= set(summary["test_metrics"])
    assert summary["test_metrics"]["f1_macro"] >= 0.93
    names = [variant["name"] for variant in summary["variants"]]
    assert names == ["fp32", "pruned", "structured", "int8", "distilled"]
    for variant in summary["variants"]:
        assert variant["size_bytes"] > 0 and variant["latency_ms"] > 0 and variant["parameters"] > 0
        assert {"f1_macro", "accuracy", "roc_auc"} <= set(variant["metrics"])
        assert {"p50_ms_b1", "p99_ms_b1", "p50_ms_b64", "p99_ms_b64", "rows_per_s_b64", "speedup_b64_vs_fp32",
                "size_ratio_vs_fp32", "compressed_bytes", "agreement_with_fp32"} <= set(variant)
    assert summary["selected_variant"] in names and summary["selected_variant"] in summary["selection_reason"]
    chosen = next(v for v in summary["variants"] if v["name"] == summary["selected_variant"])
    assert chosen["metrics"]["f1_macro"] > 0  # variants are compared on validation rows; the test split reports the chosen one
    assert summary["family"] == "mlp" and [row["family"] for row in summary["leaderboard"]] == ["mlp"]
    assert summary["leaderboard"][0]["selected"] and summary["leaderboard"][0]["folds"] >= 2
    assert summary["model_name"] == "maas-breast_cancer" and summary["alias"] == "champion"
    assert summary["gate"]["promoted"] and summary["gate"]["reason"] == "first version: no champion yet"
    assert summary["bento"].startswith("maas:")  # a new champion is packaged as a Bento


def test_parent_run_has_params_metrics_artifacts_and_prefect_link(trained):
    _, _, summary = trained
    client = mlflow_client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_epochs"] == "15"
    assert len(run.data.params["data.fingerprint"]) == 16
    assert run.data.tags["prefect.flow_run_id"] == summary["prefect_flow_run_id"]
    assert summary["prefect_flow_run_id"] in run.data.tags["prefect.flow_run_url"]
    assert run.data.metrics["test/f1_macro"] == pytest.approx(summary["test_metrics"]["f1_macro"])
    epochs = int(run.data.metrics["train/epochs_run"])
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == epochs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "data", "manifest.json", "variants"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/confusion_matrix.png"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "variants")} == {
        "variants/comparison.json", "variants/quality_vs_latency.png"}
    assert run.data.tags["maas.selected_variant"] == summary["selected_variant"]


def test_each_variant_is_a_child_run_with_its_figures(trained):
    _, _, summary = trained
    client = mlflow_client()
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`maas.variant` != ''"))
    by_name = {child.data.tags["maas.variant"]: child for child in children}
    assert set(by_name) == {variant["name"] for variant in summary["variants"]}
    for variant in summary["variants"]:
        child = by_name[variant["name"]]
        assert child.info.status == "FINISHED"
        assert child.data.metrics[f"{variant['split']}/f1_macro"] == pytest.approx(variant["metrics"]["f1_macro"], abs=1e-4)
        assert not any(key.startswith("test/") for key in child.data.metrics)  # only the chosen one sees the test split
        assert child.data.metrics["size/model_bytes"] == variant["size_bytes"]
        assert {"latency/p50_ms_b64", "latency/p99_ms_b1", "throughput/rows_per_s_b64"} <= set(child.data.metrics)


def test_registered_version_carries_alias_and_manifest(trained):
    home, _, summary = trained
    client = mlflow_client()
    version = client.get_model_version_by_alias(summary["model_name"], "champion")
    assert str(version.version) == summary["model_version"]
    assert version.run_id == summary["mlflow_run_id"]
    logged_model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged_model.experiment_id == client.get_run(version.run_id).info.experiment_id
    assert logged_model.artifact_location.startswith(home.as_uri())  # state stays in MAAS_HOME
    tags = version.tags
    assert tags["prefect_flow_run_id"] == summary["prefect_flow_run_id"]
    assert tags["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(tags["dataset_fingerprint"]) == 16 and len(tags["lock_file_sha256"]) == 16
    assert tags["git_commit"] and tags["seed"] == "42"
    assert float(tags["test_f1_macro"]) == pytest.approx(summary["test_metrics"]["f1_macro"], abs=1e-4)
    assert tags["variant"] == summary["selected_variant"] and tags["gate"] == "promoted"
    import numpy as np

    from maas.registered import ModelRef, download_bundle

    bundle = download_bundle(ModelRef(summary["model_name"], version=summary["model_version"]), home / "registered")
    metadata = json.loads((bundle / "metadata.json").read_text())
    confusion = np.asarray(metadata["test_confusion"])  # live quality weighs the test F1's noise by it
    assert confusion.shape == (len(metadata["labels"]),) * 2
    assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["test_metrics"]["accuracy"])


def test_packaging_waits_while_another_process_writes_the_bentoml_store(trained):
    """Two replicas sharing BENTOML_HOME packaged at once; BentoML read the other's half-written
    `latest` file and the replica died ("does not contain a 'model.yaml'"). Packaging holds the store's
    lock: while another holder has it, nothing is saved."""
    import threading
    import time

    from maas.registered import ModelRef
    from tasks.package import bentoml_store_lock, package_model

    _, _, summary = trained
    packaged = []
    with bentoml_store_lock():
        writer = threading.Thread(target=lambda: packaged.append(
            package_model(mlflow_client(), ModelRef(summary["model_name"], "champion"))))
        writer.start()
        time.sleep(3)
        assert writer.is_alive() and not packaged
    writer.join(timeout=60)
    assert packaged and (packaged[0].path / "metadata.json").is_file(), packaged


def test_a_registered_version_is_packaged_once_per_alias_and_a_half_saved_copy_is_passed_over(trained):
    """Every start of `maas serve` saved another copy of the bundle in the BentoML store."""
    import bentoml

    from maas.registered import ModelRef
    from tasks.package import bento_model_name, package_model

    _, _, summary = trained
    champion = ModelRef(summary["model_name"], "champion")
    first = package_model(mlflow_client(), champion)
    half_saved = first.path.parent / "half-saved"  # a save killed before its model.yaml was written
    half_saved.mkdir()
    assert package_model(mlflow_client(), champion).tag == first.tag
    by_number = package_model(mlflow_client(), ModelRef(summary["model_name"], version=summary["model_version"]))
    assert by_number.tag != first.tag and by_number.label != first.label  # labelled by how it was asked for
    assert package_model(mlflow_client(), ModelRef(summary["model_name"], version=summary["model_version"])).tag == \
        by_number.tag
    half_saved.rmdir()
    stored = bentoml.models.list(bento_model_name(summary["model_name"]))
    assert {str(model.tag) for model in stored} >= {first.tag, by_number.tag}


def test_manifest_says_how_the_version_was_made(trained):
    import mlflow

    _, config, summary = trained
    mlflow_client()
    manifest = mlflow.artifacts.load_dict(f"runs:/{summary['mlflow_run_id']}/manifest.json")
    assert manifest["mlflow_run_id"] == summary["mlflow_run_id"]
    assert manifest["prefect_flow_run_id"] == summary["prefect_flow_run_id"]
    assert manifest["dataset_fingerprint"] == prepare_data(config.data, config.seed).fingerprint
    assert manifest["seeds"] == {"seed": 42}
    assert manifest["config"] == config.model_dump(mode="json")
    assert manifest["packages"]["torch"].startswith("2.13")
    assert len(manifest["git_commit"]) == 40 or manifest["git_commit"] == "unknown"


def test_loaded_model_reproduces_test_predictions_on_raw_rows(trained):
    import mlflow

    _, config, summary = trained
    prepared = prepare_data(config.data, config.seed)
    mlflow_client()
    predictions = mlflow.pyfunc.load_model(summary["model_uri"]).predict(prepared.splits.x_test)
    truth = pd.Series(prepared.labels).iloc[prepared.splits.y_test].to_numpy()
    accuracy = (predictions["label"].to_numpy() == truth).mean()
    assert accuracy == pytest.approx(summary["test_metrics"]["accuracy"])


def test_model_loads_without_torch_or_training_code(trained):
    """What serving needs: mlflow, onnxruntime, pandas, and the model's own files; nothing pickled."""
    home, config, summary = trained
    rows = prepare_data(config.data, config.seed).splits.x_test.head(7)
    rows_path = home / "rows.json"
    rows.to_json(rows_path, orient="records")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {{"torch", "maas", "tasks", "models", "flows"}}:
                    raise ImportError("refused: " + name)
        sys.meta_path.insert(0, Refuse())
        import pickle, cloudpickle
        def no_unpickling(*args, **kwargs):
            raise RuntimeError("unpickling attempted")
        pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = no_unpickling
        import mlflow, pandas as pd
        mlflow.set_tracking_uri("sqlite:///{home}/mlflow.db")
        model = mlflow.pyfunc.load_model("{summary['model_uri']}")
        import json
        print(json.dumps(model.predict(pd.read_json("{rows_path}", orient="records"))["label"].tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(labels) == 7 and set(labels) <= {"benign", "malignant"}


def test_prefect_flow_run_has_link_and_metrics_table(trained, prefect_server):
    import httpx

    _, _, summary = trained
    flow_run_id = summary["prefect_flow_run_id"]
    flow_run = httpx.get(f"{prefect_server}/flow_runs/{flow_run_id}").json()
    assert flow_run["state"]["type"] == "COMPLETED"
    by_key = flow_run_artifacts(flow_run_id)
    assert summary["mlflow_run_url"] in by_key["mlflow-run"].data
    assert "f1_macro" in by_key["test-metrics"].data
    assert "speedup_b64_vs_fp32" in by_key["variants"].data


def test_every_stage_is_a_completed_task_run_of_the_flow_run(trained, prefect_server):
    """The Prefect UI shows each stage as a task run, data preparation included (its retry on a
    transient failure and its timeout are the task's)."""
    import httpx

    _, _, summary = trained
    task_runs = httpx.post(f"{prefect_server}/task_runs/filter",
                           json={"flow_runs": {"id": {"any_": [summary["prefect_flow_run_id"]]}}}).json()
    by_stage = {run["name"].rsplit("-", 1)[0]: run for run in task_runs}
    for stage in ("recover", "prepare-data", "compare-families", "evaluate-variants", "select", "report-on-test",
                  "register-model", "package"):
        assert stage in by_stage and by_stage[stage]["state"]["type"] == "COMPLETED", (stage, sorted(by_stage))
    logs = httpx.post(f"{prefect_server}/logs/filter",
                      json={"logs": {"task_run_id": {"any_": [by_stage["prepare-data"]["id"]]}}}).json()
    assert any("-> train" in log["message"] for log in logs), logs  # the table was read and split in that task


def test_gate_promotes_a_better_model_and_keeps_the_champion_against_a_worse_one(prefect_server, maas_home):
    """Weak model first (champion by default), then a better one (promoted), then a weak one again
    (challenger: the champion stays), all scored on the same test rows."""
    from flows.train_pipeline import train_pipeline
    from tests.conftest import quick_config

    weak = ["tuning.enabled=false", "train.max_epochs=1", "train.lr=0.00001", "compression.variants=[fp32]", "model.family=mlp"]
    strong = ["tuning.enabled=false", "compression.variants=[fp32, int8]"]
    first = train_pipeline(quick_config("wine", *weak)).to_dict()
    second = train_pipeline(quick_config("wine", *strong)).to_dict()
    third = train_pipeline(quick_config("wine", *weak)).to_dict()
    assert (first["alias"], second["alias"], third["alias"]) == ("champion", "champion", "challenger")
    assert second["test_metrics"]["f1_macro"] > first["test_metrics"]["f1_macro"]
    assert second["gate"]["champion_version"] == first["model_version"]
    assert third["gate"]["champion_version"] == second["model_version"]
    assert third["gate"]["champion_score"] == pytest.approx(second["test_metrics"]["f1_macro"])
    client = mlflow_client()
    assert str(client.get_model_version_by_alias("maas-wine", "champion").version) == second["model_version"]
    challenger = client.get_model_version_by_alias("maas-wine", "challenger")
    assert str(challenger.version) == third["model_version"] and challenger.tags["gate"] == "held"
    promoted = client.get_model_version("maas-wine", second["model_version"])
    assert promoted.tags["replaced_champion_version"] == first["model_version"]


def test_the_gate_scores_the_champion_by_its_own_decision_rule(prefect_server, maas_home, tmp_path):
    """3% fraud: the model answers by a tuned threshold, not argmax. The same run twice: the gate
    scores the champion as its own run did (the threshold with it), so the copy does not beat it."""
    from flows.train_pipeline import train_pipeline
    from maas.bundle import ModelBundle
    from maas.registered import ModelRef, download_bundle
    from tests.conftest import quick_config
    from tests.tables import write_messy

    path, target = write_messy("rare", tmp_path)
    config = quick_config(str(path), f"data.target={target}", "serving.build_bento=false")
    first = train_pipeline(config).to_dict()
    decision = ModelBundle.load(download_bundle(ModelRef(first["model_name"], "champion").resolve(mlflow_client())[0],
                                                tmp_path / "champion")).decision
    assert decision and "threshold" in decision, decision  # else argmax, and the test could not fail
    second = train_pipeline(config).to_dict()
    assert second["test_metrics"]["f1_macro"] == pytest.approx(first["test_metrics"]["f1_macro"])
    assert second["gate"]["champion_score"] == pytest.approx(first["test_metrics"]["f1_macro"])
    assert second["alias"] == "challenger", second["gate"]


def test_the_gate_leaves_out_the_test_rows_the_champion_was_fitted_on(prefect_server, maas_home, tmp_path):
    """The churn table, then the same table grown by a quarter: split anew, so some of the second run's
    test rows trained the champion. Both are scored on the others, counted here by their values."""
    from flows.train_pipeline import train_pipeline
    from tasks.data import prepare_data
    from tests.conftest import quick_config
    from tests.tables import write_messy

    path, target = write_messy("churn", tmp_path)
    table = pd.read_csv(path)
    first_path = tmp_path / "first" / "churn.csv"
    first_path.parent.mkdir()
    table.iloc[:len(table) * 3 // 4].to_csv(first_path, index=False)
    configs = [quick_config(str(file), f"data.target={target}", "serving.build_bento=false")
               for file in (first_path, path)]
    first = train_pipeline(configs[0]).to_dict()
    second = train_pipeline(configs[1]).to_dict()
    fitted = prepare_data(configs[0].data, configs[0].seed).splits
    fitted = pd.concat([fitted.x_train, fitted.x_val]).astype(str).drop_duplicates()
    test = prepare_data(configs[1].data, configs[1].seed).splits.x_test.astype(str)
    seen = int(test.merge(fitted, how="left", indicator=True)["_merge"].eq("both").sum())
    assert 0 < seen < len(test)
    assert second["gate"]["champion_version"] == first["model_version"]
    assert f"on the same {len(test) - seen} test rows (the {seen} it was fitted on left out)" in second["gate"]["reason"]


def test_failure_after_the_run_starts_leaves_it_failed_and_registers_nothing(prefect_server, maas_home):
    import torch

    from flows.train_pipeline import train_pipeline
    from tests.conftest import quick_config

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to force the training failure")
    config = quick_config("wine", "train.device=cuda")
    with pytest.raises(RuntimeError, match="no trial of study 'maas-wine' completed.*no CUDA device"):
        train_pipeline(config)
    client = mlflow_client()
    runs = client.search_runs([client.get_experiment_by_name("maas-wine").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}  # the parent and each failed trial
    assert len([run for run in runs if "mlflow.parentRunId" not in run.data.tags]) == 1
    assert client.search_registered_models() == []


def test_tuning_trials_are_child_runs_and_the_parent_holds_the_study(trained, prefect_server):
    import httpx

    _, config, summary = trained
    client = mlflow_client()
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`optuna.study` != ''"))
    tuning = summary["tuning"]
    assert len(children) == config.tuning.n_trials == tuning["n_complete"] + tuning["n_pruned"]
    assert {child.data.tags["optuna.state"] for child in children} <= {"complete", "pruned"}
    best = tuning["best_params"]
    assert parent.data.params["best.lr"] == str(best["lr"])
    assert parent.data.metrics["tuning/best_val_f1_macro"] == pytest.approx(tuning["best_val_f1_macro"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert {"tuning/optimization_history.png", "tuning/parallel_coordinate.png", "tuning/pareto_front.json"} <= plots
    # The final network is trained with the best trial's hyperparameters only past the min_gain_se guard.
    manifest = __import__("mlflow").artifacts.load_dict(f"runs:/{summary['mlflow_run_id']}/manifest.json")
    assert manifest["tuned_hyperparameters"] == (best if tuning["used_tuned"] else None)
    assert parent.data.tags["maas.tuning_decision"] == tuning["decision"]
    assert parent.data.metrics["tuning/used_tuned"] == float(tuning["used_tuned"])
    assert "lr" in flow_run_artifacts(summary["prefect_flow_run_id"])["tuning-trials"].data


def test_the_parent_run_says_what_happened_and_its_experiment_opens_on_runs(trained):
    """The MLflow UI shows a run's description first, and opens a model-development experiment on its runs."""
    _, _, summary = trained
    client = mlflow_client()
    run = client.get_run(summary["mlflow_run_id"])
    description = run.data.tags["mlflow.note.content"]
    assert "variant      F1" in description and f"Selected {summary['selection_reason']}" in description
    assert f"Registered {summary['model_name']} version {summary['model_version']} as @{summary['alias']}" in description
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert set(summary["record_seconds"]) >= {"tune", "evaluate", "waiting for the recorder"}


def test_a_larger_budget_buys_the_trials_a_larger_sample_and_the_run_says_how_it_carried(prefect_server, maas_home):
    from flows.train_pipeline import train_pipeline
    from tests.conftest import quick_config

    # 150 rows at the default budget; twice the budget, twice the rows (breast_cancer trains on 364)
    config = quick_config("breast_cancer", "tuning.sample_rows=150", "budget.time_s=1080", "model.families=[network]",
                          "serving.build_bento=false")
    summary = train_pipeline(config)
    tuning = summary.to_dict()["tuning"]
    assert tuning["trial_rows"] == 300 and tuning["training_rows"] > 300
    assert tuning["final_val_f1_macro"] == summary.winner.table["fp32"].f1_macro
    (line,) = [line for line in summary.outcome().splitlines() if line.startswith("Tuning:")]
    assert "training on 300 sampled rows" in line and f"the network on all {tuning['training_rows']:,}" in line


def test_with_no_run_budget_a_familys_own_time_limit_is_reported(prefect_server, maas_home):
    from flows.train_pipeline import train_pipeline
    from tests.conftest import quick_config

    config = quick_config("wine", "budget.time_s=null", "model.families=[network,linear]", "selection.time_budget_s=0.001",
                          "tuning.enabled=false", "serving.build_bento=false")
    summary = train_pipeline(config)
    assert summary.budget["time_s"] is None and "compare" in summary.budget["cut"]
    (line,) = [line for line in summary.outcome().splitlines() if line.startswith("Time limits")]
    assert line.startswith("Time limits (no run budget): compare ") and "in the time budget" in line
    assert "Time limits (no run budget)" in summary.render()
