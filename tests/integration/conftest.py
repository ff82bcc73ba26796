"""One real training flow run, shared by the tests that inspect what it produced."""

from __future__ import annotations

import pytest

from tests.conftest import module_home, quick_config


@pytest.fixture(scope="module")
def trained(prefect_server, tmp_path_factory):
    """(maas_home, config, summary) of a real flow run on breast_cancer with the quick preset."""
    from flows.train_pipeline import train_pipeline

    config = quick_config("breast_cancer")
    with module_home(tmp_path_factory) as home:
        yield home, config, train_pipeline(config).to_dict()
