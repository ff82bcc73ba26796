"""One time budget for a run: each stage's share of what is left, and the limits it becomes."""

from __future__ import annotations

import time

import pytest

from maas.budget import SHARES, Budget, parse_duration
from maas.config import TrainConfig
from tasks.data import prepare_data
from tasks.train import TrainingSettings, train_on_data
from tests.conftest import quick_config


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), (" 2m ", 120), ("30d", 2_592_000)])
def test_durations_read_as_a_person_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10w", "-5m", "0"])
def test_a_bad_duration_names_itself(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_each_stage_gets_its_share_of_what_is_left_and_unused_time_passes_on():
    budget = Budget(1000.0)
    assert budget.allot("tune") == pytest.approx(400, abs=1)  # 40% of all of it
    budget.started -= 100  # tuning used 100 s of its 400
    compare = budget.allot("compare")
    assert compare == pytest.approx(900 * SHARES["compare"] / 0.6, abs=1)  # half of what is left
    assert budget.limit("train", 30.0) == 30.0  # a tighter configured limit stands
    assert Budget(None).limit("train", None) is None and Budget(None).allot("tune") is None
    budget.started -= 10_000
    assert budget.allot("compress") == 1.0  # overrun: each later stage still gets a second, and says what it cut



def test_text_fine_tuning_takes_the_text_share_only_when_asked_and_halves_it_with_a_student():
    from maas.config import DataConfig
    from tasks.data import budgeted_data

    frozen = DataConfig()
    assert budgeted_data(frozen, Budget(540.0)) is frozen  # no fine-tuning: the text share is not taken
    budget = Budget(540.0)
    tuned = budgeted_data(DataConfig(text_finetune_epochs=2), budget)
    share = 540 * SHARES["text"] / sum(SHARES.values())
    assert tuned.text_finetune_max_s == (share / 2) // 10 * 10  # fine-tuning, then distilling: half each
    assert budgeted_data(DataConfig(text_finetune_epochs=2, text_student_layers=0), Budget(540.0)).text_finetune_max_s \
        == share // 10 * 10
    assert budget.allot("tune") == pytest.approx(540 * SHARES["tune"] / (sum(SHARES.values()) - SHARES["text"]), abs=1)
    assert budgeted_data(DataConfig(text_finetune_epochs=2), Budget(None)).text_finetune_max_s == 1800
    searched = budgeted_data(DataConfig(text_search_trials=4), Budget(540.0))  # search, fine-tune, distil: a third each
    assert searched.text_search_max_s == searched.text_finetune_max_s == (share / 3) // 10 * 10

def test_training_stops_at_its_allotment_and_keeps_its_best_epoch():
    config = quick_config("digits", "model.families=[network]")
    prepared = prepare_data(config.data, config.seed)
    train = TrainConfig(max_epochs=500, patience=500, max_seconds=1.0)
    started = time.perf_counter()
    trained = train_on_data(prepared, TrainingSettings(config.model, train), config.seed)
    assert trained.out_of_time and trained.epochs_run < 500 and time.perf_counter() - started < 10
    assert trained.best.val_loss == min(record.val_loss for record in trained.history)  # the best epoch is kept


def test_each_stage_says_where_the_run_stands_in_the_log_and_a_progress_artifact():
    from maas.run_context import Artifacts

    budget = Budget(200.0)
    budget.started -= 50
    fraction, line = budget.progress("train")
    assert fraction == pytest.approx(0.25, abs=0.01)
    assert line.startswith("train: starting at 50 s of the run's 200 s budget") and "~150 s left" in line
    assert "no time budget" in Budget(None).progress("tune")[1]
    artifacts = Artifacts(to_prefect=False)
    artifacts.progress("run-progress", fraction, line)
    artifacts.progress("run-progress", 0.5, "later")
    assert artifacts.made["run-progress"]["data"] == 50.0 and artifacts.made["run-progress"]["description"] == "later"


def test_the_samples_follow_the_budget_both_ways_down_to_a_floor():
    from maas.budget import DEFAULT_BUDGET_S, MIN_BUDGET_SAMPLE_ROWS, rows_for_budget
    from maas.config import RunConfig

    assert RunConfig().budget.time_s == DEFAULT_BUDGET_S
    assert rows_for_budget(20_000, DEFAULT_BUDGET_S * 3) == 60_000
    assert rows_for_budget(20_000, DEFAULT_BUDGET_S) == rows_for_budget(20_000, None) == 20_000
    assert rows_for_budget(20_000, DEFAULT_BUDGET_S / 4) == 5_000  # a quarter of the budget: a quarter of the rows
    assert rows_for_budget(20_000, 10) == MIN_BUDGET_SAMPLE_ROWS  # never a sample too small to compare on
    assert rows_for_budget(500, 10) == 500  # a configured sample under the floor stays as configured
    assert rows_for_budget(None, DEFAULT_BUDGET_S * 3) is None  # every row stays every row
