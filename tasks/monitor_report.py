"""The monitoring check's report: one HTML page a person would rather look at than read JSON."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def _row(cells: list[Any], header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(cell))}</{tag}>" for cell in cells) + "</tr>"


def _figure(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _test_pvalue(feature: dict[str, Any]) -> float | None:
    """KS for a numeric feature, chi-square for a categorical one."""
    return feature["ks_pvalue"] if feature["ks_pvalue"] is not None else feature.get("chi2_pvalue")


def _time_moved_on(feature: dict[str, Any]) -> str:
    """A date column newer than training's (tasks/drift.py: time_moved_on): why it is not drifted."""
    if feature.get("after_training") is None:
        return ""
    return (f"no: time moved on, {feature['after_training']:.0%} dated after training's last date, "
            f"up to {feature['days_past_training']:.0f} days")


def render_html(summary: dict[str, Any], drift_png: Path | None) -> str:
    """Alerts first, then drift (chart and per-feature table), live quality and service health."""
    drift, quality, health = summary["drift"], summary.get("quality"), summary.get("health")
    parts = [
        "<!doctype html><meta charset='utf-8'><title>maas monitoring</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        ".alert{color:#b03a2e;font-weight:bold}</style>",
        f"<h1>{html.escape(summary['model'])}</h1>",
        f"<p>Check at {html.escape(summary['checked_at'])} over {drift['n_rows']} logged rows "
        f"since {html.escape(summary['window_start'])}.</p>",
    ]
    alerts = summary["alerts"]
    parts.append("<h2>Alerts</h2>" + ("".join(f"<p class='alert'>{html.escape(a['kind'])}: {html.escape(a['message'])}</p>"
                                              for a in alerts) or "<p>None new.</p>"))
    if summary.get("retrain"):
        parts.append(f"<p>Retraining: {html.escape(summary['retrain']['status'])}</p>")
    if summary.get("rollback"):
        parts.append(f"<p>Rollback check: {html.escape(summary['rollback']['reason'])}</p>")
    parts.append("<h2>Data drift</h2>")
    if not drift["judged"]:
        parts.append(f"<p>Not judged: {drift['n_rows']} rows, fewer than the minimum.</p>")
    parts.append(f"<p>{len(drift['drifted_features'])} of {len(drift['features'])} features drifted "
                 f"(share {drift['drift_share']:.2f}); PSI on {drift['n_bins']} bins; prediction PSI "
                 f"{_figure(drift['prediction_psi'], 3)}.</p>")
    if drift_png is not None and drift_png.is_file():
        encoded = base64.b64encode(drift_png.read_bytes()).decode()
        parts.append(f"<img alt='drift chart' style='max-width:100%' src='data:image/png;base64,{encoded}'>")
    table = [_row(["feature", "kind", "PSI", "KS or χ² p-value", "reference mean", "logged mean", "drifted"], header=True)]
    for feature in sorted(drift["features"], key=lambda item: item["psi"], reverse=True):
        table.append(_row([feature["name"], feature["kind"], _figure(feature["psi"], 3), _figure(_test_pvalue(feature), 4),
                           _figure(feature["reference_mean"], 3), _figure(feature["current_mean"], 3),
                           "yes" if feature["drifted"] else _time_moved_on(feature)]))
    parts.append("<table>" + "".join(table) + "</table>")
    parts.append("<h2>Live quality</h2>")
    if quality is None:
        parts.append("<p>No ground truth configured (monitoring.labels_path).</p>")
    else:
        rows = [_row(["metric", "live", "test"], header=True)] + [
            _row([name, _figure(value), _figure(quality["test_metrics"].get(name))]) for name, value in quality["metrics"].items()
        ]
        parts.append(f"<p>{quality['n_labelled']} labelled rows served by v{quality['version']}.</p>"
                     "<table>" + "".join(rows) + "</table>")
    parts.append("<h2>Service health</h2>")
    if health is None:
        parts.append("<p>Not scraped (monitoring.metrics_url unset or unreachable).</p>")
    else:
        rows = [_row(["figure", "value"], header=True)] + [
            _row([name, "-" if value is None else f"{value:,.3f}"]) for name, value in health.items()
            if name not in ("alerts", "reachable")
        ]
        parts.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(parts)
