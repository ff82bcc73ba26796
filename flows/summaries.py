"""What a flow run tells its caller: one dataclass per flow, its JSON (the CLI contract) and its text."""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from maas.config import RunConfig
from maas.run_context import RunContext
from tasks.alerts import AlertOutcome
from tasks.decision import describe
from maas.service_store import iso
from tasks.drift import DriftReport
from tasks.health import HealthReport
from tasks.quality import QualityReport, RollbackDecision
from tasks.registry import RegisteredVersion, Winner
from tasks.retrain import RetrainRequest
from tasks.tune import TuningResult

# The keys `maas run --summary` promises (DESIGN.md's CLI contract); to_dict() writes more.
CONTRACT_KEYS = frozenset({"mlflow_run_id", "experiment", "model_name", "model_version", "alias", "test_metrics",
                           "variants", "bento"})


def render_leaderboard(rows: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """The families as `maas run` prints them, best first."""
    tuned = any(row.get("decision") for row in rows)  # a rare class: a tuned decision rule
    lines = [f"  {'family':<8}{'CV macro F1':>20}{'folds':>7}{'fit s':>8}{'bytes':>10}{'ms @64':>9}"
             + ("  decision" if tuned else "")]
    for row in rows:
        lines.append(f"{'*' if row['selected'] else ' '} {row['family']:<8}"
                     f"{row['cv_f1_macro_mean']:>12.4f} ± {row['cv_f1_macro_sd']:.4f}{row['folds']:>7}"
                     f"{row['fit_s']:>8.2f}{row['size_bytes']:>10}{row['p50_ms_b64']:>9.3f}"
                     + (f"  {describe(row.get('decision'), labels)}" if tuned else ""))
    if tuned:
        lines.append("  decision: how probabilities become the label, tuned by cross-validation where it raised "
                     "macro F1 (argmax: the likelier class)")
    return "\n".join(lines)


@dataclass(frozen=True)
class TrainSummary:
    """One training run: where it is recorded, what was registered, how the winner was chosen."""

    config: RunConfig
    mlflow_run_id: str
    mlflow_run_url: str
    prefect_flow_run_id: str | None
    registered: RegisteredVersion
    winner: Winner
    tuning: TuningResult | None
    bento: str | None
    budget: dict[str, Any]  # the run's time budget: what each stage was allotted and what it cut
    stage_seconds: dict[str, float]  # each stage's own compute
    record_seconds: dict[str, float]  # writing each stage's result to MLflow and Prefect

    @classmethod
    def of(cls, config: RunConfig, ctx: RunContext, registered: RegisteredVersion, winner: Winner,
           tuning: TuningResult | None, bento: str | None) -> TrainSummary:
        return cls(config, ctx.run_id, ctx.url, ctx.flow_run_id, registered, winner, tuning, bento,
                   ctx.budget.report(), ctx.timer.compute, ctx.timer.record)  # the same dicts: the wait for the recorder lands after

    def final_network_val_f1(self) -> float | None:
        """Validation macro F1 of the network trained on every training row with the chosen settings
        (the fp32 variant), beside which the best trial's figure on its sample can be read; None when
        a scikit-learn family was chosen (it is fitted on train + validation, so no fair figure)."""
        comparison = self.winner.comparison
        if self.tuning is None or (comparison is not None and not comparison.is_network):
            return None
        return next((row.f1_macro for row in self.winner.table.rows if row.name == "fp32"), None)

    def sample_line(self) -> list[str]:
        """One line when the trials saw a sample: how their best figure compares with the full training."""
        final = self.final_network_val_f1()
        if final is None or self.tuning.trial_rows >= self.tuning.training_rows:
            return []
        return [f"Tuning: best trial val F1 {self.tuning.best_values[0]:.4f} training on {self.tuning.trial_rows:,} sampled rows; "
                f"the network on all {self.tuning.training_rows:,}: {final:.4f} ({(final - self.tuning.best_values[0]) * 100:+.2f} points)"]

    def to_dict(self) -> dict[str, Any]:
        """The `--summary` JSON of the CLI contract (DESIGN.md)."""
        registered, gate, tuning = self.registered, self.registered.gate, self.tuning
        comparison = self.winner.comparison
        return {
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_run_url": self.mlflow_run_url,
            "prefect_flow_run_id": self.prefect_flow_run_id,
            "experiment": self.config.experiment_name,
            "model_name": registered.name,
            "model_version": registered.version,
            "alias": registered.alias,
            "model_uri": registered.ref.uri,
            "test_metrics": registered.test_metrics,
            "selected_variant": self.winner.selection.variant,
            "selection_reason": self.winner.selection.reason,
            "gate": {"promoted": gate.promoted, "reason": gate.reason, "metric": gate.metric, "new_score": gate.new_score,
                     "champion_version": gate.champion_version, "champion_score": gate.champion_score},
            "variants": [row.summary() for row in self.winner.table.rows],
            "family": comparison.chosen.family if comparison else None,
            "family_selection": comparison.reason if comparison else None,
            "decision": comparison.chosen.decision if comparison else None,  # None: the likelier class (argmax)
            "leaderboard": comparison.leaderboard() if comparison else [],
            "bento": self.bento,
            "tuning": None if tuning is None else {
                "study": tuning.study_name, "n_complete": tuning.n_complete, "n_pruned": tuning.n_pruned,
                "n_failed": tuning.n_failed, "epochs_total": tuning.epochs_total, "best_trial": tuning.best_trial,
                "best_val_f1_macro": tuning.best_values[0], "best_params": tuning.best_params,
                "baseline_val_f1_macro": tuning.baseline_value, "used_tuned": tuning.use_tuned,
                "decision": tuning.decision, "trial_rows": tuning.trial_rows, "training_rows": tuning.training_rows,
                "final_val_f1_macro": self.final_network_val_f1(), "pareto_front": tuning.pareto_front if len(tuning.objectives) > 1 else [],
            },
            "budget": self.budget,
            "stage_seconds": self.stage_seconds,
            "record_seconds": self.record_seconds,
        }

    def outcome(self) -> str:
        """The variant table, the selection and the gate's verdict: what happened, in a few lines."""
        registered, comparison = self.registered, self.winner.comparison
        families = [] if comparison is None else [render_leaderboard(comparison.leaderboard(), comparison.labels), "",
                                                   f"Family: {comparison.reason}", ""]
        return "\n".join([
            *families,
            self.winner.table.render(), "",
            *self.sample_line(),
            f"Selected {self.winner.selection.reason}",
            f"Registered {registered.name} version {registered.version} as @{registered.alias}: {registered.gate.reason}",
            *[f"{self.budget_label()}: {stage} {what}" for stage, what in self.budget["cut"].items()],
        ])

    def budget_label(self) -> str:
        """A cut comes from the run's budget, or with no budget from a stage's own limit (a family's
        selection.time_budget_s): the unbounded run crashed here formatting a missing budget."""
        time_s = self.budget["time_s"]
        return "Time limits (no run budget)" if time_s is None else f"Budget ({time_s:.0f} s)"

    def render(self) -> str:
        """What `maas run` prints: the outcome, the test figures, and where to look next."""
        registered, chosen = self.registered, self.winner.table[self.winner.selection.variant]
        return "\n".join([
            "", self.outcome(),
            "  test   " + "  ".join(f"{name} {value:.4f}" for name, value in registered.test_metrics.items()),
            f"  model  {chosen.size_bytes / 1024:.0f} KiB ONNX"
            + (f" + {chosen.encoder_bytes / 2**20:.1f} MiB text encoder" if chosen.encoder_bytes else "")
            + f", {chosen.p50_ms_b1_e2e:.2f} ms per raw row (p50, CPU)",
            f"  MLflow run {self.mlflow_run_id} in experiment '{self.config.experiment_name}'",
            f"         {self.mlflow_run_url}   (start the UI with: maas ui)",
            f"  load   mlflow.pyfunc.load_model(\"{registered.ref.uri}\")",
            *next_commands(registered.name, registered.alias, self.config.registry.champion_alias, self.bento,
                           os.environ.get("BENTOML_HOME")),
        ])


def next_commands(model: str, alias: str, champion_alias: str, bento: str | None, bentoml_home: str | None) -> list[str]:
    """The serve and watch commands `maas run` prints, quoted to paste into a shell: a file named
    'My data (2024).csv' names its model with spaces and parentheses."""
    lines = [f"  serve  maas serve --model {shlex.quote(f'{model}@{alias}')}"]
    if bento:
        lines.append(f"         or BENTOML_HOME={shlex.quote(bentoml_home) if bentoml_home else '~/bentoml'} "
                     f"bentoml serve {bento}")
    lines.append(f"  watch  maas monitor --set {shlex.quote(f'monitoring.model={model}@{champion_alias}')}"
                 "   (on a schedule: maas schedule)")
    return lines


@dataclass(frozen=True)
class CheckSummary:
    """One monitoring check: the model, the window, each finding, the alerts and the retrain."""

    model: str  # NAME/VERSION@ALIAS
    checked_at: float
    window_start: float
    prefect_flow_run_id: str | None
    mlflow_run_id: str
    mlflow_run_url: str
    drift: DriftReport
    quality: QualityReport | None
    rollback: RollbackDecision | None
    health: HealthReport | None
    alerts: AlertOutcome
    retrain: RetrainRequest | None

    def to_dict(self) -> dict[str, Any]:
        """`maas monitor --summary` JSON."""
        return {
            "model": self.model, "checked_at": iso(self.checked_at), "window_start": iso(self.window_start),
            "prefect_flow_run_id": self.prefect_flow_run_id,
            "mlflow_run_id": self.mlflow_run_id, "mlflow_run_url": self.mlflow_run_url,
            "drift": self.drift.to_dict(),
            "quality": None if self.quality is None else self.quality.to_dict(),
            "rollback": None if self.rollback is None else asdict(self.rollback),
            "health": None if self.health is None else self.health.to_dict(),
            "alerts": [asdict(alert) for alert in self.alerts.new], "alerts_delivered": self.alerts.delivered,
            "open_incidents": sorted(self.alerts.firing),
            "retrain": None if self.retrain is None else asdict(self.retrain),
        }

    def render(self) -> str:
        """What `maas monitor` prints, and the Prefect monitoring-report artifact."""
        drift = self.drift
        since = "(first check)" if self.window_start == 0 else f"since {iso(self.window_start)}"
        lines = [f"Checked {self.model}: {drift.n_rows} logged rows {since}",
                 f"  drift    {len(drift.drifted_features)} of {len(drift.features)} features drifted"
                 + ("" if drift.judged else " (too few rows to judge)")
                 + (f": {', '.join(drift.drifted_features[:6])}" if drift.drifted_features else "")]
        unseen = ["{}: {}".format(feature.name, ", ".join(f"'{value[:30]}' {share:.1%}" for value, share in feature.unseen.items()))
                  for feature in drift.features if feature.unseen]
        moved_on = [feature.time_note() for feature in drift.features if feature.time_moved_on]
        if moved_on:  # a date that only says the model serves past its training period: not drift
            lines.append(f"  time     {'; '.join(moved_on[:3])}: time moved on, not counted as drift "
                         "(monitoring.drift.judge_recent_dates counts it)")
        if unseen:  # values training never had, read as an unknown category: a typo, a new product, a renamed code
            lines.append(f"  unseen   {'; '.join(unseen[:4])}{' ...' if len(unseen) > 4 else ''}")
        if drift.private:  # else "1 of 1 features" leaves a reader asking where the others went
            lines.append(f"  private  {', '.join(drift.private[:6])}{' ...' if len(drift.private) > 6 else ''}: "
                         "not measured, the log keeps them hashed, masked or not at all (serving.privacy)")
        if self.quality is not None:
            quality = self.quality
            bound = "" if quality.f1_upper is None else f"; live's {quality.confidence:.0%} upper bound {quality.f1_upper:.4f}"
            lines.append(f"  quality  live F1 {quality.metrics['f1_macro']:.4f} on {quality.n_labelled} labelled rows "
                         f"(test {quality.test_metrics.get('f1_macro', float('nan')):.4f}{bound})" if quality.n_labelled
                         else "  quality  no labelled rows yet")
        if self.health is not None:
            health = self.health
            p99 = "-" if health.p99_ms is None else f"{health.p99_ms:.0f} ms"
            errors = "-" if health.error_rate is None else f"{health.error_rate:.2%}"
            lines.append(f"  health   {health.requests:.0f} requests, 5xx {errors}, p99 {p99}" if health.reachable
                         else "  health   the service did not answer")
        lines += [f"  ALERT    {alert.kind}: {alert.message}" for alert in self.alerts.new]
        if self.retrain is not None:
            lines.append(f"  retrain  {self.retrain.status}")
        lines.append(f"  report   {self.mlflow_run_url} (drift/report.html)")
        return "\n".join(lines)
