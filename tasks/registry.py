"""Registry: log the bundle as an MLflow model, register a version, alias it, record provenance."""

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
from maas.orchestration import timed
from maas.paths import project_root
from maas.tracking import mlflow_client
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

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


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
) -> RegisteredVersion:
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
    return RegisteredVersion(name, str(version.version), alias)


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
    input_example: pd.DataFrame,
    manifest: dict[str, Any],
    test_metrics: dict[str, float],
    model_name: str,
    alias: str,
) -> RegisteredVersion:
    """Seal metrics and manifest into the bundle, log it, register it, alias the new version."""
    update_metadata(bundle_dir, metrics=test_metrics, manifest=manifest)
    client.log_text(run_id, manifest_json(manifest), "manifest.json")
    model_info = log_bundle_model(client, run_id, bundle_dir, input_example)
    description = (
        f"test f1_macro {test_metrics['f1_macro']:.4f}, accuracy {test_metrics['accuracy']:.4f}; "
        f"dataset {manifest['dataset_fingerprint']}, commit {manifest['git_commit'][:12]}"
    )
    return register_version(
        client, model_info.model_uri, model_name, alias, run_id,
        version_tags(manifest, test_metrics), description,
    )


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="register-model", retries=2, retry_delay_seconds=3, timeout_seconds=900, cache_policy=NO_CACHE)
def register_model_task(
    run_id: str,
    bundle_dir: Path,
    input_example: pd.DataFrame,
    manifest: dict[str, Any],
    test_metrics: dict[str, float],
    model_name: str,
    alias: str,
) -> tuple[RegisteredVersion, float]:
    """Retries are safe: a failed alias step deletes the version it created."""
    registered, seconds = timed(
        publish_model, mlflow_client(), run_id, bundle_dir, input_example, manifest, test_metrics, model_name, alias
    )
    get_run_logger().info("registered %s version %s as @%s", registered.name, registered.version, registered.alias)
    return registered, seconds
