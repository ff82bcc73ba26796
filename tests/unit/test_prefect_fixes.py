"""The patch to Prefect's flow engine (maas/prefect_fixes.py): a flow run does not wait for its
heartbeat thread. A failure of the first test means upstream changed and the patch is worth a look."""

from __future__ import annotations

import contextlib
import inspect

from maas.prefect_fixes import end_flow_runs_promptly


def shipped_send_heartbeats():
    from prefect import flow_engine

    return getattr(flow_engine._send_heartbeats, "_maas_original", flow_engine._send_heartbeats)


def test_prefect_still_joins_a_heartbeat_thread_that_sleeps_in_one_second_steps():
    source = inspect.getsource(shipped_send_heartbeats())
    assert "time.sleep(1)" in source and "thread.join(timeout=2)" in source


def test_flow_runs_no_longer_join_the_heartbeat_thread(monkeypatch):
    from prefect import flow_engine

    calls = []

    def spy(engine, join_on_exit=True):
        calls.append(join_on_exit)
        return contextlib.nullcontext()

    monkeypatch.setattr(flow_engine, "_send_heartbeats", spy)
    end_flow_runs_promptly()
    with flow_engine._send_heartbeats(object()):
        pass
    end_flow_runs_promptly()  # applying it twice changes nothing
    with flow_engine._send_heartbeats(object()):
        pass
    assert calls == [False, False]
