"""Registry: pick the winning variant, log it as an MLflow model, register it, and promote it to
champion only if it beats the current champion on the same test data; record provenance."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from maas import bundle as bundle_module
from maas.config import RegistryConfig, RunConfig, SelectionConfig
from maas.paths import project_root
from maas.registered import REPLACED_TAG, ModelRef, alias_version, aliases_held, download_bundle, move_alias
from maas.run_context import RunContext
from tasks.compress import Variant
from tasks.data import DataSplits, PreparedData
from tasks.drift import build_reference, write_reference
from maas.figures import log_confusion_matrix
from tasks.evaluate import Evaluation, Scores, VariantRow, VariantTable, classification_metrics, evaluate_bundle
from tasks.families import Comparison
from tasks.export import update_metadata
from tasks.recovery import REGISTRATION_TAG
from tasks.tune import TuningResult

ENTRY_FILE = Path(__file__).resolve().parent.parent / "maas" / "mlflow_model.py"
LOCK_FILE_NAME = "requirements.lock"
RUNTIME_PACKAGES = ("mlflow", "onnxruntime", "tokenizers", "numpy", "pandas")  # tokenizers: text columns
MANIFEST = "manifest.json"  # the training run's artifact: how the version was made, its full config included
MANIFEST_PACKAGES = ("torch", "prefect", "mlflow", "optuna", "onnxruntime", "scikit-learn", "pandas", "numpy")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    variant: str
    test_metrics: dict[str, float]
    gate: GateDecision

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.alias, self.version)


# --- selection: which variant wins ---------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    variant: str
    reason: str
    within_limits: bool


def select_variant(rows: list[VariantRow], selection: SelectionConfig) -> Selection:
    """Apply the policy to the variant table. Limits filter first; if no variant meets them, the
    policy runs over all and the reason says so. Faster means more rows/s at batch 64, the batch
    adaptive batching serves."""
    limited = [
        row for row in rows
        if (selection.max_latency_ms is None or row.p99_ms_b1_e2e <= selection.max_latency_ms)
        and (selection.max_size_bytes is None or row.size_bytes <= selection.max_size_bytes)
    ]
    pool = limited or rows
    best_f1 = max(row.f1_macro for row in pool)
    close = [row for row in pool if row.f1_macro >= best_f1 - selection.tolerance - 1e-12]
    if selection.policy == "best_quality":
        winner = max(pool, key=lambda row: (row.f1_macro, row.rows_per_s_b64))
        why = f"best macro F1 {winner.f1_macro:.4f}"
    elif selection.policy == "fastest":
        # Timings on a shared machine wobble by a few percent: near-equal speeds are a tie, which
        # quality and then size settle, so the pick does not flip from run to run on noise.
        top = max(row.rows_per_s_b64 for row in close)
        fast = [row for row in close if row.rows_per_s_b64 >= (1 - selection.speed_tolerance) * top]
        winner = max(fast, key=lambda row: (row.f1_macro, -row.size_bytes))
        why = (f"fastest ({winner.rows_per_s_b64:,.0f} rows/s at batch 64, within "
               f"{selection.speed_tolerance:.0%} of the top) of {len(close)} variant(s) within "
               f"{selection.tolerance:.3f} F1 of the best ({best_f1:.4f}); F1 {winner.f1_macro:.4f}")
    else:
        winner = min(close, key=lambda row: (row.size_bytes, -row.f1_macro))
        why = (f"smallest ({winner.size_bytes:,} bytes) of {len(close)} variant(s) within "
               f"{selection.tolerance:.3f} F1 of the best ({best_f1:.4f}); F1 {winner.f1_macro:.4f}")
    if len(pool) == 1:
        why = f"the only variant; F1 {winner.f1_macro:.4f}"
    if winner.in_sample:
        why += (" on rows it was fitted on (in-sample: the family's cross-validated F1 is the fair figure, "
                "and the test split reports it)")
    if not limited:
        why += "; no variant met the latency/size limits, so they were not applied"
    return Selection(winner.name, f"{winner.name}: {why}", bool(limited))


@dataclass(frozen=True)
class Winner:
    """The selection stage's result: the chosen variant, its figures (validation; test once
    reported), the table it won, and the family comparison it came out of."""

    selection: Selection
    variant: Variant
    evaluation: Evaluation
    table: VariantTable
    comparison: Comparison | None = None


def choose_winner(scores: Scores, selection: SelectionConfig) -> Winner:
    choice = select_variant(scores.table.rows, selection)
    variant = next(variant for variant in scores.variants if variant.name == choice.variant)
    return Winner(choice, variant, scores.evaluations[choice.variant], scores.table)


def record_winner(ctx: RunContext, winner: Winner) -> None:
    """The selection and the variant table (validation figures) to MLflow tags and Prefect."""
    reason = winner.selection.reason
    ctx.record(tags={"maas.selected_variant": winner.variant.name, "maas.selection": reason})
    ctx.artifacts.table("variants", winner.table.flat(), f"Variants on the validation split; selected {reason}")
    ctx.logger.info("selected %s", reason)


def report_on_test(winner: Winner, splits: DataSplits, comparison: Comparison | None, threads: int | None) -> Winner:
    """The chosen variant on the test split: the one time any stage reads it (with the gate)."""
    evaluation = evaluate_bundle(winner.variant.bundle_dir, splits.x_test, splits.y_test, threads, split="test")
    return replace(winner, evaluation=evaluation, comparison=comparison)


def record_report(ctx: RunContext, winner: Winner) -> None:
    """The winner's test figures become the run's test metrics, with its confusion matrix."""
    evaluation = winner.evaluation
    ctx.record(metrics={f"test/{name}": value for name, value in evaluation.metrics.items()})
    ctx.defer(log_confusion_matrix, ctx.run_id, evaluation.confusion, evaluation.labels,
              ctx.scratch_dir("winner") / "confusion_matrix.png", f"test split: accuracy {evaluation.metrics['accuracy']:.3f}")
    ctx.logger.info("test split, %s: %s", winner.variant.name,
                    ", ".join(f"{name} {value:.4f}" for name, value in evaluation.metrics.items()))


# --- the promotion gate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    alias: str  # the alias the new version takes
    promoted: bool
    reason: str
    metric: str
    new_score: float
    champion_version: str | None = None
    champion_score: float | None = None


class ChampionScore(NamedTuple):
    """The current champion on this run's test rows: its gate-metric score (None: it cannot be scored
    here, for `why`), and the test rows it was scored on (None: all of them)."""

    version: str
    score: float | None
    unseen: np.ndarray | None = None  # test rows the champion was not fitted on, where it was fitted on some
    why: str = "other input columns or labels"


def gate_decision(new_score: float, champion: ChampionScore | None, registry: RegistryConfig) -> GateDecision:
    """Champion only if there is none, or the new version beats it by more than min_improvement, both
    scored on the same test rows: the ones the champion was not fitted on, where it was fitted on some."""
    metric = registry.gate_metric
    if champion is None:
        return GateDecision(registry.champion_alias, True, "first version: no champion yet", metric, new_score)
    version, score = champion.version, champion.score
    if score is None:
        return GateDecision(registry.challenger_alias, False,
                            f"champion v{version} cannot score this test data ({champion.why}); "
                            "kept, promote by hand if intended", metric, new_score, version, None)
    rows = "the same test rows" if champion.unseen is None else (
        f"the same {int(champion.unseen.sum())} test rows (the {int((~champion.unseen).sum())} it was fitted on "
        "left out)")
    if new_score > score + registry.min_improvement:
        return GateDecision(registry.champion_alias, True,
                            f"{metric} {new_score:.4f} beats champion v{version}'s {score:.4f} on {rows}",
                            metric, new_score, version, score)
    return GateDecision(registry.challenger_alias, False,
                        f"{metric} {new_score:.4f} does not beat champion v{version}'s {score:.4f} on {rows} "
                        f"by more than {registry.min_improvement}; champion kept", metric, new_score, version, score)


def champion_on_test(client, name: str, registry: RegistryConfig, prepared: PreparedData, scratch: Path
                     ) -> ChampionScore | None:
    """The current champion, if any, scored on this run's test rows that it was not fitted on.

    A file that grew since the champion's run (new rows, or labelled production rows appended) is
    split anew, so rows the champion was fitted on land in this run's test split: on 1,500 support
    tickets and 200 appended rows it scored 0.7170 on them against its own test F1 of 0.6393, and no
    retrained model could pass the gate. Its run keeps fingerprints of its fitted rows (FITTED_ROWS);
    a champion registered before they were kept is scored on every test row."""
    version = alias_version(client, name, registry.champion_alias)
    if version is None:
        return None
    champion_ref = ModelRef(name, registry.champion_alias, version)
    champion = bundle_module.ModelBundle.load(download_bundle(champion_ref, scratch / f"champion-v{version}"), memo=True)
    if champion.labels != prepared.labels:
        return ChampionScore(version, None)
    x_test, y_test = prepared.splits.x_test, prepared.splits.y_test
    unseen = unseen_rows(client, client.get_model_version(name, version).run_id, x_test, scratch)
    if unseen is not None and not unseen.any():
        return ChampionScore(version, None, unseen, "it was fitted on every test row of this run")
    if unseen is not None:
        x_test, y_test = x_test[unseen], y_test[unseen]
    try:
        probabilities = champion.predict_proba(x_test)
    except bundle_module.InputSchemaError:
        return ChampionScore(version, None)
    # answered by the champion's own decision (a tuned threshold or class weights), as its run scored it:
    # by argmax alone, a champion with a tuned threshold lost to its own retrained copy
    score = gate_score(y_test, probabilities, champion.decision, registry.gate_metric)
    if score is None:
        return ChampionScore(version, None, unseen, "the test rows it was not fitted on lack a class")
    return ChampionScore(version, score, unseen)


def gate_score(y: np.ndarray, probabilities: np.ndarray, decision: dict | None, metric: str) -> float | None:
    """The gate metric, or None where the rows cannot give it (ROC-AUC on rows of one class)."""
    try:
        return classification_metrics(y, probabilities, decision)[metric]
    except ValueError:
        return None


def new_version_score(winner: Winner, y_test: np.ndarray, champion: ChampionScore | None, metric: str) -> float:
    """The new version's gate-metric score on the rows its champion was scored on."""
    evaluation = winner.evaluation
    if champion is None or champion.unseen is None or champion.score is None:
        return evaluation.metrics[metric]
    return gate_score(y_test[champion.unseen], evaluation.probabilities[champion.unseen], evaluation.decision, metric)


