"""SIGTERM ends `maas run` as terminated (exit 143, one line, its MLflow run KILLED) even where the
exception Prefect's handler raised was caught and wrapped in another on its way out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from maas.tracking import mlflow_client

# `maas run` through its real `main` and `run_flow`, its flow a real Prefect flow that gets SIGTERM
# inside code that wraps whatever it catches, as pydantic did building a validator lazily.
RUN_WRAPPING_THE_SIGNAL = textwrap.dedent("""
    import os, signal, sys, time
    from prefect import flow
    from maas import cli
    from maas.run_context import open_run

    @flow(name="wraps-the-signal")
    def wraps_the_signal(config):
        with open_run("termination", "wrapped", {}):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
            except BaseException as caught:
                raise RuntimeError(f"building a validator: {type(caught).__name__}") from None

    cli.command_run = lambda args: cli.run_flow(args, lambda config: None, lambda config: wraps_the_signal, "training")
    sys.exit(cli.main(["run", "--dataset", "wine"]))
""")


def test_sigterm_wrapped_in_another_error_still_ends_the_run_as_terminated(tmp_path, maas_home, prefect_server):
    script = tmp_path / "run.py"
    script.write_text(RUN_WRAPPING_THE_SIGNAL)
    env = {**os.environ, "MAAS_HOME": str(maas_home), "PREFECT_API_URL": prefect_server, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode == 143, output[-3000:]
    assert "maas: terminated" in run.stderr.splitlines(), output[-3000:]
    assert "building a validator: TerminationSignal" in output, output[-3000:]  # the wrapping happened
    assert "Traceback" not in output, output[-3000:]
    client = mlflow_client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
