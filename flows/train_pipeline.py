"""The training flow: one Prefect flow run = one MLflow parent run; reads as DESIGN.md's diagram.

Each stage is a task that computes a typed result and records it (tasks/<stage>.py: the stage's
plain functions, `record_<stage>`, and its thin task); this file only says in which order.
"""

from __future__ import annotations

from prefect import flow

from flows.summaries import TrainSummary
from maas.budget import Budget
from maas.config import RunConfig
from maas.prefect_fixes import end_flow_runs_promptly
from maas.run_context import RunContext, StageTimer, open_run, write_dict
from maas.tracking import flatten, redact_passwords
from tasks.compress import compress_task
from tasks.data import PreparedData, budgeted_data, prepare_data_task
from tasks.evaluate import evaluate_task
from tasks.package import package_task
from tasks.recovery import recover_task
from tasks.families import (compare_task, fit_family_task, set_decision, tunes_network,
                            tuning_workers_to_start)
from tasks.registry import register_task, report_task, select_task
from tasks.train import train_task
from tasks.tune import chosen_settings, tune_task
from tasks.tune_workers import workers_ahead

end_flow_runs_promptly()


@flow(name="maas-train", description="Dataset in; tuned, evaluated, registered model out.")
def train_pipeline(config: RunConfig) -> TrainSummary:
    """recover → data → tune → families → train (or fit) → compress → evaluate → select → report → register → package"""
    # Tuning worker processes (tuning.workers > 1) start now: their imports overlap the stages before the study.
    with workers_ahead(tuning_workers_to_start(config), config.tuning):
        return train_stages(config)


def train_stages(config: RunConfig) -> TrainSummary:
    """The flow's stages, in order."""
    timer, budget = StageTimer(), Budget(config.budget.time_s)  # the budget's clock starts with the flow
    # Recovery: runs, flow runs and versions a crashed run left RUNNING or half-made are settled first.
    recover_task(timer)
    # Data: load, validate, split, fit preprocessing; before any MLflow run, so bad input leaves nothing behind.
    prepared = prepare_data_task(budgeted_data(config.data, budget), config.seed, timer)
    with open_run(config.experiment_name, None, {"maas.dataset": config.data.short_name}, timer, background=True) as ctx:
        ctx.budget = budget
        record_start(ctx, config, prepared)
        choosing = prepared.sealed()  # every stage that chooses sees train and validation rows only
        # Tuning: an Optuna study (resumable) picks the network's settings; each trial is a child run.
        tuning = tune_task(ctx, choosing, config) if tunes_network(config) else None
        settings = chosen_settings(config, tuning)
        # Families: the network, gradient boosting and a linear model by cross-validation; a leaderboard.
        comparison = compare_task(ctx, choosing, config, settings)
        if comparison.is_network:
            # Training: the chosen network, early-stopped on validation loss.
            trained = train_task(ctx, choosing, settings, config.seed)
            # Compression: every configured variant, exported as the bundle that would serve.
            variants = compress_task(ctx, trained, choosing, config.compression, settings.train, config.seed)
        else:  # a scikit-learn family, fitted on train + validation: one variant
            variants = fit_family_task(ctx, choosing, comparison, config.seed)
        # Every variant answers by the family's cross-validated decision rule, where it has one (a rare class).
        set_decision(variants, comparison.chosen.decision)
        # Evaluation: every variant's bundle on the validation split, timed as it would serve.
        scores = evaluate_task(ctx, variants, choosing.splits, config.serving.model_threads)
        # Selection: the policy picks the variant on validation figures; then its one look at the test split.
        winner = select_task(ctx, scores, config.selection)
        winner = report_task(ctx, winner, prepared.splits, comparison, config.serving.model_threads)
        # Registry: provenance and the drift reference sealed in, registered, promoted only past the gate.
        registered = register_task(ctx, winner, prepared, config, tuning)
        # Packaging: a new champion becomes a BentoML model and a Bento, ready for `bentoml serve`.
        bento = package_task(ctx, registered, config.serving)
        summary = TrainSummary.of(config, ctx, registered, winner, tuning, bento)
        record_end(ctx, summary)
    return summary


def record_start(ctx: RunContext, config: RunConfig, prepared: PreparedData) -> None:
    """The whole config (flattened) and the data's facts as params; the input schema as data/schema.json."""
    ctx.record(params={**redact_passwords(flatten(config.model_dump(mode="json"))), **prepared.summary_params()})
    ctx.defer(write_dict, ctx.run_id, prepared.description(), "data/schema.json")


def record_end(ctx: RunContext, summary: TrainSummary) -> None:
    """Stage times, and the outcome as the run's description: the first thing its MLflow page shows."""
    ctx.record(metrics={f"time/{stage}_s": seconds for stage, seconds in summary.stage_seconds.items()})
    ctx.describe(f"```\n{summary.outcome()}\n```")