# --- the rows a model was fitted on ------------------------------------------------------------------

FITTED_ROWS = "gate/fitted_rows.npz"  # run artifact: fingerprints of the training and validation rows


def canonical_values(values: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """A column's values in a form that does not depend on how pandas typed them: numbers (30, 30.0
    and '30' alike; a date as its day number) as float64, NaN where the value is not one, and the
    other values as stripped text, empty where the value is a number or missing."""
    values = values.reset_index(drop=True)
    no_text = pd.Series("", index=values.index, dtype="string")
    if pd.api.types.is_datetime64_any_dtype(values):
        return bundle_module.dates_as_days(values), no_text
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return values.astype("float64").to_numpy(na_value=np.nan), no_text
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    text = values.astype("string").str.strip().where(numbers.isna(), "").fillna("")
    return numbers.to_numpy(na_value=np.nan), text


def row_fingerprints(x: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One 64-bit hash per row of x's `columns` (canonical_values), so a row read again from a grown
    file, or typed otherwise beside appended rows, is known. Numbers are hashed as numbers: as text,
    240,000 rows of 14 columns took 14 s."""
    canonical = {}
    for index, column in enumerate(columns):
        canonical[f"{index}n"], canonical[f"{index}t"] = canonical_values(x[column])
    return pd.util.hash_pandas_object(pd.DataFrame(canonical), index=False).to_numpy(dtype=np.uint64)


def write_fitted_rows(client, run_id: str, splits: DataSplits, scratch: Path) -> None:
    """The run's training and validation rows, as fingerprints, for a later run's gate."""
    columns = [str(column) for column in splits.x_train.columns]
    fitted = np.unique(np.concatenate([row_fingerprints(splits.x_train, columns),
                                       row_fingerprints(splits.x_val, columns)]))
    path = scratch / Path(FITTED_ROWS).name
    np.savez_compressed(path, fingerprints=fitted, columns=np.array(columns, dtype=str))
    client.log_artifact(run_id, str(path), str(Path(FITTED_ROWS).parent))


def unseen_rows(client, run_id: str, x_test: pd.DataFrame, scratch: Path) -> np.ndarray | None:
    """Which of x_test's rows the run did not fit on; None where that is every row, where it kept no
    fingerprints (a run from before they were kept), or where this table lacks a column it had."""
    folder = scratch / f"fitted-rows-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, FITTED_ROWS, str(folder))
    except Exception:  # noqa: BLE001 - MLflow raises its own error, or OSError, for an artifact that is not there
        return None
    with np.load(path, allow_pickle=False) as saved:
        fitted, columns = saved["fingerprints"], [str(column) for column in saved["columns"]]
    if not set(columns) <= set(map(str, x_test.columns)):
        return None
    x_test = x_test.set_axis(list(map(str, x_test.columns)), axis=1)
    unseen = ~np.isin(row_fingerprints(x_test, columns), fitted)
    return None if unseen.all() else unseen


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(project_root()), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_revision() -> dict[str, Any]:
    """The git commit the code came from, and whether the working tree differed from it."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def lock_file_hash() -> str:
    lock = project_root() / LOCK_FILE_NAME
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "unknown"


def _installed_version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return "not installed"


def build_manifest(config: RunConfig, dataset_fingerprint: str, ctx: RunContext,
                   tuned_hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """Everything needed to say exactly how a model version was made."""
    return {
        "tuned_hyperparameters": tuned_hyperparameters,
        "dataset_fingerprint": dataset_fingerprint,
        **source_revision(),
        "lock_file_sha256": lock_file_hash(),
        "seeds": {"seed": config.seed},
        "config": config.model_dump(mode="json"),
        "prefect_flow_run_id": ctx.flow_run_id,
        "prefect_flow_run_name": ctx.flow_run_name,
        "mlflow_run_id": ctx.run_id,
        "python": platform.python_version(),
        "packages": {name: _installed_version(name) for name in MANIFEST_PACKAGES},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def log_bundle_model(client, run_id: str, bundle_dir: Path, input_example: pd.DataFrame):
    """Log the bundle as a models-from-code pyfunc under the run; returns MLflow's ModelInfo."""
    bundle = bundle_module.ModelBundle.load(bundle_dir)
    for column in bundle.preprocessing.get("text", []):  # a number among the texts: MLflow cannot infer the example
        input_example = input_example.assign(**{column["name"]: bundle_module.as_texts(input_example[column["name"]])})
    # The example is test rows, and a category too rare to keep in training is in them: the pyfunc's
    # warning for a client's unknown values (here twice, MLflow predicting the example again) told the
    # person running `maas run` about the run's own rows.
    pyfunc_warnings = logging.getLogger("maas")
    pyfunc_warnings.addFilter(without_unknown_category_warning)
    try:
        return _log_pyfunc(client, run_id, bundle_dir, bundle, input_example)
    finally:
        pyfunc_warnings.removeFilter(without_unknown_category_warning)


def without_unknown_category_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(bundle_module.UNKNOWN_CATEGORY_WARNING)


def _log_pyfunc(client, run_id: str, bundle_dir: Path, bundle, input_example: pd.DataFrame):
    import mlflow
    from mlflow.models import Model, ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    output_example = bundle.predict_typed(input_example)  # what the pyfunc answers (mlflow_model.py)
    # Any type per column: a frame as pandas reads the training file holds int64 where the example has
    # float64, and NaN; MLflow's double refused int64 ("Can not safely convert"). The bundle coerces.
    inputs = Schema([ColSpec(AnyType(), name) for name in bundle_module.required_columns(bundle.preprocessing)])
    with warnings.catch_warnings():  # its hint that an integer column cannot hold a gap is about inputs;
        # the integer here is the output's label (a 0/1 target's), never missing
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        signature = ModelSignature(inputs=inputs, outputs=infer_signature(input_example, output_example).outputs)
    requirements = [f"{name}=={_installed_version(name)}" for name in RUNTIME_PACKAGES]
    # Model.log(run_id=...) files the LoggedModel under the *active* experiment, not the run's;
    # left alone that is experiment 0, whose artifacts go to ./mlruns in the caller's directory.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pyfunc,
        flavor_name="pyfunc",
        run_id=run_id,
        python_model=str(ENTRY_FILE),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=[bundle_module.__file__],
        signature=signature,
        input_example=input_example,
        pip_requirements=requirements,
    )


def register_version(client, model_info, target: ModelRef, run_id: str, tags: dict[str, str], description: str
                     ) -> str:
    """Create the version of the logged model (MLflow's ModelInfo) and point the alias at it; undo
    the version if any step fails."""
    name, alias = target.name, target.alias
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Registered by maas.")
    # 'pending' until the alias is set: a version a crash left without its alias is deleted by the
    # next run (tasks/recovery.py), so no version is ever half-registered for long.
    # model_id as well as the models:/ source: a tracking server refuses a bare models:/m-... source
    # ("The model_id request parameter must identify the resource"); the embedded store accepted it.
    version = client.create_model_version(
        name, source=model_info.model_uri, run_id=run_id, tags={**tags, REGISTRATION_TAG: "pending"},
        description=description, model_id=model_info.model_id,
    )
    try:  # the gate's decision, in the audit trail with the run as its actor
        action = "alias.promote" if tags.get("gate") == "promoted" else "alias.register"
        move_alias(client, ModelRef(name, alias, str(version.version)), alias_version(client, name, alias), action,
                   tags.get("gate_reason", ""), f"training run {run_id}")
    except Exception:
        client.delete_model_version(name, version.version)
        raise
    client.set_model_version_tag(name, version.version, REGISTRATION_TAG, "complete")
    return str(version.version)


def version_tags(manifest: dict[str, Any], test_metrics: dict[str, float]) -> dict[str, str]:
    """Searchable tags on the version: provenance and headline test figures."""
    tags = {
        "dataset_fingerprint": manifest["dataset_fingerprint"],
        "git_commit": manifest["git_commit"],
        "lock_file_sha256": manifest["lock_file_sha256"],
        "seed": str(manifest["seeds"]["seed"]),
        "prefect_flow_run_id": str(manifest["prefect_flow_run_id"]),
        "mlflow_run_id": manifest["mlflow_run_id"],
    }
    tags.update({f"test_{key}": f"{value:.4f}" for key, value in test_metrics.items()})
    return tags


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True)


def register(ctx: RunContext, winner: Winner, prepared: PreparedData, config: RunConfig,
             tuning: TuningResult | None) -> RegisteredVersion:
    """Seal the test metrics, the manifest and the drift reference into the winner's bundle; log it;
    then, holding the model's aliases, score the current champion on this run's test rows and
    register the winner under the alias the gate decided."""
    name, registry, variant = config.model_name, config.registry, winner.variant.name
    metrics, bundle_dir = winner.evaluation.metrics, winner.variant.bundle_dir
    splits = prepared.splits
    manifest = build_manifest(config, prepared.fingerprint, ctx, tuning.best_params if tuning and tuning.use_tuned else None)
    # the test split's confusion matrix: what live quality weighs the test F1's own noise by (tasks/quality.py)
    update_metadata(bundle_dir, metrics=metrics, manifest=manifest, variant=variant,
                    test_confusion=np.asarray(winner.evaluation.confusion).tolist())
    write_reference(bundle_dir, build_reference(  # what the monitoring flow measures drift against
        splits.x_train, prepared.preprocessing, winner.evaluation.predicted(), prepared.labels,
        config.monitoring.drift.reference_rows, config.seed))
    ctx.client.log_text(ctx.run_id, manifest_json(manifest), MANIFEST)
    model_info = log_bundle_model(ctx.client, ctx.run_id, bundle_dir, splits.x_test.head(5))
    write_fitted_rows(ctx.client, ctx.run_id, splits, ctx.scratch)
    with aliases_held(name):  # the champion the gate scores is the one the alias still names when it moves
        champion = champion_on_test(ctx.client, name, registry, prepared, ctx.scratch)
        gate = gate_decision(new_version_score(winner, splits.y_test, champion, registry.gate_metric), champion,
                             registry)
        version = register_version(ctx.client, model_info, ModelRef(name, gate.alias), ctx.run_id,
                                   registration_tags(gate, manifest, metrics, variant),
                                   description_of(gate, manifest, metrics, variant))
    return RegisteredVersion(name, version, gate.alias, variant, metrics, gate)


def description_of(gate: GateDecision, manifest: dict[str, Any], metrics: dict[str, float], variant: str) -> str:
    return (
        f"{variant}: test f1_macro {metrics['f1_macro']:.4f}, accuracy {metrics['accuracy']:.4f}; "
        f"dataset {manifest['dataset_fingerprint']}, commit {manifest['git_commit'][:12]}. Gate: {gate.reason}"
    )


def registration_tags(gate: GateDecision, manifest: dict[str, Any], metrics: dict[str, float], variant: str
                      ) -> dict[str, str]:
    tags = {**version_tags(manifest, metrics), "variant": variant, "gate": "promoted" if gate.promoted else "held",
            "gate_reason": gate.reason[:500]}
    if gate.promoted and gate.champion_version:
        tags[REPLACED_TAG] = gate.champion_version  # what a rollback returns to
    return tags


def record_registration(ctx: RunContext, registered: RegisteredVersion) -> None:
    gate = registered.gate
    ctx.record(tags={"maas.gate": f"v{registered.version} -> @{registered.alias}: {gate.reason}"})
    ctx.artifacts.table("test-metrics", [{"metric": name, "value": round(value, 4)}
                                         for name, value in registered.test_metrics.items()],
                        f"Test split: {registered.ref.label} ({registered.variant})")
    ctx.logger.info("registered %s (%s): %s", registered.ref.label, registered.variant, gate.reason)


# --- Prefect wrappers ------------------------------------------------------------------------------


@task(name="select", retries=0, cache_policy=NO_CACHE)
def select_task(ctx: RunContext, scores: Scores, selection: SelectionConfig) -> Winner:
    return ctx.run_stage("select", partial(choose_winner, scores, selection), record_winner)


@task(name="report-on-test", retries=0, timeout_seconds=1800, cache_policy=NO_CACHE)
def report_task(ctx: RunContext, winner: Winner, splits: DataSplits, comparison: Comparison | None, threads: int) -> Winner:
    return ctx.run_stage("report", partial(report_on_test, winner, splits, comparison, threads or None), record_report)


@task(name="register-model", retries=2, retry_delay_seconds=3, timeout_seconds=900, cache_policy=NO_CACHE)
def register_task(ctx: RunContext, winner: Winner, prepared: PreparedData, config: RunConfig,
                  tuning: TuningResult | None) -> RegisteredVersion:
    """Retries are safe: a failed alias step deletes the version it created."""
    return ctx.run_stage("register", partial(register, ctx, winner, prepared, config, tuning), record_registration)
