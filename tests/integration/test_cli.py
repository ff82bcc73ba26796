"""The `maas` command as a user runs it: bad input, a real run with its summary, the MLflow UI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from flows.summaries import CONTRACT_KEYS
from maas.cli import main
from maas.tracking import mlflow_client
from tests.conftest import PROJECT_ROOT, free_port, wait_until_up

pytestmark = pytest.mark.slow

BAD_INPUTS = {
    "missing file": (["--dataset", "{tmp}/gone.csv", "--target", "y"], "data file not found"),
    "empty file": (["--dataset", "{tmp}/empty.csv", "--target", "y"], "the file is empty"),
    "header only": (["--dataset", "{tmp}/header.csv", "--target", "y"], "header but no data rows"),
    "not a table": (["--dataset", "{tmp}/binary.csv", "--target", "y"], "not a text table"),
    "ragged rows": (["--dataset", "{tmp}/ragged.csv", "--target", "y"], "ragged rows: line 3"),
    "missing target": (["--dataset", "{tmp}/ok.csv", "--target", "nope"], "target column 'nope' not found"),
    "one class": (["--dataset", "{tmp}/oneclass.csv", "--target", "y"], "single class"),
    "unknown dataset": (["--dataset", "iris"], "unknown dataset 'iris'"),
    "a url": (["--dataset", "https://example.com/data.csv", "--target", "y"],
              "https://example.com/data.csv: a URL; maas reads local files: download it first"),
    "bad set key": (["--set", "train.epochz=3"], "unknown field 'train.epochz'"),
    "bad set value": (["--set", "train.batch_size=0"], "train.batch_size"),
    "no cuda": (["--dataset", "wine", "--set", "train.device=cuda"], "no CUDA device"),
    "extra rows": (["--dataset", "{tmp}/ok.csv", "--target", "y", "--set", "data.extra_paths=[{tmp}/header.csv]"],
                   "header but no data rows"),
    "extra columns": (["--dataset", "{tmp}/ok.csv", "--target", "y", "--set", "data.extra_paths=[{tmp}/ragless.csv]"],
                      "extra rows for {tmp}/ok.csv lacks column(s) b"),
    # told before the run, not after it has trained and registered
    "summary is a folder": (["--dataset", "wine", "--summary", "{tmp}"], "--summary {tmp}: is a folder; name a file in it"),
    "summary under a file": (["--dataset", "wine", "--summary", "{tmp}/ok.csv/s.json"], "--summary {tmp}/ok.csv: is a file"),
}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("a,b,y\n")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "ragged.csv").write_text("a,b,y\n1,2,p\n3,4\n")
    (tmp_path / "ragless.csv").write_text("a,y\n1,p\n")
    (tmp_path / "ok.csv").write_text("a,b,y\n" + "".join(f"{i},{i % 3},{'pq'[i % 2]}\n" for i in range(60)))
    (tmp_path / "oneclass.csv").write_text("a,b,y\n" + "".join(f"{i},{i % 3},p\n" for i in range(60)))
    return tmp_path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_nonzero_exit_and_leaves_nothing(case, bad_files, maas_home, capsys):
    arguments, expected = BAD_INPUTS[case]
    if case == "no cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    exit_code = main(["run", *[a.format(tmp=bad_files) for a in arguments]])
    captured = capsys.readouterr()
    assert exit_code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected.format(tmp=bad_files) in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    client = mlflow_client()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_registered_models() == []


def test_serve_with_an_unreachable_limits_store_is_one_line_without_the_password(maas_home, capsys):
    exit_code = main(["serve", "--port", str(free_port()), "--set", "serving.limits_backend=redis",
                      "--set", "serving.redis_url=redis://maas:s3cret@127.0.0.1:1/0"])  # nothing listens on port 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert exit_code == 2 and "serving.redis_url: cannot reach redis://maas:***@127.0.0.1:1/0" in line
    assert "s3cret" not in captured.out + captured.err and "Traceback" not in captured.out + captured.err


def test_usage_errors_are_one_line(capsys):
    for arguments, expected in ((["run", "--bogus"], "--bogus"), (["serve", "--port", "99999"], "99999 is not a port"),
                                (["ui", "--port", "http"], "'http' is not a port number"),
                                (["audit", "--limit", "0"], "--limit: 0: at least 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines


def test_a_month_that_is_none_is_one_line(maas_home, capsys):
    assert main(["usage", "--month", "2026-13"]) == 2
    assert capsys.readouterr().err.strip() == "maas: error: --month '2026-13': expected YYYY-MM, e.g. 2026-12"


def test_every_command_has_help_with_examples(capsys):
    for command in ("run", "tune-worker", "ui", "tracking-server", "serve", "keys", "monitor", "schedule", "promote",
                    "rollback", "audit", "purge", "bill"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, command


@pytest.mark.parametrize("store_exists, arguments, expected", [
    (False, [], "monitoring.model 'maas-breast_cancer@champion': no MLflow store"),
    (True, ["--set", "monitoring.model=maas-wine/7"], "monitoring.model 'maas-wine/7': no registered model 'maas-wine' (registered: none yet); "
                                                        "train one with `maas run`"),
])
def test_monitor_without_a_model_is_one_line_and_leaves_no_run(store_exists, arguments, expected, maas_home, capsys):
    if store_exists:
        mlflow_client().search_experiments()
        capsys.readouterr()
    exit_code = main(["monitor", *arguments])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_code == 2 and len(lines) == 1 and expected in lines[0], captured.err
    client = mlflow_client()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_new_home_answers_each_governance_command_in_a_line(maas_home, capsys):
    for arguments, expected in ((["usage"], "no requests metered yet"), (["audit"], "no audit entries yet"),
                                (["keys", "list"], "no keys yet: maas keys create NAME --tier TIER"),
                                (["bill", "--month", "2026-11"], "no invoices for 2026-11")):
        assert main(arguments) == 0
        assert capsys.readouterr().out.startswith(expected), arguments
    for arguments, expected in ((["promote", "maas-wine", "3"], "maas-wine/3: no MLflow store in"),
                                (["rollback", "maas-wine"], "maas-wine@champion: no MLflow store in"),
                                (["keys", "create", " ", "--tier", "pro"], "a key needs a name of 1 to 200 characters"),
                                (["bill", "--month", "2026-11", "--out", __file__], f"--out {__file__}: is a file, not a folder")):
        assert main(arguments) == 2
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and expected in captured.err, captured.err
    assert not (maas_home / "mlflow.db").exists()  # no empty store made only to say the model is not in it


def test_maas_run_digits_writes_the_summary_and_prints_no_error(tmp_path):
    """The user's path: a subprocess, Prefect's own temporary server, a clean log."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(MAAS_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONUNBUFFERED="1")
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the CLI must quiet telemetry by itself
    summary_path = tmp_path / "summaries" / "s.json"  # a folder not made yet: made, as the file is written
    done = subprocess.run(
        [sys.executable, "-m", "maas", "run", "--dataset", "digits", "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"),
         "--summary", str(summary_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "ERROR" not in output and "Traceback" not in output, output[-3000:]
    # progress as each stage starts and as tuning goes (the final fit prints epochs only where a
    # network is chosen: on digits the kernel SVM may win, and nothing then trains epoch by epoch)
    assert "tune: starting at" in output and "tuning: 1 trial(s)" in output and "compare: starting at" in output
    assert "Registered maas-digits version 1 as @champion: first version" in done.stdout
    summary = json.loads(summary_path.read_text())
    assert CONTRACT_KEYS <= set(summary)
    assert summary["experiment"] == "maas-digits" and summary["test_metrics"]["f1_macro"] > 0.85
    assert not (tmp_path / "mlruns").exists()  # artifacts stay under MAAS_HOME


def test_a_run_stopped_by_sigterm_stops_what_it_started_and_leaves_no_run_running(tmp_path, maas_home):
    """SIGTERM (a scheduler, a container stopping) mid-run: one line, exit 143, Prefect's temporary
    server and every other child gone, the MLflow run KILLED, not left RUNNING."""
    import signal
    import time

    import psutil

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(MAAS_HOME=str(maas_home), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONUNBUFFERED="1")
    run = subprocess.Popen([sys.executable, "-m", "maas", "run", "--dataset", "wine", "--set", "tuning.n_trials=50"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        for line in run.stdout:  # until the study runs: Prefect's server, the recorder and the MLflow run are up
            lines.append(line)
            if "tune: starting at" in line:
                break
        children = psutil.Process(run.pid).children(recursive=True)
        assert children, "".join(lines)
        run.send_signal(signal.SIGTERM)
        rest = run.communicate(timeout=120)[0]  # Python's default SIGTERM left it hanging here
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = "".join(lines) + rest
    assert run.returncode == 143, output[-3000:]
    assert "maas: terminated" in rest.splitlines() and "Traceback" not in output, output[-3000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [child.cmdline() for child in alive]
    client = mlflow_client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} <= {"KILLED", "FAILED", "FINISHED"}, [r.info.status for r in runs]
    assert any(r.info.status == "KILLED" for r in runs)


def test_maas_ui_shows_the_parent_run_and_the_registered_model(trained):
    home, _, summary = trained
    port = free_port()
    env = dict(os.environ, MAAS_HOME=str(home))
    server = subprocess.Popen([sys.executable, "-m", "maas", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/health", 90, server)
        api = f"{base}/ajax-api/2.0/mlflow"
        run = httpx.get(f"{api}/runs/get", params={"run_id": summary["mlflow_run_id"]}).json()["run"]
        params = {p["key"] for p in run["data"]["params"]}
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"train.lr", "data.fingerprint"} <= params and "test/f1_macro" in metrics
        png = httpx.get(f"{base}/get-artifact", params={"path": "evaluation/confusion_matrix.png", "run_uuid": summary["mlflow_run_id"]})
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        model = httpx.get(f"{api}/registered-models/get", params={"name": summary["model_name"]}).json()
        assert model["registered_model"]["aliases"][0]["alias"] == "champion"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_schedule_stopped_by_a_sigterm_to_its_process_group_exits_and_leaves_nothing(tmp_path):
    """systemd (KillMode=control-group) and `timeout` signal the whole process group: Prefect's
    temporary server died at once, and the runner, pausing its deployments through it, hung past 40 s.
    The server now runs in its own group and is stopped after the runner, or dies with us."""
    import re
    import signal
    import time

    import psutil

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(MAAS_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"))
    log = tmp_path / "schedule.log"
    with open(log, "w") as output:
        scheduler = subprocess.Popen([sys.executable, "-m", "maas", "schedule", "--dataset", "wine"], env=env,
                                     cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (api := re.search(r"Prefect API (\S+);", log.read_text())):
            assert time.monotonic() < deadline and scheduler.poll() is None, log.read_text()
            time.sleep(0.5)
        served = f"{api.group(1)}/deployments/name/maas-train/maas-wine-train"
        while httpx.get(served, timeout=5).status_code != 200:  # the runner has registered, and serves
            assert time.monotonic() < deadline and scheduler.poll() is None, log.read_text()
            time.sleep(0.5)
        time.sleep(2)
        started = [child.pid for child in psutil.Process(scheduler.pid).children(recursive=True)]
        assert started  # the temporary server
        os.killpg(scheduler.pid, signal.SIGTERM)
        scheduler.wait(timeout=30)
    finally:
        if scheduler.poll() is None:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
    text = log.read_text()
    assert "All deployments have been paused" in text and "Traceback" not in text, text[-2000:]
    time.sleep(1)
    assert not [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
