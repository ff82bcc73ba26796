"""The training flow: one Prefect flow run = one MLflow parent run; reads as DESIGN.md's diagram."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.settings import get_current_settings

from maas.config import RunConfig
from maas.paths import maas_home
from maas.tracking import ensure_experiment, flatten, log_metrics, log_params, mlflow_client, parent_run, run_url
from tasks.data import PreparedData, prepare_data_task
from tasks.compress import compress_task
from tasks.drift import build_reference
from tasks.evaluate import Evaluation, evaluate_variants_task
from tasks.package import package_task
from tasks.registry import RegisteredVersion, Selection, build_manifest, register_model_task, select_variant
from tasks.train import train_task, training_arrays
from tasks.tune import TuningResult, apply_hyperparameters, tune_task

LOCAL_PREFECT_UI = "http://127.0.0.1:4200"  # `prefect server start` on the same Prefect home


def prefect_flow_run_url(flow_run_id: str) -> str:
    """The flow run in Prefect's UI (the configured server's, else a local `prefect server start`)."""
    base = get_current_settings().ui_url or LOCAL_PREFECT_UI
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


@flow(name="maas-train", description="Dataset in; tuned, evaluated, registered model out.")
def train_pipeline(config: RunConfig) -> dict[str, Any]:
    flow_run = get_run_context().flow_run
    client = mlflow_client()
    experiment_id = ensure_experiment(client, config.experiment_name)
    stage_seconds: dict[str, float] = {}

    # Data prep: before any MLflow run exists, so bad input leaves nothing behind.
    prepared, stage_seconds["data"] = prepare_data_task(config.data, config.seed)

    run_tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": flow_run.name,
        "prefect.flow_run_url": prefect_flow_run_url(str(flow_run.id)),
        "maas.dataset": config.data.short_name,
    }
    with parent_run(client, experiment_id, flow_run.name, run_tags) as run_id:
        mlflow_url = run_url(experiment_id, run_id)
        create_link_artifact(key="mlflow-run", link=mlflow_url, link_text=f"MLflow run {run_id}")
        log_params(client, run_id, {**flatten(config.model_dump(mode="json")), **prepared.summary_params()})
        client.log_dict(run_id, data_description(prepared), "data/schema.json")

        with tempfile.TemporaryDirectory(dir=maas_home(), prefix="run-") as scratch:
            # Tuning: an Optuna study (resumable) picks the hyperparameters; trials are child runs.
            model_config, train_config, tuning = config.model, config.train, None
            if config.tuning.enabled:
                tuning, stage_seconds["tune"] = tune_task(
                    prepared, config.model, config.train, config.tuning, config.seed, run_id,
                    experiment_id, config.tuning.study_name or config.experiment_name, Path(scratch),
                )
                if tuning.use_tuned:  # else the best trial was not clearly better than the configured settings
                    model_config, train_config = apply_hyperparameters(config.model, config.train, tuning.best_params)

            # Training: the chosen network, early-stopped on validation loss.
            trained, stage_seconds["train"] = train_task(prepared, model_config, train_config, config.seed, run_id)

            # Compression: every configured variant, each exported as the bundle that would serve.
            variants, failures, stage_seconds["compress"] = compress_task(
                trained, prepared, training_arrays(prepared), config.compression, train_config, config.seed,
                Path(scratch) / "variants",
            )
            # Evaluation: every variant's bundle on the same held-out test split, side by side.
            evaluations, variant_rows, stage_seconds["evaluate"] = evaluate_variants_task(
                variants, failures, prepared.splits.x_test, prepared.splits.y_test, run_id, experiment_id, Path(scratch),
            )
            # Selection: the policy picks the winner; its figures become the run's test metrics.
            selection = select_variant(variant_rows, config.selection)
            winner = next(variant for variant in variants if variant.name == selection.variant)
            evaluation = evaluations[winner.name]
            log_metrics(client, run_id, {f"test/{name}": value for name, value in evaluation.metrics.items()})
            client.log_artifact(run_id, str(evaluation.confusion_png), artifact_path="evaluation")
            client.set_tag(run_id, "maas.selected_variant", winner.name)
            client.set_tag(run_id, "maas.selection", selection.reason[:5000])
            get_run_logger().info("selected %s", selection.reason)

            # Registry: log, register, and promote past the gate, with the reproducibility manifest.
            manifest = build_manifest(
                config.model_dump(mode="json"), prepared.fingerprint, config.seed,
                run_id, str(flow_run.id), flow_run.name, tuning.best_params if tuning and tuning.use_tuned else None,
            )
            drift_reference = build_reference(
                prepared.splits.x_train, prepared.preprocessing, evaluation.probabilities.argmax(1), prepared.labels,
                config.monitoring.drift.reference_rows, config.seed,
            )  # what the monitoring flow measures drift against, sealed into the bundle
            registered, stage_seconds["register"] = register_model_task(
                run_id, winner.bundle_dir, (prepared.splits.x_test, prepared.splits.y_test), manifest,
                evaluation.metrics, config.model_name, config.registry, winner.name, Path(scratch), drift_reference,
            )
            # Packaging: a new champion becomes a BentoML model and a Bento, ready for `bentoml serve`.
            bento = None
            if config.serving.build_bento and registered.gate is not None and registered.gate.promoted:
                _, bento, stage_seconds["package"] = package_task(registered.name, registered.alias, config.serving)
                if bento:
                    client.set_tag(run_id, "maas.bento", bento)
        log_metrics(client, run_id, {
            "train/best_epoch": trained.best_epoch, "train/epochs_run": trained.epochs_run,
            **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        })

    summary = run_summary(config, run_id, registered, evaluation, variant_rows, selection, stage_seconds,
                          mlflow_url, str(flow_run.id), tuning, bento)
    create_table_artifact(key="variants", table=variant_rows,
                          description=f"Variants on the test split; selected {selection.reason}")
    if tuning is not None:
        create_table_artifact(key="tuning-trials", table=tuning.top_trials,
                              description=f"Top trials of study '{tuning.study_name}' by validation F1")
    create_table_artifact(
        key="test-metrics",
        table=[{"metric": name, "value": round(value, 4)} for name, value in evaluation.metrics.items()],
        description=f"Test split of {prepared.source}: {registered.name} version {registered.version} "
                    f"({winner.name}), @{registered.alias}",
    )
    return summary


def data_description(prepared: PreparedData) -> dict[str, Any]:
    return {
        "source": prepared.source,
        "target": prepared.target,
        "labels": prepared.labels,
        "input_schema": prepared.input_schema,
        "dropped_columns": prepared.dropped_columns,
        "fingerprint": prepared.fingerprint,
    }


def run_summary(
    config: RunConfig,
    run_id: str,
    registered: RegisteredVersion,
    evaluation: Evaluation,
    variant_rows: list[dict[str, Any]],
    selection: Selection,
    stage_seconds: dict[str, float],
    mlflow_url: str,
    flow_run_id: str,
    tuning: TuningResult | None,
    bento: str | None,
) -> dict[str, Any]:
    """The `--summary` JSON of the CLI contract (DESIGN.md)."""
    return {
        "mlflow_run_id": run_id,
        "mlflow_run_url": mlflow_url,
        "prefect_flow_run_id": flow_run_id,
        "experiment": config.experiment_name,
        "model_name": registered.name,
        "model_version": registered.version,
        "alias": registered.alias,
        "model_uri": registered.alias_uri,
        "test_metrics": evaluation.metrics,
        "selected_variant": selection.variant,
        "selection_reason": selection.reason,
        "gate": None if registered.gate is None else {
            "promoted": registered.gate.promoted, "reason": registered.gate.reason, "metric": registered.gate.metric,
            "new_score": registered.gate.new_score, "champion_version": registered.gate.champion_version,
            "champion_score": registered.gate.champion_score,
        },
        "variants": [
            {
                "name": row["name"],
                "metrics": {name: row[name] for name in evaluation.metrics},
                "size_bytes": row["size_bytes"],
                "latency_ms": row["p50_ms_b1_e2e"],
                **{key: value for key, value in row.items() if key not in evaluation.metrics and key != "name"},
            }
            for row in variant_rows
        ],
        "bento": bento,
        "tuning": None if tuning is None else {
            "study": tuning.study_name, "n_complete": tuning.n_complete, "n_pruned": tuning.n_pruned,
            "n_failed": tuning.n_failed, "epochs_total": tuning.epochs_total, "best_trial": tuning.best_trial,
            "best_val_f1_macro": tuning.best_values[0], "best_params": tuning.best_params,
            "baseline_val_f1_macro": tuning.baseline_value, "used_tuned": tuning.use_tuned, "decision": tuning.decision,
            "pareto_front": tuning.pareto_front if len(tuning.objectives) > 1 else [],
        },
        "stage_seconds": stage_seconds,
    }
