"""Shared fixtures: isolated state folders, one Prefect test server per session, small budgets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maas.config import RunConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The Prefect server's telemetry logs an ERROR when offline; tests run offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def maas_home(tmp_path, monkeypatch) -> Path:
    """A fresh MAAS_HOME (MLflow store and artifacts) for one test."""
    home = tmp_path / "maas-home"
    monkeypatch.setenv("MAAS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server and database, started once for the whole session."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield get_current_settings().api.url


def quick_config(dataset: str = "breast_cancer", *overrides: str) -> RunConfig:
    """The shipped quick preset: the whole pipeline in seconds."""
    return load_config(PROJECT_ROOT / "configs" / "quick.yaml", dataset=dataset, overrides=list(overrides))
