"""A running service follows its aliases: when `@champion` (or a tier's alias) moves, by promotion,
the monitor's rollback or a person in the MLflow UI, the service answers with the new version
within `serving.reload_interval_s`, without a restart and without failing a request.

Two halves. `maas serve` (RegistryFollower) asks the registry where each alias points, packages a
version that moved as a BentoML model, and writes the served models' file under MAAS_HOME/run.
Each worker (ServedModelsWatcher) sees the file change, loads the new bundles beside the old ones
and swaps them into the gate at once; requests in flight finish on the models they began with.
A Bento served with `bentoml serve <tag>` holds fixed models and follows nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from maas.paths import maas_home

SERVED_MODELS_ENV = "MAAS_SERVED_MODELS_FILE"
WATCH_EVERY_S = 0.5

logger = logging.getLogger("maas")


def served_models_file(port: int) -> Path:
    return maas_home() / "run" / f"served-models-{port}.json"


def write_served_models(path: Path, default: tuple[str, str], tiers: dict[str, tuple[str, str]]) -> None:
    """{(bundle folder, label)} of the model and each tier's, replaced in one rename: a worker never
    reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"default": list(default), "tiers": {tier: list(source) for tier, source in tiers.items()}}))
    os.replace(scratch, path)


def parse_served_models(content: bytes) -> tuple[tuple[str, str], dict[str, tuple[str, str]]]:
    found = json.loads(content)
    return tuple(found["default"]), {tier: tuple(source) for tier, source in found["tiers"].items()}


class RegistryFollower:
    """In `maas serve`: every reload_interval_s / 2 (so a move is served within the interval, with
    time left to package it), resolve the served references; package what moved; rewrite the file."""

    def __init__(self, client, wanted, serving, path: Path, packaged, tier_models: dict):
        self.client, self.wanted, self.serving, self.path = client, wanted, serving, path
        self.current = {None: packaged, **tier_models}
        self.every_s = max(0.5, serving.reload_interval_s / 2)
        self.next_check = time.monotonic() + self.every_s
        write_served_models(path, *self.sources())

    def sources(self) -> tuple[tuple[str, str], dict[str, tuple[str, str]]]:
        default = self.current[None]
        return (str(default.path), default.label), {tier: (str(model.path), model.label)
                                                    for tier, model in self.current.items() if tier is not None}

    def references(self) -> dict:
        from maas.registered import ModelRef

        served = self.current[None].ref.name
        tiers = {tier: ModelRef.for_tier(settings.model, served) for tier, settings in self.serving.tiers.items()
                 if settings.model and tier in self.current}
        return {None: self.wanted, **tiers}

    def tick(self) -> None:
        """Called often by the supervisor; does its work once per interval. A registry that cannot be
        reached or a reference that no longer resolves keeps what is served (one line each time)."""
        if time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.every_s
        from tasks.package import package_model

        moved = {}
        for tier, ref in self.references().items():
            try:
                resolved, _ = ref.resolve(self.client)
                if resolved.version != self.current[tier].ref.version:
                    moved[tier] = package_model(self.client, ref)
            except Exception as error:  # noqa: BLE001 - serving goes on with what it has
                where = f"tier {tier}" if tier else "the service"
                print(f"maas serve: warning: {where} keeps {self.current[tier].label}: {ref.label} did not resolve "
                      f"({error.__class__.__name__}: {str(error)[:200]})", flush=True)
        if not moved:
            return
        for tier, packaged in moved.items():
            print(f"maas serve: {'tier ' + tier if tier else 'the service'} now answers with {packaged.label} "
                  f"(was {self.current[tier].label})", flush=True)
        self.current.update(moved)
        write_served_models(self.path, *self.sources())


class ServedModelsWatcher:
    """In each worker: a thread that reloads the models when the served models' file changes."""

    def __init__(self, path: Path, gate, threads: int, loaded: bytes):
        """loaded: the file's content the gate's models were loaded from."""
        self.path, self.gate, self.threads, self.seen = path, gate, threads, loaded
        threading.Thread(target=self._run, name="maas-follow", daemon=True).start()

    def _read_state(self):
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _run(self) -> None:
        from deployments.gate import load_models

        stamp = None
        while True:
            time.sleep(WATCH_EVERY_S)
            try:  # a stat twice a second; the file is read only when it was replaced
                found = self.path.stat()
            except FileNotFoundError:
                continue
            if (found.st_mtime_ns, found.st_ino) == stamp:
                continue
            stamp = (found.st_mtime_ns, found.st_ino)
            state = self._read_state()
            if state is None or state == self.seen:
                continue
            self.seen = state
            try:
                default, tiers = parse_served_models(state)
                was = self.gate.models.default.label
                self.gate.swap(load_models(default, tiers, self.threads))
                logger.info("worker %d: now answering with %s (was %s)", os.getpid(), default[1], was)
            except Exception:  # noqa: BLE001 - keep answering with the models already loaded
                logger.exception("worker %d: could not load the models in %s; keeping %s", os.getpid(), self.path,
                                 self.gate.models.default.label)
