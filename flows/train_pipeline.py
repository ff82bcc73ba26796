"""The training flow: one Prefect flow run = one MLflow parent run; reads as DESIGN.md's diagram."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.settings import get_current_settings

from maas.config import RunConfig
from maas.paths import maas_home
from maas.tracking import ensure_experiment, flatten, log_metrics, log_params, mlflow_client, parent_run, run_url
from tasks.data import PreparedData, prepare_data_task
from tasks.evaluate import Evaluation, evaluate_task
from tasks.export import export_bundle_task
from tasks.registry import RegisteredVersion, build_manifest, register_model_task
from tasks.train import train_task
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
                model_config, train_config = apply_hyperparameters(config.model, config.train, tuning.best_params)

            # Training: the chosen network, early-stopped on validation loss.
            trained, stage_seconds["train"] = train_task(prepared, model_config, train_config, config.seed, run_id)

            # Export: the bundle that is evaluated, registered and served, all the same bytes.
            bundle_dir, stage_seconds["export"] = export_bundle_task(
                Path(scratch) / "bundle", trained.network, trained.spec, prepared.preprocessing,
                prepared.labels, prepared.target, prepared.input_schema,
            )
            # Evaluation: the exported bundle on the held-out test split.
            evaluation, stage_seconds["evaluate"] = evaluate_task(
                bundle_dir, prepared.splits.x_test, prepared.splits.y_test, run_id
            )
            # Registry: log, register, alias, with the reproducibility manifest.
            manifest = build_manifest(
                config.model_dump(mode="json"), prepared.fingerprint, config.seed,
                run_id, str(flow_run.id), flow_run.name, tuning.best_params if tuning else None,
            )
            registered, stage_seconds["register"] = register_model_task(
                run_id, bundle_dir, prepared.splits.x_test.head(5), manifest,
                evaluation.metrics, config.model_name, config.registry.alias,
            )
        log_metrics(client, run_id, {
            "train/best_epoch": trained.best_epoch, "train/epochs_run": trained.epochs_run,
            **{f"time/{stage}_s": seconds for stage, seconds in stage_seconds.items()},
        })

    summary = run_summary(config, run_id, registered, evaluation, stage_seconds, mlflow_url, str(flow_run.id), tuning)
    if tuning is not None:
        create_table_artifact(key="tuning-trials", table=tuning.top_trials,
                              description=f"Top trials of study '{tuning.study_name}' by validation F1")
    create_table_artifact(
        key="test-metrics",
        table=[{"metric": name, "value": round(value, 4)} for name, value in evaluation.metrics.items()],
        description=f"Test split of {prepared.source}: {registered.name} version {registered.version}",
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
    stage_seconds: dict[str, float],
    mlflow_url: str,
    flow_run_id: str,
    tuning: TuningResult | None,
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
        "variants": [
            {
                "name": "fp32",
                "metrics": evaluation.metrics,
                "size_bytes": evaluation.size_bytes,
                "latency_ms": evaluation.latency_p50_ms,
                "latency_p99_ms": evaluation.latency_p99_ms,
            }
        ],
        "bento": None,
        "tuning": None if tuning is None else {
            "study": tuning.study_name, "n_complete": tuning.n_complete, "n_pruned": tuning.n_pruned,
            "n_failed": tuning.n_failed, "epochs_total": tuning.epochs_total, "best_trial": tuning.best_trial,
            "best_val_f1_macro": tuning.best_values[0], "best_params": tuning.best_params,
            "pareto_front": tuning.pareto_front if len(tuning.objectives) > 1 else [],
        },
        "stage_seconds": stage_seconds,
    }
