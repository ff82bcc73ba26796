"""Usage metering, the prediction log and the process gauges. A request's record is journaled (one
write) before it is answered; one background thread brings the journals into the service store
(maas/service_store.py), off the request path."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

import orjson

from maas.processes import process_owner
from maas.api_keys import key_grants
from maas.service_store import JOURNAL_SUFFIX, apply_journals, connect, meter_folder


class ProcessGauges:
    """CPU and memory of each worker process on /metrics (a series per pid), which BentoML's own
    metrics lack."""

    def __init__(self, registry):
        import psutil
        from prometheus_client import Gauge

        self.process = psutil.Process()
        self.process.cpu_percent()  # the first call starts the measuring interval
        self.cpu = Gauge("maas_process_cpu_percent", "CPU use of the serving process (100 = one core)",
                         multiprocess_mode="liveall", registry=registry)
        self.memory = Gauge("maas_process_resident_memory_bytes", "resident memory of the serving process",
                            multiprocess_mode="liveall", registry=registry)

    def update(self) -> None:
        self.cpu.set(self.process.cpu_percent())
        self.memory.set(self.process.memory_info().rss)


class MeterJournal:
    """This worker's append-only record of answered requests, under MAAS_HOME/run/meter.

    A record is written with one write(2) before the answer is sent, so an answered request is on
    disk even if the worker is SIGKILLed the next instant (the page cache outlives the process; the
    flush thread's fdatasync bounds what a power cut could take to one flush interval). A worker
    killed between the write and the answer has metered a request it did not answer: metered >=
    answered, never less. The file's name says whose it is (host~pid~process start~sequence), so
    any process can tell when its writer is gone and bring in what is left."""

    ROTATE_BYTES = 16 << 20

    def __init__(self, folder: Path):
        owner = process_owner()
        self.folder = folder
        self.prefix = f"{owner['maas.host']}~{owner['maas.pid']}~{owner['maas.process_started']}"
        self.lock = threading.Lock()
        self.sequence = 0
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path, self.fd = self._open()

    def _open(self) -> tuple[Path, int]:
        path = self.folder / f"{self.prefix}~{self.sequence:06d}{JOURNAL_SUFFIX}"
        return path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: bytes) -> None:
        with self.lock:
            os.write(self.fd, record)

    def sync_and_rotate(self) -> Path | None:
        """fdatasync; past ROTATE_BYTES, start a new file and return the finished one."""
        with self.lock:
            os.fdatasync(self.fd)
            if os.fstat(self.fd).st_size < self.ROTATE_BYTES:
                return None
            finished = self.path
            os.close(self.fd)
            self.sequence += 1
            self.path, self.fd = self._open()
            return finished


class LogBudget:
    """Rows of logged inputs per minute at most, in one worker: a token bucket that holds a minute's
    rows, so bursts and quiet services are logged whole, while under sustained load the log keeps
    about `rows_per_minute`. A request is logged whenever the bucket is above zero, whatever its
    size (the bucket may go below zero), so the sample is not biased towards small requests.

    Why a bound: every logged request is written twice (its journal line, then the store). At 80k
    rows/s of 64-row requests that was ~70 MB/s into SQLite and ~0.9 ms of CPU per request, three
    times the model's, and the store grew by a quarter of a terabyte an hour; drift and quality
    checks need thousands of rows a window, not every row."""

    def __init__(self, rows_per_minute: float | None, clock=time.monotonic):
        """rows_per_minute: None, no bound (every sampled request is logged)."""
        self.capacity, self.clock = rows_per_minute, clock
        self.level, self.at = rows_per_minute or 0, clock()

    def take(self, rows: int) -> bool:
        if self.capacity is None:
            return True
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60)
        self.at = now
        if self.level <= 0:
            return False
        self.level -= rows
        return True


class Meter:
    """Usage and the prediction log: each answered request journaled before its answer (MeterJournal),
    brought into the service store by one background thread every `flush_every_s`, which also
    reloads the keys (a revocation takes effect within a flush) and refreshes the gauges."""

    def __init__(self, sample: float, flush_every_s: float = 1.0, gauges: ProcessGauges | None = None,
                 redactor=None, log_rows_per_minute: int | None = None):
        """redactor: a maas.privacy.LogRedactor that logged request bodies pass through first.
        log_rows_per_minute: rows of inputs the prediction log takes a minute (LogBudget; None: no bound)."""
        self.sample, self.flush_every_s, self.gauges, self.redactor = sample, flush_every_s, gauges, redactor
        self.log_budget = LogBudget(log_rows_per_minute)
        self.connection = connect()
        self.journal = MeterJournal(meter_folder())
        self.keys = key_grants(self.connection)
        threading.Thread(target=self._run, name="maas-meter", daemon=True).start()

    def record(self, key_id: str, rows: int, status: int, model_label: str, request_id: str = "",
               request: bytes = b"", response: bytes = b"", caller_chose_id: bool = False) -> None:
        """One request about to be answered: its usage, and (for a sample of the successful ones) its
        log entry, its inputs under the privacy policies. Call it before sending the answer.
        caller_chose_id: the request id is the caller's X-Request-Id, so a retry is billed once."""
        record = {"k": key_id, "r": rows, "s": status, "t": time.time(), "m": model_label, "i": request_id}
        if caller_chose_id:
            record["c"] = 1
        if status < 400 and random.random() < self.sample and self.log_budget.take(rows):
            logged = self.redactor.body(request) if self.redactor is not None else request
            record["q"], record["a"] = logged.decode(), response.decode()
        self.journal.append(orjson.dumps(record) + b"\n")

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_every_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a locked or full store: the journal keeps it for the next flush
                logging.getLogger("maas").exception("metering flush failed; retrying in %s s", self.flush_every_s)

    def flush(self) -> None:
        self.journal.sync_and_rotate()  # a rotated-out journal of ours is applied and removed below
        apply_journals(self.connection, self.journal.folder, self.journal.path, self.journal.prefix)
        self.keys = key_grants(self.connection)  # revocations and expiries take effect within a flush interval
        if self.gauges is not None:
            self.gauges.update()
