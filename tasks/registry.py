"""Registry: pick the winning variant, log it as an MLflow model, register it, and promote it to
champion only if it beats the current champion on the same test data; record provenance."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from maas import bundle as bundle_module
from maas.config import RegistryConfig, SelectionConfig
from maas.orchestration import timed
from maas.paths import project_root
from maas.tracking import mlflow_client
from tasks.drift import write_reference
from tasks.export import update_metadata

ENTRY_FILE = Path(__file__).resolve().parent.parent / "maas" / "mlflow_model.py"
LOCK_FILE_NAME = "requirements.lock"
RUNTIME_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pandas")
MANIFEST_PACKAGES = ("torch", "prefect", "mlflow", "optuna", "onnxruntime", "scikit-learn", "pandas", "numpy")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    gate: GateDecision | None = None

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


# --- selection: which variant wins ---------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    variant: str
    reason: str
    within_limits: bool


def select_variant(rows: list[dict[str, Any]], selection: SelectionConfig) -> Selection:
    """Apply the policy to the variant table (keys: name, f1_macro, rows_per_s_b64, size_bytes,
    p99_ms_b1_e2e). Limits filter first; if no variant meets them, the policy runs over all and the
    reason says so. Faster means more rows/s at batch 64, the batch adaptive batching serves."""
    limited = [
        row for row in rows
        if (selection.max_latency_ms is None or row["p99_ms_b1_e2e"] <= selection.max_latency_ms)
        and (selection.max_size_bytes is None or row["size_bytes"] <= selection.max_size_bytes)
    ]
    pool = limited or rows
    best_f1 = max(row["f1_macro"] for row in pool)
    close = [row for row in pool if row["f1_macro"] >= best_f1 - selection.tolerance - 1e-12]
    if selection.policy == "best_quality":
        winner = max(pool, key=lambda row: (row["f1_macro"], row["rows_per_s_b64"]))
        why = f"best macro F1 {winner['f1_macro']:.4f}"
    elif selection.policy == "fastest":
        # Timings on a shared machine wobble by a few percent: near-equal speeds are a tie, which
        # quality and then size settle, so the pick does not flip from run to run on noise.
        top = max(row["rows_per_s_b64"] for row in close)
        fast = [row for row in close if row["rows_per_s_b64"] >= (1 - selection.speed_tolerance) * top]
        winner = max(fast, key=lambda row: (row["f1_macro"], -row["size_bytes"]))
        why = (f"fastest ({winner['rows_per_s_b64']:,.0f} rows/s at batch 64, within "
               f"{selection.speed_tolerance:.0%} of the top) of {len(close)} variant(s) within "
               f"{selection.tolerance:.3f} F1 of the best ({best_f1:.4f}); F1 {winner['f1_macro']:.4f}")
    else:
        winner = min(close, key=lambda row: (row["size_bytes"], -row["f1_macro"]))
        why = (f"smallest ({winner['size_bytes']:,} bytes) of {len(close)} variant(s) within "
               f"{selection.tolerance:.3f} F1 of the best ({best_f1:.4f}); F1 {winner['f1_macro']:.4f}")
    if not limited:
        why += "; no variant met the latency/size limits, so they were not applied"
    return Selection(winner["name"], f"{winner['name']}: {why}", bool(limited))


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


def gate_decision(new_score: float, champion: tuple[str, float | None] | None, registry: RegistryConfig) -> GateDecision:
    """Champion only if there is none, or the new version beats it by more than min_improvement."""
    metric = registry.gate_metric
    if champion is None:
        return GateDecision(registry.champion_alias, True, "first version: no champion yet", metric, new_score)
    version, score = champion
    if score is None:
        return GateDecision(registry.challenger_alias, False,
                            f"champion v{version} cannot score this test data (other input columns or labels); "
                            "kept, promote by hand if intended", metric, new_score, version, None)
    if new_score > score + registry.min_improvement:
        return GateDecision(registry.champion_alias, True,
                            f"{metric} {new_score:.4f} beats champion v{version}'s {score:.4f} on the same test rows",
                            metric, new_score, version, score)
    return GateDecision(registry.challenger_alias, False,
                        f"{metric} {new_score:.4f} does not beat champion v{version}'s {score:.4f} "
                        f"by more than {registry.min_improvement}; champion kept", metric, new_score, version, score)


def bundle_labels(bundle_dir: Path) -> list[str]:
    return list(json.loads((bundle_dir / bundle_module.METADATA_FILE).read_text())["labels"])


def download_bundle(name: str, version: str, folder: Path) -> Path:
    """The model bundle of a registered version, as serving gets it."""
    import mlflow

    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(folder)))
    pyfunc = Model.load(str(local / "MLmodel")).flavors["python_function"]
    return local / pyfunc["artifacts"]["bundle"]["path"]


def current_champion(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_on_test(
    client, name: str, registry: RegistryConfig, x_test: pd.DataFrame, y_test, labels: list[str], scratch: Path,
) -> tuple[str, float | None] | None:
    """(version, gate-metric score) of the current champion on this run's test rows, if any;
    the score is None when the champion takes other columns or predicts other labels."""
    version = current_champion(client, name, registry.champion_alias)
    if version is None:
        return None
    from tasks.evaluate import classification_metrics

    champion = bundle_module.ModelBundle.load(download_bundle(name, version, scratch / f"champion-v{version}"))
    if champion.labels != labels:
        return version, None
    try:
        probabilities = champion.predict_proba(x_test)
    except bundle_module.InputSchemaError:
        return version, None
    return version, classification_metrics(y_test, probabilities)[registry.gate_metric]


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


def build_manifest(
    config: dict[str, Any],
    dataset_fingerprint: str,
    seed: int,
    mlflow_run_id: str,
    flow_run_id: str | None,
    flow_run_name: str | None,
    tuned_hyperparameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to say exactly how a model version was made."""
    return {
        "tuned_hyperparameters": tuned_hyperparameters,
        "dataset_fingerprint": dataset_fingerprint,
        **source_revision(),
        "lock_file_sha256": lock_file_hash(),
        "seeds": {"seed": seed},
        "config": config,
        "prefect_flow_run_id": flow_run_id,
        "prefect_flow_run_name": flow_run_name,
        "mlflow_run_id": mlflow_run_id,
        "python": platform.python_version(),
        "packages": {name: _installed_version(name) for name in MANIFEST_PACKAGES},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def log_bundle_model(client, run_id: str, bundle_dir: Path, input_example: pd.DataFrame):
    """Log the bundle as a models-from-code pyfunc under the run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import Model, infer_signature

    output_example = bundle_module.ModelBundle.load(bundle_dir).predict(input_example)
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
        signature=infer_signature(input_example, output_example),
        input_example=input_example,
        pip_requirements=requirements,
    )


def register_version(
    client, model_uri: str, name: str, alias: str, run_id: str, tags: dict[str, str], description: str
) -> str:
    """Create the version and point the alias at it; undo the version if any step fails."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Registered by maas.")
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, description=description
    )
    try:
        client.set_registered_model_alias(name, alias, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        raise
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


def publish_model(
    client,
    run_id: str,
    bundle_dir: Path,
    test_split: tuple[pd.DataFrame, Any],
    manifest: dict[str, Any],
    test_metrics: dict[str, float],
    model_name: str,
    registry: RegistryConfig,
    variant: str,
    scratch: Path,
    drift_reference: dict[str, Any] | None = None,
) -> RegisteredVersion:
    """Score the champion on the same test rows, then seal metrics, manifest and the drift
    reference into the bundle, log it, register it, and give the new version the alias the gate decided."""
    x_test, y_test = test_split
    gate = gate_decision(test_metrics[registry.gate_metric],
                         champion_on_test(client, model_name, registry, x_test, y_test, bundle_labels(bundle_dir), scratch),
                         registry)
    update_metadata(bundle_dir, metrics=test_metrics, manifest=manifest, variant=variant)
    if drift_reference is not None:
        write_reference(bundle_dir, drift_reference)
    client.log_text(run_id, manifest_json(manifest), "manifest.json")
    model_info = log_bundle_model(client, run_id, bundle_dir, x_test.head(5))
    description = (
        f"{variant}: test f1_macro {test_metrics['f1_macro']:.4f}, accuracy {test_metrics['accuracy']:.4f}; "
        f"dataset {manifest['dataset_fingerprint']}, commit {manifest['git_commit'][:12]}. Gate: {gate.reason}"
    )
    tags = {**version_tags(manifest, test_metrics), "variant": variant, "gate": "promoted" if gate.promoted else "held",
            "gate_reason": gate.reason[:500]}
    if gate.promoted and gate.champion_version:
        tags["replaced_champion_version"] = gate.champion_version  # what a rollback returns to
    version = register_version(client, model_info.model_uri, model_name, gate.alias, run_id, tags, description)
    client.set_tag(run_id, "maas.gate", f"v{version} -> @{gate.alias}: {gate.reason}"[:5000])
    return RegisteredVersion(model_name, version, gate.alias, gate)


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="register-model", retries=2, retry_delay_seconds=3, timeout_seconds=900, cache_policy=NO_CACHE)
def register_model_task(
    run_id: str,
    bundle_dir: Path,
    test_split: tuple[pd.DataFrame, Any],
    manifest: dict[str, Any],
    test_metrics: dict[str, float],
    model_name: str,
    registry: RegistryConfig,
    variant: str,
    scratch: Path,
    drift_reference: dict[str, Any] | None = None,
) -> tuple[RegisteredVersion, float]:
    """Retries are safe: a failed alias step deletes the version it created."""
    registered, seconds = timed(
        publish_model, mlflow_client(), run_id, bundle_dir, test_split, manifest, test_metrics,
        model_name, registry, variant, scratch, drift_reference,
    )
    get_run_logger().info("registered %s version %s (%s) as @%s: %s", registered.name, registered.version,
                          variant, registered.alias, registered.gate.reason)
    return registered, seconds
