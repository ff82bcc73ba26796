"""Packaging: a registered MLflow model version becomes a BentoML model the service loads.

The BentoML model holds the bundle's files only (ONNX graph + JSON), labelled with the MLflow model
name, version, alias and run id, so `bentoml models list` says where each one came from.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from maas.errors import MaasInputError
from maas.paths import maas_home

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


def bentoml_home() -> Path:
    return maas_home() / "bentoml"


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """'name', 'name@alias' or 'name/3' -> (name, alias, version); a bare name means @champion."""
    match = REFERENCE.match(reference.strip())
    if not match:
        raise MaasInputError(f"--model '{reference}': expected NAME, NAME@ALIAS or NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    return name, (alias or ("champion" if version is None else None)), version


def bento_model_name(mlflow_name: str) -> str:
    """BentoML names are lowercase letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", mlflow_name.lower()).strip("-._") or "maas-model"


def package_model(client, reference: str) -> PackagedModel:
    """Resolve the reference in the MLflow registry and save its bundle as a BentoML model."""
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
