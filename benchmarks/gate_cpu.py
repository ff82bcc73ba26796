"""The event-loop CPU of one /predict request in the service's own code, in-process, by feature.

`benchmarks/serving.py` measures the served share, but its rounds drift by +-0.03 with the
machine, more than most of what one change to the gate saves. Here the gate runs as an ASGI app
in one process, behind PredictFirst (BentoML's metrics in multiprocess mode, its log set-up with
the access lines written to a file), the model answering at once, 32 requests at a time, each one
text of the built-in sentiment set with an API key of a tier. What is timed is the main thread's
CPU (time.thread_time) per request: the gate, the access line, metering, metrics; not HTTP and not
the model. Variants, in alternating rounds: the default, the access log off, keys off (no key, no
tier limits), and both off.

Usage: python benchmarks/gate_cpu.py [--requests 10000] [--rounds 5]
Writes benchmarks/results/gate_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging.config
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine, measured_on, now, write_results

VARIANTS = {"default": {}, "access_log=false": {"access_log": False}, "auth=false": {"auth": False},
            "both off": {"access_log": False, "auth": False}}
CONCURRENCY = 32


def gate_of(bundle_dir: Path, changed: dict):
    from prometheus_client import CollectorRegistry

    from deployments.gate import ServedModel, ServedModels, ServiceGate
    from deployments.predict_first import PredictFirst
    from maas.bundle import ModelBundle
    from maas.config import ServingConfig
    from serving import UNLIMITED_TIER

    serving = ServingConfig(tiers=UNLIMITED_TIER, **changed)
    gate = ServiceGate(None, ServedModels(ServedModel(ModelBundle.load(bundle_dir, 1), "bench/1")), serving,
                       CollectorRegistry())
    at_once = AtOnce([{"label": "x", "probabilities": {"x": 1.0}}])
    gate.answering = dataclasses.replace(gate.answering, default_batcher=at_once, batchers={})
    return PredictFirst(None, lambda: gate, 60, 10**6, "bench")


class AtOnce:
    """The batcher's place: every request answered at once (one turn of the loop), as if the model
    took no time, so what is timed is the service's own work."""

    def __init__(self, answer: list[dict]):
        self.answer = answer

    async def answers(self, columns) -> list[dict]:
        await asyncio.sleep(0)
        return self.answer


def cpu_ms_per_request(front, body: bytes, key: str, requests: int) -> float:
    scope = {"type": "http", "method": "POST", "path": "/predict", "scheme": "http", "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"x-api-key", key.encode()),
                         (b"content-length", str(len(body)).encode())]}
    statuses = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def client(count: int):
        for _ in range(count):
            await front(scope, receive, send)

    async def load(total: int):
        await asyncio.gather(*(client(total // CONCURRENCY) for _ in range(CONCURRENCY)))

    asyncio.run(load(CONCURRENCY * 20))  # warm: the key's slot, the metrics' children
    statuses.clear()
    started = time.thread_time()
    asyncio.run(load(requests))
    spent = time.thread_time() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"the gate answered {sorted(set(statuses))}")
    return spent * 1000 / len(statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gate-cpu-"))
    os.environ.update(MAAS_HOME=str(home), PROMETHEUS_MULTIPROC_DIR=str(home / "prometheus"))
    (home / "prometheus").mkdir()
    from serving import train_text_bundle  # noqa: E402 - after the environment: prometheus reads it on import

    from bentoml._internal.log import SERVER_LOGGING_CONFIG
    from maas.api_keys import create_key
    from maas.service_store import connect

    bundle_dir, rows, _ = train_text_bundle(home, "frozen", [])
    body = json.dumps({"rows": rows[:1]}).encode()
    _, key = create_key(connect(), "bench", "pro")
    console, sys.stdout = sys.stdout, open(home / "access.log", "w")  # BentoML's handler writes to sys.stdout
    try:
        logging.config.dictConfig(SERVER_LOGGING_CONFIG)
    finally:
        sys.stdout = console
    fronts = {name: gate_of(bundle_dir, changed) for name, changed in VARIANTS.items()}
    measured = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name, front in fronts.items():
            measured[name].append(cpu_ms_per_request(front, body, key, args.requests))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.4f}" for name, values in measured.items()),
              flush=True)
    report = {"measured_at": now(), "machine": machine(), "requests": args.requests, "rounds": args.rounds,
              "ms_per_request": measured}
    write_results("gate_cpu", report, render)
    logging.disable(logging.CRITICAL)  # the gates' meter threads run until exit: a flush into the
    # removed store says nothing
    shutil.rmtree(home, ignore_errors=True)


def render(report: dict) -> str:
    measured = report["ms_per_request"]
    default = statistics.median(measured["default"])
    lines = ["# The gate's event-loop CPU per request, in-process", "", measured_on(report), "",
             f"One text of the sentiment set per request, {CONCURRENCY} at a time, the model answering at once; "
             f"main-thread CPU per request, median of {report['rounds']} alternating rounds of "
             f"{report['requests']:,} requests.", "",
             "| variant | ms per request | vs default | rounds |", "|---|---|---|---|"]
    for name, values in measured.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.4f} | {median / default:.2f} | "
                     f"{', '.join(f'{value:.4f}' for value in values)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
