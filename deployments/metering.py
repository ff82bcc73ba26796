"""Usage metering, the prediction log and the process gauges: written by one background thread,
off the request path, to the service store (maas/service_store.py)."""

from __future__ import annotations

import queue
import random
import threading
import time

from maas.service_store import active_keys, connect, current_month, log_predictions, record_usage


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


class Meter:
    """Usage and prediction-log writes, queued and flushed by one background thread every
    `flush_every_s`; it also reloads the keys (a revocation takes effect within a flush) and
    refreshes the gauges."""

    def __init__(self, sample: float, flush_every_s: float = 1.0, gauges: ProcessGauges | None = None):
        self.sample, self.flush_every_s, self.gauges = sample, flush_every_s, gauges
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.connection = connect()
        self.keys = active_keys(self.connection)
        threading.Thread(target=self._run, name="maas-meter", daemon=True).start()

    def record(self, key_id: str, rows: int, status: int, model_label: str, request_id: str = "",
               request: bytes = b"", response: bytes = b"") -> None:
        """One answered request: its usage, and (for a sample of the successful ones) its log entry."""
        logged = status < 400 and random.random() < self.sample
        self.pending.put((key_id, rows, status, request_id, request if logged else None, response if logged else None,
                          model_label))

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_every_s)
            self.flush()

    def flush(self) -> None:
        counts: dict[str, list[int]] = {}
        entries = []
        now = time.time()
        while True:
            try:
                key_id, rows, status, request_id, request, response, model_label = self.pending.get_nowait()
            except queue.Empty:
                break
            total = counts.setdefault(key_id, [0, 0, 0])
            total[0] += 1
            total[1] += rows if status < 400 else 0
            total[2] += status >= 400
            if request is not None:
                entries.append((request_id, now, key_id, model_label, status, request.decode(), response.decode()))
        if counts:
            record_usage(self.connection, current_month(now), {k: tuple(v) for k, v in counts.items()})
        if entries:
            log_predictions(self.connection, entries)
        self.keys = active_keys(self.connection)  # revocations take effect within a flush interval
        if self.gauges is not None:
            self.gauges.update()
