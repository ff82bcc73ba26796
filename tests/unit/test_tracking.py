"""The parent run always ends: no run is ever left RUNNING, whatever happens inside it."""

import pytest

from maas.tracking import MetricBuffer, ensure_experiment, flatten, mlflow_client, parent_run


@pytest.fixture
def client(maas_home):
    return mlflow_client()


def run_status(client, experiment_id):
    (run,) = client.search_runs([experiment_id])
    return run.info.status


def test_finished_failed_and_killed(client):
    for name, error, status in [("ok", None, "FINISHED"), ("bug", ValueError, "FAILED"), ("ctrl-c", KeyboardInterrupt, "KILLED")]:
        experiment_id = ensure_experiment(client, name)
        if error is None:
            with parent_run(client, experiment_id, name, {}):
                pass
        else:
            with pytest.raises(error), parent_run(client, experiment_id, name, {}):
                raise error()
        assert run_status(client, experiment_id) == status


def test_experiment_artifacts_live_under_maas_home(client, maas_home):
    experiment = client.get_experiment(ensure_experiment(client, "where"))
    assert experiment.artifact_location.startswith((maas_home / "mlartifacts").as_uri())
    assert ensure_experiment(client, "where") == experiment.experiment_id


def test_metric_buffer_writes_every_step(client):
    experiment_id = ensure_experiment(client, "buffer")
    with parent_run(client, experiment_id, "b", {}) as run_id:
        buffer = MetricBuffer(client, run_id, flush_every=3)
        for step in range(1, 8):
            buffer.add({"val/loss": 1 / step}, step)
        buffer.flush()
    history = client.get_metric_history(run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(1, 8))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}
