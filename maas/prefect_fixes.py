"""A fix to how Prefect 3.9 ends a flow run, measured: every flow run took ~1 s longer than its work.

Carried here until upstream changes; check it when Prefect is upgraded (tests/unit/test_prefect_fixes.py
fails on the unpatched engine).
"""

from __future__ import annotations


def end_flow_runs_promptly() -> None:
    """Prefect 3.9's flow-run heartbeat thread sleeps in 1 s steps and checks its stop flag between
    them; the engine joins it (up to 2 s) when the run ends, so a flow run waited ~1 s for a thread
    with nothing left to do (a bare flow: 1.2 s -> 0.2 s here). The thread is a daemon and stops by
    itself at its next step without sending anything, so the run no longer waits for it. (Prefect's
    own test suite turned heartbeats off when their new 180 s default doubled its run time.)"""
    from prefect import flow_engine

    if getattr(flow_engine._send_heartbeats, "_maas_no_join", False):
        return
    original = flow_engine._send_heartbeats

    def send_heartbeats(engine, join_on_exit: bool = True):
        return original(engine, join_on_exit=False)

    send_heartbeats._maas_no_join = True
    send_heartbeats._maas_original = original
    flow_engine._send_heartbeats = send_heartbeats
