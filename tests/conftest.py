"""Shared fixtures: isolated state folders, one Prefect test server per session, small budgets."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from maas.config import RunConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROCESSES_BEFORE = pytest.StashKey[frozenset]()
# Python's own helpers that read a pipe from this process and exit when it does.
EXITS_WITH_US = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "joblib.externals.loky")
# Inherited by everything the tests start: how an orphan (re-parented to init) is known as ours, and
# not some other process of this environment's Python (a benchmark running beside the tests).
SESSION_MARK = "MAAS_TEST_SESSION"


def pytest_configure(config):
    os.environ[SESSION_MARK] = str(os.getpid())
    # The Prefect server's telemetry logs an ERROR when offline; tests run offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # BentoML reads its home once, at import: one throwaway store for the whole session.
    import tempfile

    os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="maas-bentoml-"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # The text encoder is exported once per session, not once per test's MAAS_HOME (about 10 s each).
    os.environ.setdefault("MAAS_ENCODERS", tempfile.mkdtemp(prefix="maas-encoders-"))


def pytest_sessionstart(session):
    import psutil

    session.config.stash[PROCESSES_BEFORE] = frozenset(psutil.pids())


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a test left a process or a listening port behind (servers, their workers)."""
    stop_temporary_prefect_servers()
    before = session.config.stash.get(PROCESSES_BEFORE, None)
    if before is None:
        return
    leftovers = processes_left_behind(before)
    deadline = time.monotonic() + 20  # a server being stopped may take a few seconds to go
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = processes_left_behind(before)
    if not leftovers:
        return
    import psutil

    lines = []
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            ports = sorted({c.laddr.port for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN})
            lines.append(f"  PID {process.pid}{f' listening on {ports}' if ports else ''}: "
                         f"{' '.join(process.cmdline())[:160]}")
        with contextlib.suppress(psutil.Error):
            process.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", f"tests left {len(leftovers)} process(es) running (now killed)", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def stop_temporary_prefect_servers() -> None:
    """The temporary servers flows started without a server URL, stopped now: Prefect stops them at
    exit, when its log line goes to pytest's closed capture file ('--- Logging error ---' and a
    traceback after the summary). Its instances table is private: if it moves, exit stops them."""
    server_module = sys.modules.get("prefect.server.api.server")
    for server in list(getattr(getattr(server_module, "SubprocessASGIServer", None), "_instances", {}).values()):
        server.stop()


def processes_left_behind(before: frozenset) -> list:
    """Live processes started during the session (not among `before`; psutil's start times are
    rounded to the boot time's second, too coarse to compare) that are ours: descendants of this pytest process,
    or orphans of them (re-parented to init) carrying this session's mark in their environment."""
    import psutil

    me = psutil.Process()
    ours = {child.pid for child in me.children(recursive=True)}
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        info = process.info
        if info["pid"] == me.pid or info["pid"] in before or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        command = " ".join(info["cmdline"] or [])
        if any(helper in command for helper in EXITS_WITH_US):
            continue
        if info["pid"] in ours or (sys.prefix in command and started_by_this_session(process)):
            found.append(process)
    return found


def started_by_this_session(process) -> bool:
    import psutil

    try:
        return process.environ().get(SESSION_MARK) == str(os.getpid())
    except psutil.Error:
        return False


@pytest.fixture
def maas_home(tmp_path, monkeypatch) -> Path:
    """A fresh MAAS_HOME (MLflow store and artifacts) for one test."""
    home = tmp_path / "maas-home"
    monkeypatch.setenv("MAAS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MAAS_STORE_URL", raising=False)  # the embedded store, unless a test shares one
    return home


@contextlib.contextmanager
def module_home(tmp_path_factory):
    """A fresh MAAS_HOME for a module-scoped fixture (the function-scoped `maas_home` cannot serve one)."""
    home = tmp_path_factory.mktemp("maas-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAAS_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server and database, started once for the whole session."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield get_current_settings().api.url


POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_database():
    """A fresh PostgreSQL database on the machine's server as a SQLAlchemy URL, dropped afterwards;
    skips where no server answers (team tests)."""
    import uuid

    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=2)
    except psycopg.Error:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (team tests need it)")
    name = f"maas_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def quick_config(dataset: str = "breast_cancer", *overrides: str) -> RunConfig:
    """The shipped quick preset: the whole pipeline in seconds. The network family only, unless the
    overrides say otherwise: most tests are about the network's stages (compression, int8, the
    gate between weak and strong networks); tests/unit/test_families.py and the CLI's runs of the
    preset itself compare the families."""
    return load_config(PROJECT_ROOT / "configs" / "quick.yaml", dataset=dataset,
                       overrides=["model.families=[network]", *overrides])


def flow_run_artifacts(flow_run_id: str) -> dict:
    """key -> the Prefect artifact a flow run made, read through Prefect's own client."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


def interruptible() -> None:
    """A child's Ctrl-C as in a terminal (Popen's preexec_fn): a runner that started the tests in the
    background (`nohup ... &`) hands its children SIGINT ignored, and a test's SIGINT then never
    reached `maas schedule`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, timeout_s: float, process=None) -> float:
    """Poll url until it answers 200; returns the seconds it took. Fails the test on timeout."""
    import time

    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


def _answer_at_once(call, barrier, answers) -> None:
    barrier.wait()
    try:
        answers.put(call())
    except Exception as error:  # noqa: BLE001 - the opener's failure is the answer the test reads
        answers.put(f"{type(error).__name__}: {error}")


def at_once(call, processes: int = 4) -> list:
    """`call()` in `processes` forked processes released together (a barrier): what each returned, or
    its exception as text. For races on first use of a shared file, as runs started together meet."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, answers = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_answer_at_once, args=(call, barrier, answers)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return [answers.get(timeout=5) for _ in workers]
