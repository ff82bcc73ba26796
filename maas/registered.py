"""Registered model versions: how a person names one (NAME, NAME@ALIAS, NAME/VERSION), how it is
found in the MLflow registry, and how its bundle is fetched.

Serving, packaging, the promotion gate and the monitor all name models this way.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from maas.errors import MaasInputError
from maas.locks import file_lock

CHAMPION = "champion"  # RegistryConfig.champion_alias's default; a bare NAME means NAME@<champion alias>
_REFERENCE = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z_][A-Za-z0-9_-]*)|/(?P<version>\d+))?$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version by alias or number; `resolve` fills in the number."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str, default_alias: str = CHAMPION, what: str = "--model") -> ModelRef:
        """'name', 'name@alias' or 'name/3'; a bare name means the champion alias."""
        match = _REFERENCE.match(text.strip())
        if not match:
            raise MaasInputError(f"{what} '{text}': expected NAME, NAME@ALIAS or NAME/VERSION")
        alias, version = match["alias"], match["version"]
        return cls(match["name"], alias or (default_alias if version is None else None), version)

    @classmethod
    def for_tier(cls, model: str, served_name: str) -> ModelRef:
        """A tier's `model` setting: NAME@ALIAS or NAME/VERSION as given, a bare alias of the served model."""
        text = model if ("@" in model or "/" in model) else f"{served_name}@{model}"
        return cls.parse(text, what=f"tier model '{model}'")

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"

    @property
    def uri(self) -> str:
        """models:/NAME@ALIAS, else models:/NAME/VERSION (what mlflow.pyfunc.load_model takes)."""
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        """NAME/VERSION@ALIAS: how logs, /metadata and the prediction log name the version that answered."""
        return f"{self.name}/{self.version}" + (f"@{self.alias}" if self.alias else "")

    def resolve(self, client, what: str = "--model"):
        """(this reference with its version number, MLflow's ModelVersion); a missing one is one line."""
        from mlflow.exceptions import MlflowException

        try:
            found = (client.get_model_version_by_alias(self.name, self.alias) if self.alias
                     else client.get_model_version(self.name, self.version))
        except MlflowException:
            where = f"alias @{self.alias}" if self.alias else f"version {self.version}"
            raise MaasInputError(f"{what} '{self}': {not_found(client, self.name, where)}") from None
        return replace(self, version=str(found.version)), found


MODELS_NAMED = 8  # a missing model's error names at most this many of the store's


def not_found(client, name: str, where: str) -> str:
    """Why a reference found nothing: the model lacks that alias or version, or there is no such
    model, and then the models the store does hold (a file dataset's model is named after the file)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return f"registered model '{name}' has no {where}"
    except MlflowException:
        pass
    names = sorted(model.name for model in client.search_registered_models(max_results=MODELS_NAMED + 1))
    held = ", ".join(names[:MODELS_NAMED]) or "none yet"
    if len(names) > MODELS_NAMED:
        held += ", ..."
    return f"no registered model '{name}' (registered: {held})"


def download_bundle(ref: ModelRef, folder: Path) -> Path:
    """The model bundle of a registered version (its number known), as serving gets it."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{ref.version}",
                                                     dst_path=str(folder)))
    pyfunc = Model.load(str(local / "MLmodel")).flavors["python_function"]
    return local / pyfunc["artifacts"]["bundle"]["path"]


def alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


REPLACED_TAG = "replaced_champion_version"  # on a version: the one its alias pointed at before; a rollback's target


def move_alias(client, target: ModelRef, before: str | None, action: str, reason: str, actor: str | None = None) -> None:
    """Point target.alias at target.version and write who did it and why to the audit trail (action:
    alias.promote, alias.rollback, alias.register). `before`: the version the alias leaves (None if
    new), which each caller already holds."""
    from maas import audit
    from maas.service_store import connect

    client.set_registered_model_alias(target.name, target.alias, target.version)
    connection = connect()
    try:
        audit.append(connection, action, f"{target.name}@{target.alias}", f"v{before}" if before else None,
                     f"v{target.version}", reason, actor)
    finally:
        connection.close()


@contextmanager
def aliases_held(name: str) -> Iterator[None]:
    """One process at a time reads and moves a model's aliases on this machine. Two `maas run` of one
    model at once each scored "no champion yet" and each became champion, the second without being
    compared with the first. Scheduled runs have their deployment's concurrency limit of 1; this
    covers runs and commands started by hand beside them (a file lock: released if the process dies)."""
    from maas.paths import maas_home

    with file_lock(maas_home() / "locks" / f"aliases-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"):
        yield


def promote(client, name: str, version: str, alias: str, reason: str, actor: str | None = None) -> str | None:
    """`maas promote`: a person points an alias at a version; the version it replaces is what a
    later `maas rollback` returns to."""
    ref, _ = ModelRef(name, version=version).resolve(client, "version")
    with aliases_held(name):
        before = alias_version(client, name, alias)
        if before == ref.version:
            raise MaasInputError(f"{name}@{alias} already points at v{ref.version}")
        if before:
            client.set_model_version_tag(name, ref.version, REPLACED_TAG, before)
        move_alias(client, replace(ref, alias=alias), before, "alias.promote", reason or "by hand", actor)
    return before


def rollback(client, name: str, alias: str, reason: str, actor: str | None = None) -> tuple[str, str]:
    """`maas rollback`: the alias back to the version its current one replaced. (from, to)."""
    with aliases_held(name):
        current, found = ModelRef(name, alias).resolve(client, "model")
        previous = found.tags.get(REPLACED_TAG)
        if not previous:
            raise MaasInputError(f"{name}@{alias} (v{current.version}) replaced no earlier version: nothing to roll "
                                 f"back to (use maas promote {shlex.quote(name)} VERSION)")
        ModelRef(name, version=previous).resolve(client, "replaced version")
        client.set_model_version_tag(name, current.version, "rolled_back", (reason or "by hand")[:500])
        move_alias(client, ModelRef(name, alias, previous), current.version, "alias.rollback", reason or "by hand", actor)
    return current.version, previous
