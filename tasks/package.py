"""Packaging: a registered MLflow model version becomes a BentoML model the service loads.

The BentoML model holds the bundle's files only (ONNX graph + JSON), labelled with the MLflow model
name, version, alias and run id, so `bentoml models list` says where each one came from.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from maas.config import ServingConfig
from maas.errors import MaasInputError
from maas.paths import maas_home, use_embedded_bentoml_home

REFERENCE = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z_][A-Za-z0-9_-]*)|/(?P<version>\d+))?$")


@dataclass(frozen=True)
class PackagedModel:
    tag: str  # BentoML model tag, name:version
    path: Path  # the bundle inside the BentoML model store
    mlflow_name: str
    mlflow_version: str
    alias: str | None

    @property
    def label(self) -> str:
        return f"{self.mlflow_name}/{self.mlflow_version}" + (f"@{self.alias}" if self.alias else "")


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """'name', 'name@alias' or 'name/3' -> (name, alias, version); a bare name means @champion."""
    match = REFERENCE.match(reference.strip())
    if not match:
        raise MaasInputError(f"--model '{reference}': expected NAME, NAME@ALIAS or NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    return name, (alias or ("champion" if version is None else None)), version


def tier_reference(model: str, served_name: str) -> str:
    """A tier's `model`: NAME@ALIAS or NAME/VERSION as given, a bare alias of the served model's name."""
    return model if ("@" in model or "/" in model) else f"{served_name}@{model}"


def bento_model_name(mlflow_name: str) -> str:
    """BentoML names are lowercase letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", mlflow_name.lower()).strip("-._") or "maas-model"


def package_model(client, reference: str) -> PackagedModel:
    """Resolve the reference in the MLflow registry and save its bundle as a BentoML model."""
    use_embedded_bentoml_home()
    import bentoml
    from mlflow.exceptions import MlflowException

    from tasks.registry import download_bundle

    name, alias, version = parse_reference(reference)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        where = f"alias @{alias}" if alias else f"version {version}"
        raise MaasInputError(f"--model '{reference}': registered model '{name}' has no {where}") from None
    version = str(found.version)
    with tempfile.TemporaryDirectory(dir=maas_home()) as scratch:
        bundle = download_bundle(name, version, Path(scratch))
        labels = {"mlflow_model": name, "mlflow_version": version, "mlflow_run_id": found.run_id,
                  "alias": alias or "", "variant": found.tags.get("variant", "")}
        with bentoml.models.create(bento_model_name(name), labels=labels,
                                   metadata={"source": f"models:/{name}/{version}"}) as model:
            for item in bundle.iterdir():
                if item.is_file():
                    shutil.copy2(item, Path(model.path) / item.name)
    stored = bentoml.models.get(model.tag)  # the files move into the store when the block ends
    return PackagedModel(str(stored.tag), Path(stored.path), name, version, alias)


def package_tier_models(client, served_name: str, serving: ServingConfig
                        ) -> tuple[dict[str, PackagedModel], dict[str, MaasInputError]]:
    """The models the tiers name (serving.tiers.*.model), and for each tier whose model is not
    registered, why; the caller decides whether that stops it."""
    tier_models, missing = {}, {}
    for tier, settings in serving.tiers.items():
        if settings.model:
            try:
                tier_models[tier] = package_model(client, tier_reference(settings.model, served_name))
            except MaasInputError as error:
                missing[tier] = error
    return tier_models, missing


def package_for_bento(client, reference: str, serving: ServingConfig
                      ) -> tuple[PackagedModel, dict[str, PackagedModel], list[str]]:
    """The model and the models its tiers name. A tier whose model is not registered (yet: the first
    champion has no @challenger) is left out, so the Bento serves it from the model; one warning each."""
    packaged = package_model(client, reference)
    tier_models, missing = package_tier_models(client, packaged.mlflow_name, serving)
    return packaged, tier_models, [f"tier {tier} is served from {packaged.label} in this Bento: {error}"
                                   for tier, error in missing.items()]


def pinned_packages(names: list[str]) -> list[str]:
    """The bentofile's packages at the versions requirements.lock holds, so the Bento runs what was tested."""
    from maas.paths import project_root

    lock = {}
    lock_file = project_root() / "requirements.lock"
    if lock_file.is_file():
        for line in lock_file.read_text().splitlines():
            if "==" in line:
                name, version = line.split("==", 1)
                lock[name.strip().lower().replace("_", "-")] = version.strip()
    return [f"{name}=={lock[name.lower()]}" if name.lower() in lock else name for name in names]


def build_bento(packaged: PackagedModel, serving: ServingConfig | None = None,
                tier_models: dict[str, PackagedModel] | None = None) -> str:
    """`bentoml build` of deployments/bentofile.yaml with these models inside; returns the Bento tag.
    The serving config and the tiers' models travel as Bento arguments, so `bentoml serve <tag>`
    serves what the training run configured: tiers, limits, auth, batching and log sampling."""
    import bentoml
    import yaml

    from maas.paths import project_root

    root = project_root()
    tier_models = tier_models or {}
    spec = yaml.safe_load((root / "deployments" / "bentofile.yaml").read_text())
    spec["python"] = {**spec.get("python", {}), "packages": pinned_packages(spec.get("python", {}).get("packages", []))}
    spec["labels"] = {**spec.get("labels", {}), "mlflow_model": packaged.mlflow_name,
                      "mlflow_version": packaged.mlflow_version, "alias": packaged.alias or ""}
    spec["models"] = list(dict.fromkeys([packaged.tag, *(model.tag for model in tier_models.values())]))
    arguments = {"maas_model": packaged.tag, "maas_serving": (serving or ServingConfig()).model_dump_json(),
                 "maas_tier_models": json.dumps({tier: model.tag for tier, model in tier_models.items()})}
    with tempfile.TemporaryDirectory(dir=maas_home()) as scratch:
        bentofile = Path(scratch) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(spec))
        bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(root), args=arguments)
    return str(bento.tag)


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="package", retries=1, retry_delay_seconds=3, timeout_seconds=900, cache_policy=NO_CACHE)
def package_task(model_name: str, alias: str, serving: ServingConfig) -> tuple[PackagedModel | None, str | None, float]:
    """The last step of training: the champion as a BentoML model and a Bento. The registry is the
    source of truth (`maas serve` packages on demand), so a failed build warns, it does not undo."""
    started = time.perf_counter()
    from maas.tracking import mlflow_client

    logger = get_run_logger()
    try:
        packaged, tier_models, unserved = package_for_bento(mlflow_client(), f"{model_name}@{alias}", serving)
        for warning in unserved:
            logger.warning(warning)
        bento = build_bento(packaged, serving, tier_models)
    except Exception as error:
        logger.warning("could not build the Bento for %s@%s: %s: %s", model_name, alias,
                       error.__class__.__name__, error)
        return None, None, time.perf_counter() - started
    logger.info("packaged %s as BentoML model %s and Bento %s (serve it: bentoml serve %s)",
                packaged.label, packaged.tag, bento, bento)
    return packaged, bento, time.perf_counter() - started
