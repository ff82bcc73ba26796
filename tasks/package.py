"""Packaging: a registered MLflow model version becomes a BentoML model the service loads.

The BentoML model holds the bundle's files only (ONNX graph + JSON, and a text model's encoder/), labelled with the MLflow model
name, version, alias and run id, so `bentoml models list` says where each one came from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.config import ServingConfig
from maas.errors import MaasInputError
from maas.locks import file_lock
from maas.paths import maas_home, use_embedded_bentoml_home
from maas.registered import ModelRef, download_bundle
from maas.run_context import RunContext

if TYPE_CHECKING:
    from tasks.registry import RegisteredVersion


@dataclass(frozen=True)
class PackagedModel:
    tag: str  # BentoML model tag, name:version
    path: Path  # the bundle inside the BentoML model store
    ref: ModelRef  # the registered version it holds (its number resolved)

    @property
    def label(self) -> str:
        return self.ref.label


def bento_model_name(mlflow_name: str) -> str:
    """BentoML names are lowercase letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", mlflow_name.lower()).strip("-._") or "maas-model"


def bentoml_store_lock():
    """One writer at a time in the BentoML stores (models and Bentos). Replicas on one host (or
    sharing BENTOML_HOME) package at start and when an alias moves, and training runs build Bentos;
    BentoML 1.4 rewrites a name's `latest` file in place and reads it back, so two concurrent saves of
    one name can read it half-written and fail with "does not contain a 'model.yaml'"."""
    use_embedded_bentoml_home()
    return file_lock(Path(os.environ["BENTOML_HOME"]) / ".maas-store.lock")


def package_model(client, ref: ModelRef, what: str = "--model") -> PackagedModel:
    """Resolve the reference in the MLflow registry and save its bundle as a BentoML model, unless the
    store holds it already (already_packaged)."""
    use_embedded_bentoml_home()
    import bentoml

    ref, found = ref.resolve(client, what)
    labels = {"mlflow_model": ref.name, "mlflow_version": ref.version, "mlflow_run_id": found.run_id,
              "alias": ref.alias or "", "variant": found.tags.get("variant", "")}
    with bentoml_store_lock():
        stored = already_packaged(bento_model_name(ref.name), labels)
        if stored is None:
            with tempfile.TemporaryDirectory(dir=maas_home()) as scratch, bentoml.models.create(
                    bento_model_name(ref.name), labels=labels, metadata={"source": f"models:/{ref.name}/{ref.version}"}
            ) as model:
                shutil.copytree(download_bundle(ref, Path(scratch)), model.path, dirs_exist_ok=True)  # encoder/ too
            stored = bentoml.models.get(model.tag)
    return PackagedModel(str(stored.tag), Path(stored.path), ref)


def already_packaged(name: str, labels: dict[str, str]):
    """The newest whole BentoML model of this name with these labels (this registered version and run,
    under this alias), or None. Without it every start of `maas serve`, and of each replica, saved
    another copy, and a text model's encoder is 20-90 MB. A version left without its model.yaml (a
    save killed half-way) is passed over."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    folder = Path(os.environ["BENTOML_HOME"]) / "models" / name
    found = []
    for version in folder.iterdir() if folder.is_dir() else []:
        try:
            model = bentoml.models.get(f"{name}:{version.name}")
        except BentoMLException:
            continue
        if model.info.labels == labels:
            found.append(model)
    return max(found, key=lambda model: model.creation_time, default=None)


def package_tier_models(client, served_name: str, serving: ServingConfig
                        ) -> tuple[dict[str, PackagedModel], dict[str, MaasInputError]]:
    """The models the tiers name (serving.tiers.*.model), and for each tier whose model is not
    registered, why; the caller decides whether that stops it."""
    tier_models, missing = {}, {}
    for tier, settings in serving.tiers.items():
        if settings.model:
            try:
                tier_models[tier] = package_model(client, ModelRef.for_tier(settings.model, served_name),
                                                  f"serving.tiers.{tier}.model")
            except MaasInputError as error:
                missing[tier] = error
    return tier_models, missing


def package_for_bento(client, ref: ModelRef, serving: ServingConfig
                      ) -> tuple[PackagedModel, dict[str, PackagedModel], list[str]]:
    """The model and the models its tiers name. A tier whose model is not registered (yet: the first
    champion has no @challenger) is left out, so the Bento serves it from the model; one warning each."""
    packaged = package_model(client, ref)
    tier_models, missing = package_tier_models(client, packaged.ref.name, serving)
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
    spec["labels"] = {**spec.get("labels", {}), "mlflow_model": packaged.ref.name,
                      "mlflow_version": packaged.ref.version, "alias": packaged.ref.alias or ""}
    spec["models"] = list(dict.fromkeys([packaged.tag, *(model.tag for model in tier_models.values())]))
    arguments = {"maas_model": packaged.tag, "maas_serving": (serving or ServingConfig()).model_dump_json(),
                 "maas_tier_models": json.dumps({tier: model.tag for tier, model in tier_models.items()})}
    with tempfile.TemporaryDirectory(dir=maas_home()) as scratch:
        bentofile = Path(scratch) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(spec))
        with bentoml_store_lock():  # every run's Bento is named maas: its `latest` file is shared as a model's is
            bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(root), args=arguments)
    return str(bento.tag)


def package_champion(ctx: RunContext, registered: RegisteredVersion, serving: ServingConfig) -> str | None:
    """A newly promoted champion as a BentoML model and a Bento; returns the Bento's tag. The registry
    is the source of truth (`maas serve` packages on demand), so a failed build warns, it does not undo."""
    if not (serving.build_bento and registered.gate.promoted):
        return None
    try:
        packaged, tier_models, unserved = package_for_bento(ctx.client, registered.ref, serving)
        for warning in unserved:
            ctx.logger.warning(warning)
        return build_bento(packaged, serving, tier_models)
    except Exception as error:
        ctx.logger.warning("could not build the Bento for %s: %s: %s", registered.ref, error.__class__.__name__, error)
        return None


def record_package(ctx: RunContext, bento: str | None) -> None:
    if bento:
        ctx.record(tags={"maas.bento": bento})
        ctx.logger.info("packaged as Bento %s (serve it: bentoml serve %s)", bento, bento)


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="package", retries=1, retry_delay_seconds=3, timeout_seconds=900, cache_policy=NO_CACHE)
def package_task(ctx: RunContext, registered: RegisteredVersion, serving: ServingConfig) -> str | None:
    return ctx.run_stage("package", partial(package_champion, ctx, registered, serving), record_package)
