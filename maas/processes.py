"""Child processes that cannot outlive whoever started them.

`maas serve` and `maas ui` start servers that start workers of their own (BentoML's arbiter and its
service processes; MLflow's uvicorn workers and job consumers). A plain `subprocess.call` left all of
them running when `maas serve` was killed, still answering with the old model, and a SIGTERM to
`maas ui` (what a test or systemd sends) killed only the Python process in front. So the server runs
in its own process group, signals reach the whole group, and the child gets a parent-death signal.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from maas.errors import MaasInputError

PR_SET_PDEATHSIG = 1
OWNER_TAGS = ("maas.host", "maas.pid", "maas.process_started")  # on runs and trials: who is running them
PREFECT_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}  # flow run states with no process behind


def die_with_parent(parent_pid: int, signal_number: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `signal_number` to this process when its parent dies (prctl
    PR_SET_PDEATHSIG); exit at once if the parent is already gone. Elsewhere, nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal_number)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the call took effect
        os._exit(0)


def process_owner() -> dict[str, str]:
    """This process, as the tags that let a later run tell whether it is still alive."""
    import psutil

    me = psutil.Process()
    return {"maas.host": socket.gethostname(), "maas.pid": str(me.pid),
            "maas.process_started": f"{me.create_time():.2f}"}


def owner_is_gone(tags: dict[str, str], prefect_state: str | None = None) -> str | None:
    """Why the process that owns these tags is gone, or None when it may be alive (or we cannot tell)."""
    if not all(key in tags for key in OWNER_TAGS):
        return None
    if tags["maas.host"] != socket.gethostname():
        if prefect_state in PREFECT_FINAL:
            return f"its Prefect flow run (on {tags['maas.host']}) is {prefect_state}"
        return None
    import psutil

    pid, started = int(tags["maas.pid"]), float(tags["maas.process_started"])
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) >= 0.5:
            return f"process {pid} is gone (the PID now belongs to another program)"
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent: its PID still answers
            return f"process {pid} has exited"
        return None
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.AccessDenied:
        return None



def refuse_busy_port(host: str, port: int) -> None:
    """One line naming the process that holds host:port, instead of the server's traceback
    (`OSError: [Errno 98] Address already in use`) after seconds of start-up."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise MaasInputError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    raise MaasInputError(f"port {port} on {host} is in use by {port_holder(port)}; stop it or pass --port")


def port_holder(port: int) -> str:
    """'PID 123 (bentoml serve ...)' for the process listening on port, as far as we may see it."""
    import psutil

    try:
        for connection in psutil.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
                try:
                    command = " ".join(psutil.Process(connection.pid).cmdline())[:120]
                except psutil.Error:
                    command = "?"
                return f"PID {connection.pid} ({command})"
    except psutil.AccessDenied:
        pass
    return "another process (its PID is not visible to this user)"


def in_own_group_dying_with_us(popen: Callable[..., subprocess.Popen]) -> Callable[..., subprocess.Popen]:
    """`subprocess.Popen`, but the child runs in its own process group and gets SIGTERM when this
    process dies: for a server this process stops itself when it is done (a signal to our group, as
    systemd or `timeout` send, no longer reaches it first)."""
    parent = os.getpid()

    def start(*args, **kwargs) -> subprocess.Popen:
        return popen(*args, preexec_fn=lambda: _new_group_dying_with(parent), **kwargs)

    return start


def _new_group_dying_with(parent_pid: int) -> None:
    os.setsid()  # its own process group, so a signal reaches the server's workers too
    die_with_parent(parent_pid, signal.SIGTERM)  # SIGTERM: the server stops its own workers


def supervise(command: list[str], env: dict[str, str], cwd: str | None = None, grace_s: float = 30.0,
              on_tick: Callable[[], None] | None = None) -> int:
    """Run a server until it exits or we are told to stop; its exit code (0 when stopped by us).

    SIGINT and SIGTERM are passed to the server's whole process group; whatever of the group is
    still there `grace_s` later, or when the server itself exits, is killed. If this process is
    SIGKILLed, the kernel sends the server SIGTERM and the server's own workers die with it (see
    deployments/service.py). `on_tick` runs about every half second while the server runs."""
    child = in_own_group_dying_with_us(subprocess.Popen)(command, env=env, cwd=cwd)
    stopping: list[int] = []

    def forward(signal_number, _frame):
        stopping.append(signal_number)
        _signal_group(child.pid, signal_number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    deadline = None
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if on_tick is not None and not stopping:
                    on_tick()
                if stopping and deadline is None:
                    deadline = time.monotonic() + grace_s
                if deadline is not None and time.monotonic() > deadline:
                    _signal_group(child.pid, signal.SIGKILL)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _signal_group(child.pid, signal.SIGKILL)  # workers the server left behind
    return 0 if stopping else code


def _signal_group(group: int, signal_number: int) -> None:
    try:
        os.killpg(group, signal_number)
    except (ProcessLookupError, PermissionError):
        pass
