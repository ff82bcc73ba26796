"""Servers started by maas stop with it: signals reach the whole process group, the server gets a
parent-death signal, and a busy port is named with the process holding it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from maas.errors import MaasInputError
from maas.processes import refuse_busy_port

# A "server" that starts a worker of its own and prints both PIDs; neither handles any signal.
SERVER = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def start_supervised(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    """`supervise` in a process of its own, running SERVER; returns it and [server, worker] PIDs."""
    script = tmp_path / "supervisor.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from maas.processes import supervise
        sys.exit(supervise([sys.executable, "-c", {SERVER!r}], {{}}, grace_s=5))
    """))
    supervisor = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": os.getcwd()})
    worker = int(supervisor.stdout.readline())
    server = psutil.Process(worker).ppid()
    return supervisor, [server, worker]


def gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_supervisor_stops_the_server_and_its_workers(tmp_path):
    supervisor, pids = start_supervised(tmp_path)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=15) == 0
    assert gone(pids)


def test_sigkill_of_the_supervisor_takes_the_server_with_it(tmp_path):
    supervisor, (server, worker) = start_supervised(tmp_path)
    supervisor.kill()
    supervisor.wait()
    try:
        assert gone([server])  # the kernel's parent-death signal; the worker's own is the service's job
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(worker).kill()


def test_a_busy_port_is_refused_in_one_line_naming_the_process_holding_it():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(MaasInputError) as refused:
            refuse_busy_port("127.0.0.1", port)
    message = str(refused.value)
    assert f"port {port} on 127.0.0.1 is in use by PID {os.getpid()}" in message and "\n" not in message
    refuse_busy_port("127.0.0.1", port)  # free again


def test_an_owner_that_exited_unreaped_is_gone_and_a_live_one_is_not():
    """A killed worker its parent has not yet waited for is a zombie: its PID still answers, but no
    trial of it will ever finish (a run once waited on such a trial for good)."""
    from maas.processes import owner_is_gone

    def tags_of(process: subprocess.Popen) -> dict[str, str]:
        return {"maas.host": socket.gethostname(), "maas.pid": str(process.pid),
                "maas.process_started": f"{psutil.Process(process.pid).create_time():.2f}"}

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tags = tags_of(child)
        assert owner_is_gone(tags) is None
        child.kill()
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner_is_gone(tags) == f"process {child.pid} has exited"
    finally:
        child.kill()
        child.wait()
    assert owner_is_gone(tags) == f"process {child.pid} is gone"
