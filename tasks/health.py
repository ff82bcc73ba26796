"""Service health from its Prometheus `/metrics`: request rate, 5xx rate, p99 latency of /predict,
and the process's CPU and memory (the gauges deployments/service.py adds).

Counters only grow, so rates are differences between this scrape and the previous check's, which
the monitor keeps; a restarted service (counters went down) starts a fresh baseline.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.run_context import RunContext

if TYPE_CHECKING:
    from tasks.check import Check

PREDICT_ENDPOINT = "/predict"


def parse_counters(text: str) -> dict[str, Any]:
    """The figures the monitor needs from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0.0
    buckets: dict[str, float] = {}
    cpu = memory = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("request_total") and labels.get("endpoint") == PREDICT_ENDPOINT:
                requests += sample.value
                errors += sample.value if labels.get("http_response_code", "").startswith("5") else 0
            elif sample.name.endswith("request_duration_seconds_bucket") and labels.get("endpoint") == PREDICT_ENDPOINT:
                buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + sample.value
            elif sample.name == "maas_process_cpu_percent":  # one series per worker process: the service's sum
                cpu = (cpu or 0.0) + sample.value
            elif sample.name == "maas_process_resident_memory_bytes":
                memory = (memory or 0.0) + sample.value
    return {"at": time.time(), "requests": requests, "errors": errors, "buckets": buckets,
            "cpu_percent": cpu, "memory_bytes": memory}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    import httpx

    response = httpx.get(url, timeout=timeout_s)
    response.raise_for_status()
    return parse_counters(response.text)


def histogram_quantile(buckets: dict[str, float], quantile: float) -> float | None:
    """Upper bound of the bucket holding the quantile (cumulative counts keyed by 'le')."""
    ordered = sorted(((math.inf if le == "+Inf" else float(le)), count) for le, count in buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    needed = quantile * ordered[-1][1]
    for bound, count in ordered:
        if count >= needed:
            return bound if math.isfinite(bound) else ordered[-2][0] if len(ordered) > 1 else None
    return None


@dataclass(frozen=True)
class HealthReport:
    seconds: float  # the span the rates cover
    requests: float
    request_rate: float | None
    error_rate: float | None
    p99_ms: float | None
    cpu_percent: float | None
    memory_bytes: float | None
    alerts: dict[str, str]
    reachable: bool = True

    @classmethod
    def unreachable(cls, url: str, error: Exception) -> HealthReport:
        """A service that did not answer: a finding, not a crash of the check."""
        return cls(0.0, 0.0, None, None, None, None, None,
                   {"service_down": f"{url} did not answer: {error.__class__.__name__}"}, reachable=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def firing(self) -> dict[str, str]:
        return dict(self.alerts)

    def figures(self) -> dict[str, float]:
        figures = {"health/request_rate": self.request_rate, "health/error_rate": self.error_rate,
                   "health/p99_ms": self.p99_ms, "health/cpu_percent": self.cpu_percent,
                   "health/memory_bytes": self.memory_bytes}
        return {name: float(value) for name, value in figures.items() if value is not None}


def health_report(current: dict[str, Any], previous: dict[str, Any] | None, max_error_rate: float,
                  max_p99_ms: float) -> HealthReport:
    """Figures since the previous scrape; with none (or after a restart), since the service started,
    and then no request rate, for want of a start time."""
    restarted = previous is None or current["requests"] < previous["requests"]
    base = {"at": current["at"], "requests": 0.0, "errors": 0.0, "buckets": {}} if restarted else previous
    requests = current["requests"] - base["requests"]
    errors = current["errors"] - base["errors"]
    buckets = {le: count - base["buckets"].get(le, 0.0) for le, count in current["buckets"].items()}
    seconds = current["at"] - base["at"]
    p99 = histogram_quantile(buckets, 0.99)
    p99_ms = None if p99 is None else p99 * 1000
    error_rate = errors / requests if requests else None
    alerts = {}
    if error_rate is not None and error_rate > max_error_rate:
        alerts["error_rate"] = f"{error_rate:.1%} of {requests:.0f} requests answered 5xx (limit {max_error_rate:.1%})"
    if p99_ms is not None and p99_ms > max_p99_ms:
        alerts["latency"] = f"p99 latency {p99_ms:.0f} ms (limit {max_p99_ms:.0f} ms)"
    return HealthReport(seconds, requests, requests / seconds if seconds > 0 else None, error_rate, p99_ms,
                        current["cpu_percent"], current["memory_bytes"], alerts)


def check_health(check: Check) -> HealthReport | None:
    """Rates since the previous check from the service's /metrics (monitoring.metrics_url); the
    scrape is kept on the check, for the next check's rates."""
    monitoring = check.monitoring
    if not monitoring.metrics_url:
        return None
    try:
        check.counters = scrape(monitoring.metrics_url)
    except Exception as error:  # noqa: BLE001 - a service that is down is a finding, not a crash
        return HealthReport.unreachable(monitoring.metrics_url, error)
    return health_report(check.counters, check.previous_counters, monitoring.max_error_rate, monitoring.max_p99_ms)


def record_health(ctx: RunContext, health: HealthReport | None) -> None:
    if health is not None:
        ctx.record(metrics=health.figures())


@task(name="health", retries=0, cache_policy=NO_CACHE)
def health_task(check: Check) -> HealthReport | None:
    return check.ctx.run_stage("health", partial(check_health, check), record_health)
