"""On large tables the trials and the family comparison train on a stratified sample; the final
model on every row."""

from __future__ import annotations

import numpy as np

from tasks.data import prepare_data, stratified_sample
from tasks.families import make_folds
from tests.conftest import quick_config
from tests.tables import write_messy


def test_a_stratified_sample_keeps_the_class_shares_and_is_the_same_every_time():
    y = np.repeat([0, 1, 2], [7000, 2000, 1000])
    keep = stratified_sample(y, 1000, seed=3)
    assert len(keep) == 1000 and np.array_equal(keep, np.sort(keep))
    assert np.abs(np.bincount(y[keep]) - [700, 200, 100]).max() <= 1
    assert np.array_equal(keep, stratified_sample(y, 1000, seed=3))
    assert stratified_sample(y, 10_000, seed=3) is None and stratified_sample(y, None, seed=3) is None


def test_trials_and_families_see_a_sample_and_the_rest_stays_whole(tmp_path):
    path, target = write_messy("orders", tmp_path)  # 24,000 rows
    config = quick_config(str(path), f"data.target={target}", "selection.sample_rows=3000", "selection.cv_repeats=1")
    prepared = prepare_data(config.data, config.seed)
    sampled = prepared.with_training_sample(2000, config.seed)
    assert len(sampled.splits.y_train) == len(sampled.arrays.y_train) == 2000
    assert len(sampled.splits.x_train) == 2000 and np.array_equal(sampled.arrays.x_val, prepared.arrays.x_val)
    assert len(prepared.arrays.y_train) > 10_000  # the original is untouched: the final training uses it
    assert prepared.with_training_sample(None, config.seed) is prepared
    folds = make_folds(prepared, config.selection, config.seed)
    assert len(folds.y) == 3000 and sum(len(out) for _, out in folds.splits) == 3000
