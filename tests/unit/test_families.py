"""Model selection across families: each family's bundle answers as its in-memory model does, the
comparison picks the family the table calls for, and nothing that chooses reads the test split."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from functools import partial

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

from maas.bundle import InputSchemaError, ModelBundle, decide, transform
from maas.config import SelectionConfig, load_config
from maas.errors import MaasInputError
from maas.figures import IN_SAMPLE
from models.classic import SVM_CLIP, ClassicSpec, fit_classic
from tasks.data import SealedSplit, SealedSplitRead, prepare_data
from tasks.evaluate import classification_metrics, evaluate_bundle, evaluate_variants
from tasks.export import write_bundle
from tasks.decision import best_cut, decided_macro_f1, macro_f1_at_cuts, macro_f1_columns
from models.ensemble import average_probabilities, fitted_weights
from tasks.families import (FamilyScore, Folds, better_vote, candidate_families, choose_family, compare_families,
                            families_for_rows, fit_chosen_family, set_decision, vote_members, vote_of,
                            weighted_vote_score, with_tuned_decision)
from tasks.registry import choose_winner
from tasks.train import TrainingSettings, train_on_data
from tasks.tune import open_storage
from tests.conftest import PROJECT_ROOT, quick_config
from tests.tables import write_messy, written_as_a_bank_exports_it

SMALL_BUDGET = ["selection.family_trials=3", "selection.cv_repeats=1", "selection.time_budget_s=30",
                "train.max_epochs=30", "tuning.enabled=false"]


def prepared_table(name: str, folder, *overrides: str):
    path, target = write_messy(name, folder)
    config = quick_config(str(path), f"data.target={target}", "model.families=[network, hgb, linear]", *SMALL_BUDGET,
                          *overrides)
    return prepare_data(config.data, config.seed), config


@pytest.mark.parametrize("family, table, params", [("hgb", "churn", {}), ("linear", "churn", {}),
                                                   ("linear", "churn", {"C": 0.1, "l1_ratio": 1.0}),
                                                   ("linear", "linear", {"C": 0.5, "l1_ratio": 1.0}),
                                                   ("svm", "churn", {}), ("mlp", "churn", {})])
def test_each_familys_bundle_answers_raw_rows_as_its_model_does(family, table, params, tmp_path):
    """Each family, and the sparse linear model on two classes (liblinear) and on more (saga)."""
    prepared, config = prepared_table(table, tmp_path)
    arrays = prepared.arrays
    if family == "mlp":
        trained = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
        model, spec = trained.network, trained.spec
    else:
        spec = ClassicSpec(family, arrays.x_train.shape[1], len(prepared.labels), params)
        model = fit_classic(spec, arrays.x_train, arrays.y_train, config.seed)
    bundle = ModelBundle.load(write_bundle(tmp_path / "bundle", model, spec, prepared))
    raw = prepared.splits.x_test  # raw rows, gaps and all, as pandas read them
    features = transform(raw, prepared.preprocessing)
    if family == "mlp":
        import torch

        with torch.no_grad():
            expected = torch.softmax(model(torch.as_tensor(features)), 1).numpy()
    else:
        expected = model.predict_proba(features)
    np.testing.assert_allclose(bundle.predict_proba(raw), expected, atol=1e-5)


def test_the_bundle_refuses_a_value_a_numeric_column_cannot_read_as_the_service_does(tmp_path):
    """The pyfunc's rows: a word where training saw only numbers, or a date in no form it knows, is an
    error naming the row, column and value (the service's 400), not a missing value imputed without a
    word; "unknown" where training had such strings, and a blank, are missing as in training."""
    path, target = write_messy("loans", tmp_path)
    written = written_as_a_bank_exports_it(pd.read_csv(path))
    written.loc[written.index % 40 == 7, "income"] = "unknown"  # pandas reads "n/a" as missing, not this
    written.to_csv(path, index=False)
    config = quick_config(str(path), f"data.target={target}")
    prepared = prepare_data(config.data, config.seed)
    arrays = prepared.arrays
    spec = ClassicSpec("linear", arrays.x_train.shape[1], len(prepared.labels), {})
    bundle = ModelBundle.load(write_bundle(tmp_path / "bundle", fit_classic(spec, arrays.x_train, arrays.y_train, 0),
                                           spec, prepared))
    rows = pd.read_csv(path).drop(columns=[target]).head(8).astype(object)
    assert rows.loc[7, "income"] == "unknown" and len(bundle.predict(rows)) == 8  # the file's own forms

    def with_value(column: str, value, at: int = 4) -> pd.DataFrame:
        changed = rows.copy()
        changed.loc[at, column] = value
        return changed

    for column, value, refusal in [
            ("age", "forty", "not a number: 'forty'"),
            ("amount", "twelve €", r"not a number as the training file wrote them \(e.g. 1.200,50, \$5, 12.5%\): 'twelve €'"),
            ("applied_on", "31/31/2025", r"not a date as the training file wrote them \(03/12/2026 09:30 AM\) nor an ISO "
                                         r"8601 date or time \('31/31/2025'\)")]:
        with pytest.raises(InputSchemaError, match=rf"^row 4, column '{column}': {refusal}"):
            bundle.predict(with_value(column, value))
    missing = bundle.predict_proba(with_value("income", None))
    np.testing.assert_allclose(bundle.predict(with_value("income", "unknown")).filter(like="proba_"), missing, atol=1e-6)
    np.testing.assert_allclose(bundle.predict(with_value("age", "  ")).filter(like="proba_"),
                               bundle.predict_proba(with_value("age", None)), atol=1e-6)
    two = with_value("age", "x", at=1)
    two.loc[3, "age"] = "y"
    with pytest.raises(InputSchemaError, match=r"^row 1, column 'age': not a number: 'x' \(and 1 more row\(s\)\)$"):
        bundle.predict(two)
    assert np.isfinite(bundle.predict_proba(two)).all()  # lenient where the caller reads its own rows (the gate)


def test_logging_the_pyfunc_does_not_warn_of_the_runs_own_rare_categories(tmp_path, maas_home, caplog):
    """The logged model's example is test rows, where a category too rare to keep shows up: the
    warning meant for a client's unknown values is not printed by `maas run`; a client still gets it."""
    import logging

    from maas.bundle import UNKNOWN_CATEGORY_WARNING
    from maas.tracking import ensure_experiment, mlflow_client
    from tasks.registry import log_bundle_model

    prepared, config = prepared_table("churn", tmp_path, "data.max_category_levels=2")
    arrays = prepared.arrays
    spec = ClassicSpec("linear", arrays.x_train.shape[1], len(prepared.labels), {})
    folder = write_bundle(tmp_path / "bundle", fit_classic(spec, arrays.x_train, arrays.y_train, 0), spec, prepared)
    rows = prepared.splits.x_test.head(20)
    client = mlflow_client()
    run = client.create_run(ensure_experiment(client, "pyfunc-example"))  # its artifacts under MAAS_HOME

    def warned() -> list:
        return [record for record in caplog.records if UNKNOWN_CATEGORY_WARNING in record.getMessage()]

    with caplog.at_level(logging.WARNING, logger="maas"):
        log_bundle_model(client, run.info.run_id, folder, rows)
        assert not warned()
        ModelBundle.load(folder).predict(rows)
        assert len(warned()) == 1


def test_the_linear_family_finds_the_few_columns_that_matter_with_an_l1_penalty(tmp_path, maas_home):
    prepared, config = prepared_table("sparse", tmp_path, "model.families=[linear, hgb]")
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "s")
    linear = comparison.member("linear")
    assert comparison.chosen.family == "linear" and linear.params["l1_ratio"] == 1.0, comparison.leaderboard()
    assert linear.mean > 0.9 and linear.mean > comparison.member("hgb").mean + 0.05, comparison.leaderboard()


def answering_mostly(chosen) -> str | None:
    """The family the chosen candidate answers with, or with half or more of its vote's weight (the
    fitted vote, the default, keeps a clearly better family as its main member); None for a vote
    without such a member."""
    members = chosen.params.get("members", [chosen.family])
    weights = dict(zip(members, chosen.params.get("weights", [1 / len(members)] * len(members))))
    family = max(weights, key=weights.get)
    return family if weights[family] >= 0.5 else None


def test_gradient_boosting_wins_on_thresholds_and_interactions(tmp_path, maas_home):
    prepared, config = prepared_table("thresholds", tmp_path)
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "t")
    scores = {score.family: score.mean for score in comparison.scores}
    assert scores["hgb"] > scores["mlp"] + 0.05, comparison.leaderboard()
    assert answering_mostly(comparison.chosen) == "hgb", (comparison.chosen.params, scores)


def test_the_best_trials_folds_are_the_leaderboards_and_are_not_fitted_again(tmp_path, maas_home, monkeypatch):
    from tasks import families

    prepared, config = prepared_table("churn", tmp_path, "model.families=[hgb]", "selection.family_trials=3")
    fitted = []
    fit_fold = families.fit_classic_fold
    monkeypatch.setattr(families, "fit_classic_fold", lambda *args, **kwargs: fitted.append(1) or fit_fold(*args, **kwargs))
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "b")
    hgb = comparison.member("hgb")
    assert len(hgb.fold_f1) == comparison.folds * comparison.repeats == len(hgb.fold_probabilities)
    assert len(fitted) == 3 * len(hgb.fold_f1)  # the three trials' folds; none a second time for the leaderboard


def test_a_family_study_past_its_time_keeps_two_folds_of_its_first_trial_and_prunes_later_cut_ones(tmp_path, maas_home):
    """On a slow machine one trial's full cross-validation can outlast the family's share: its folds
    stop at the deadline after two, and a later trial cut short does not rank against full ones."""
    import optuna

    from tasks.families import make_folds, tune_classic

    prepared, config = prepared_table("churn", tmp_path, "selection.family_trials=1")
    folds = make_folds(prepared.sealed(), config.selection, config.seed)
    assert len(folds.splits) > 2
    tuned = tune_classic("hgb", folds, config, "past-its-time", prepared.fingerprint, deadline=time.perf_counter())
    assert tuned.validation is not None and len(tuned.validation.scores) == 2
    one_more = config.model_copy(update={"selection": config.selection.model_copy(update={"family_trials": 2})})
    again = tune_classic("hgb", folds, one_more, "past-its-time", prepared.fingerprint, deadline=time.perf_counter())
    study = optuna.load_study(study_name="past-its-time", storage=open_storage(config.tuning))
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and len(first.user_attrs["fold_f1"]) == 2
    assert second.state == optuna.trial.TrialState.PRUNED and len(second.user_attrs["fold_f1"]) == 2
    assert again.params == tuned.params == first.params


def test_means_equal_as_the_leaderboard_prints_them_are_a_tie_the_simpler_family_takes():
    def score(family: str, mean: float) -> FamilyScore:
        return FamilyScore(family, None, {}, [mean - 0.01, mean + 0.01], 0.0)

    chosen, reason = choose_family([score("ensemble", 0.67712), score("hgb", 0.67708), score("mlp", 0.6749)], 0.0)
    assert chosen.family == "hgb" and reason.startswith("hgb: tied with ensemble at cross-validated macro F1 0.6771")
    chosen, reason = choose_family([score("ensemble", 0.6773), score("hgb", 0.6771)], 0.0)
    assert chosen.family == "ensemble" and "best cross-validated macro F1 0.6773" in reason
    chosen, _ = choose_family([score("ensemble", 0.6773), score("hgb", 0.6771)], 0.001)
    assert chosen.family == "hgb"


def test_the_vote_is_kept_over_a_family_whose_lead_is_within_the_noise():
    vote_folds = np.array([0.55, 0.49, 0.54, 0.49, 0.54])
    vote = FamilyScore("ensemble", None, {}, vote_folds.tolist(), 0.0)
    noisy = FamilyScore("linear", None, {}, (vote_folds + [0.04, -0.02, 0.03, -0.02, 0.02]).tolist(), 0.0)  # SE 0.0126
    steady = FamilyScore("hgb", None, {}, (vote_folds + [0.012, 0.008, 0.011, 0.009, 0.010]).tolist(), 0.0)  # SE 0.0007
    assert choose_family([noisy, vote], 0.0)[0] is noisy  # no margin: the best mean alone decides
    assert SelectionConfig().vote_margin_se == 2.0  # what a run does unless told otherwise
    chosen, reason = choose_family([noisy, vote], 0.0, vote_margin_se=2.0)
    assert chosen is vote and reason.startswith("ensemble: the vote, as linear leads it by +0.0100, within 2 standard "
                                                "errors (2 x 0.0126) of their fold-by-fold differences: 0.5220")
    assert choose_family([steady, vote], 0.0, vote_margin_se=2.0)[0] is steady  # the same lead, 14 SE: no noise
    assert choose_family([vote, noisy], 0.0, vote_margin_se=2.0)[0] is vote
    uneven = FamilyScore("ensemble", None, {}, [0.60, 0.60, 0.40, 0.40, 0.40], 0.0)
    cut = FamilyScore("svm", None, {}, [0.61, 0.58], 0.0)  # cut short: the best mean, behind the vote on its 2 folds
    reason = choose_family([cut, uneven], 0.0, vote_margin_se=2.0)[1]
    assert reason.startswith("ensemble: the vote, as it scores +0.0050 against svm on the 2 folds both reached: "), reason
    same = replace(vote, family="hgb")  # the vote's score on every fold: a tie, which the simpler family keeps
    assert choose_family([same, vote], 0.0, vote_margin_se=2.0)[0] is same
    alone = FamilyScore("ensemble", None, {}, [0.4], 0.0)  # one fold: no error to judge by, the choice stands
    assert choose_family([FamilyScore("hgb", None, {}, [0.5], 0.0), alone], 0.0, vote_margin_se=2.0)[0].family == "hgb"


def test_the_vote_averages_only_the_families_within_the_noise_of_the_best_when_told_so():
    best_folds = np.array([0.50, 0.44, 0.49, 0.45, 0.52])
    best = FamilyScore("linear", None, {}, best_folds.tolist(), 0.0)
    close = FamilyScore("hgb", None, {}, (best_folds - [0.03, -0.02, 0.02, -0.01, 0.01]).tolist(), 0.0)  # 0.006 ± 0.009
    behind = FamilyScore("svm", None, {}, (best_folds - [0.07, 0.08, 0.09, 0.07, 0.08]).tolist(), 0.0)  # 0.078 ± 0.004
    one_fold = FamilyScore("mlp", None, {}, [0.47], 0.0)  # no error known: not in the noise
    singles = [close, best, behind, one_fold]
    assert SelectionConfig().vote_members_se is None and vote_members(singles, None) == singles  # every family
    assert vote_members(singles, 2.0) == [close, best]
    assert vote_members(singles, 0.0) == [best]
    assert vote_members(singles, 25.0) == [close, best, behind]


def test_the_linear_model_is_kept_where_it_is_enough(tmp_path, maas_home):
    prepared, config = prepared_table("linear", tmp_path)
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "l")
    assert answering_mostly(comparison.chosen) == "linear", (comparison.chosen.params, comparison.leaderboard())
    rows = comparison.leaderboard()
    assert {"family", "cv_f1_macro_mean", "cv_f1_macro_sd", "fit_s", "size_bytes", "p50_ms_b64"} <= set(rows[0])
    assert [row["cv_f1_macro_mean"] for row in rows] == sorted((row["cv_f1_macro_mean"] for row in rows), reverse=True)


def test_a_run_told_to_vote_only_among_equals_leaves_out_the_vote_where_one_family_leads_clearly(tmp_path, maas_home):
    prepared, config = prepared_table("linear", tmp_path, "model.families=[linear, hgb]", "selection.vote_members_se=0")
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "m")
    assert sorted(row["family"] for row in comparison.leaderboard()) == ["hgb", "linear"]  # a vote of one: no candidate


def test_no_stage_that_chooses_reads_the_test_split(tmp_path, maas_home):
    """Families, the final fit, the variants' evaluation and the selection all run on sealed data."""
    prepared, config = prepared_table("linear", tmp_path, "model.families=[linear, hgb]")
    sealed = prepared.sealed()
    comparison = compare_families(sealed, config, TrainingSettings(config.model, config.train), "s")
    variants = fit_chosen_family(sealed, comparison, config.seed, tmp_path / "variants")
    scores = evaluate_variants(variants, sealed.splits.x_val, sealed.splits.y_val)
    winner = choose_winner(scores, config.selection)
    # the family was fitted on the validation rows too: its figures there are in-sample, and say so
    assert winner.evaluation.split == IN_SAMPLE and "val_in_sample/f1_macro" in winner.evaluation.figures()
    assert "in-sample" in winner.selection.reason and "in-sample" in scores.table.render()
    assert scores.table.flat()[0]["split"] == IN_SAMPLE
    for use in (len, np.asarray, lambda split: split.to_numpy(), lambda split: split[0], pd.DataFrame):
        with pytest.raises(SealedSplitRead):
            use(sealed.splits.x_test)
    assert isinstance(sealed.splits.y_test, SealedSplit) and len(prepared.splits.y_test) > 0


def test_family_names_are_checked_in_one_line():
    assert candidate_families(load_config(PROJECT_ROOT / "configs" / "quick.yaml", dataset="wine").model) == [
        "network", "hgb", "linear", "svm"]
    assert candidate_families(quick_config("wine", "model.family=hgb").model) == ["hgb"]
    assert candidate_families(quick_config("wine", "model.families=[mlp, linear]").model) == ["network", "linear"]
    for override in ("model.families=[network, forest]", "model.family=xgboost", "model.families=[]"):
        with pytest.raises(MaasInputError) as refused:
            load_config(PROJECT_ROOT / "configs" / "quick.yaml", dataset="wine", overrides=[override])
        assert "model.famil" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("weights", ["equal", "fitted", "auto"])
def test_the_vote_of_the_families_is_one_bundle_answering_as_the_average_of_its_members(weights, tmp_path, maas_home):
    prepared, config = prepared_table("churn", tmp_path, "model.families=[linear, hgb]",
                                      "selection.vote_members_se=null", f"selection.vote_weights={weights}")
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "v")
    vote = comparison.member("ensemble")
    assert sorted(vote.params["members"]) == ["hgb", "linear"]
    shares = vote.params.get("weights")
    assert shares is None or (0 < min(shares) and sum(shares) == 1)
    if weights == "auto":  # the rule whose vote scored the higher CV mean, the other's score in the note
        other = re.search(r"weights (equal|fitted): CV ([0-9.]+)", vote.note)
        assert other and other[1] == ("fitted" if shares is None else "equal")
        assert float(other[2]) <= round(vote.mean, 4) if shares is None else float(other[2]) < round(vote.mean, 4) + 1e-4
    else:
        assert (shares is None) == (weights == "equal")
    assert len(vote.fold_f1) == len(comparison.member("linear").fold_f1)
    comparison.chosen = vote
    (variant,) = fit_chosen_family(prepared.sealed(), comparison, config.seed, tmp_path / "variants").built
    bundle = ModelBundle.load(variant.bundle_dir)
    x, y = np.vstack([prepared.arrays.x_train, prepared.arrays.x_val]), np.concatenate([prepared.arrays.y_train,
                                                                                       prepared.arrays.y_val])
    features = transform(prepared.splits.x_test, prepared.preprocessing)
    members = [fit_classic(comparison.member(name).spec, x, y, config.seed).predict_proba(features)
               for name in vote.params["members"]]
    np.testing.assert_allclose(bundle.predict_proba(prepared.splits.x_test),
                               np.average(members, axis=0, weights=shares), atol=1e-5)


def noisy_members(seed: int, rows: int = 600) -> tuple[np.ndarray, list[np.ndarray]]:
    """Two classes drawn from known probabilities; members: those probabilities blurred by two
    independent noises of one size (on the log-odds), and one member confidently wrong on every row."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0.05, 0.95, rows)
    y = (rng.random(rows) < truth).astype(int)
    blurred = [1 / (1 + np.exp(-(np.log(truth / (1 - truth)) + rng.normal(0, 0.7, rows)))) for _ in range(2)]
    return y, [*(np.column_stack([1 - p, p]) for p in blurred), np.eye(2)[1 - y] * 0.98 + 0.01]


def test_ensemble_selection_shares_the_weight_among_the_members_that_help_and_leaves_out_the_wrong_one():
    for seed in range(3):
        y, members = noisy_members(seed)
        weights = fitted_weights(y, members, partial(decided_macro_f1, search=True))
        assert min(weights[:2]) >= 0.2 and weights[2] == 0 and sum(weights) == pytest.approx(1.0), weights


def noisy_family_scores() -> tuple[np.ndarray, list[np.ndarray], list, Folds, list[FamilyScore]]:
    """noisy_members(1) as three families' rows (linear, hgb, and the wrong one as mlp) on 4 folds:
    (y, members, splits, folds, scores)."""
    y, members = noisy_members(1)
    splits = list(StratifiedKFold(4, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    folds = Folds(np.zeros((len(y), 1)), y, splits, 4, 1)
    scores = [FamilyScore(family, ClassicSpec(family, 1, 2, {}), {}, [0.5] * 4, 0.0,
                          fold_probabilities=[member[out] for _, out in splits])
              for family, member in zip(["linear", "hgb", "mlp"], members)]
    return y, members, splits, folds, scores


def test_the_fitted_vote_answers_each_fold_by_the_weights_its_siblings_chose():
    y, members, splits, folds, scores = noisy_family_scores()
    vote = weighted_vote_score(scores, folds, tune_decision=False)
    outs = [out for _, out in splits]
    siblings = np.concatenate(outs[1:])
    weights = fitted_weights(y[siblings], [member[siblings] for member in members],
                             partial(decided_macro_f1, search=False))
    expected = classification_metrics(y[outs[0]], average_probabilities([member[outs[0]] for member in members],
                                                                        weights))["f1_macro"]
    assert vote.fold_f1[0] == expected and vote.decision is None
    assert vote.params["members"] == ["linear", "hgb"] and vote.spec.weights == vote.params["weights"]  # no "mlp"
    assert "weights linear 0." in vote.note
    assert weighted_vote_score([scores[0], scores[2]], folds, tune_decision=False) is None  # one member left: no vote


def test_vote_weights_auto_keeps_the_vote_whose_cross_fitted_cv_is_higher():
    _, _, _, folds, scores = noisy_family_scores()
    assert SelectionConfig().vote_weights == "auto"  # what a run does unless told otherwise
    selection = SelectionConfig(tune_decision=False)
    fitted = weighted_vote_score(scores, folds, tune_decision=False)
    equal = vote_of(scores, folds, selection.model_copy(update={"vote_weights": "equal"}))
    assert fitted.mean > equal.mean + 0.05  # the confidently wrong member drags the equal vote down
    auto = vote_of(scores, folds, selection)
    assert auto.params == fitted.params and auto.fold_f1 == fitted.fold_f1
    assert auto.note.endswith(f"weights equal: CV {equal.mean:.4f}")
    lower = replace(fitted, fold_f1=[value - 0.01 for value in equal.fold_f1])
    assert better_vote(equal, lower).params == equal.params and f"weights fitted: CV {lower.mean:.4f}" in \
        better_vote(equal, lower).note
    assert better_vote(equal, replace(fitted, fold_f1=equal.fold_f1)).params == equal.params  # a tie: nothing fitted
    assert better_vote(equal, None) is equal  # no fitted vote (one member kept all the weight)


def test_a_family_the_time_budget_cut_short_is_left_out_of_the_vote_so_it_is_scored_on_every_fold():
    _, _, _, folds, scores = noisy_family_scores()
    linear, hgb, _ = scores
    cut = replace(hgb, fold_f1=hgb.fold_f1[:2], fold_probabilities=hgb.fold_probabilities[:2])
    selection = SelectionConfig(tune_decision=False, vote_weights="equal")
    assert vote_of([linear, cut], folds, selection) is None  # one member on every fold: no vote
    third = replace(linear, family="svm")
    vote = vote_of([linear, cut, third], folds, selection)
    assert len(vote.fold_f1) == 4 and vote.params["members"] == ["linear", "svm"], vote.params
    assert vote.note.endswith("left out of the vote, cut short by the time budget: hgb (2 of 4 folds)")
    assert len(vote_of([linear, hgb, third], folds, selection).fold_f1) == 4  # none cut: every member, no note
    assert "left out" not in vote_of([linear, hgb, third], folds, selection).note


def test_the_decision_is_the_one_with_the_best_macro_f1_and_a_folds_own_labels_never_set_it():
    y = np.array([0] * 8 + [1] * 2)
    positive = np.array([0.01, 0.02, 0.05, 0.1, 0.1, 0.2, 0.25, 0.3, 0.28, 0.4])
    cut = best_cut(y, positive)
    assert 0.25 < cut <= 0.28, cut  # both 1s and one 0 (0.3) above it: macro F1 0.867, the best there is
    assert best_cut(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.5  # argmax's cut already best
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.1).astype(int)
    splits = [(np.setdiff1d(np.arange(400), rows), rows) for rows in np.array_split(rng.permutation(400), 4)]
    folds = Folds(np.zeros((400, 1)), y, splits, 4, 1)
    probabilities = [np.column_stack([1 - p, p]) for p in (0.3 * y[out] + rng.uniform(0, 0.35, len(out))
                                                           for _, out in splits)]
    score = FamilyScore("hgb", None, {}, [0.47] * 4, 0.0, fold_probabilities=probabilities)
    tuned = with_tuned_decision(score, folds)
    cut = best_cut(np.concatenate([y[out] for _, out in splits[1:]]),
                   np.concatenate([held[:, 1] for held in probabilities[1:]]))
    assert tuned.fold_f1[0] == classification_metrics(y[splits[0][1]], probabilities[0], {"threshold": cut})["f1_macro"]
    flipped = y.copy()
    flipped[splits[0][1]] = 1 - flipped[splits[0][1]]  # fold 0's own labels, turned over: the others' cuts move
    assert with_tuned_decision(score, Folds(folds.x, flipped, splits, 4, 1)).fold_f1[1:] != tuned.fold_f1[1:]
    assert tuned.mean > 0.9 and set(tuned.decision) == {"threshold"} and tuned.row()["decision"] == tuned.decision
    assert "decision P(second class) >= " in tuned.note and "decision P(yes) >= " in with_tuned_decision(
        score, folds, ["no", "yes"]).note and "(argmax: 0.4700)" in tuned.note
    separable = [np.column_stack([1 - p, p]) for p in (0.9 * y[out] + 0.05 for _, out in splits)]
    plain = FamilyScore("hgb", None, {}, [1.0] * 4, 0.0, fold_probabilities=separable)
    assert with_tuned_decision(plain, folds) is plain  # no gain: argmax stays


def test_macro_f1_at_every_cut_counted_from_sorted_rows_equals_the_confusion_matrices():
    rng = np.random.default_rng(5)
    for rows in (3, 40, 2000):
        y = (rng.random(rows) < 0.2).astype(np.int64)
        positive = np.round(rng.random(rows) * (0.4 + 0.5 * y), 2)  # ties on the cuts too
        cuts = np.unique(np.concatenate([positive[:50], [0.0, 0.5, 1.0, 2.0]]))
        counted = macro_f1_columns(y, (positive[:, None] >= cuts[None, :]).astype(np.int64), 2)
        np.testing.assert_array_equal(macro_f1_at_cuts(y, positive, cuts), counted)


def test_unequal_classes_get_class_weights_and_equal_ones_are_left_to_argmax():
    """Three classes of 86 / 9.5 / 4.5%: weak signals leave argmax naming the large one nearly always."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (3000, 4))
    logits = np.column_stack([np.zeros(3000), -2.6 + 0.9 * x[:, 0] + 0.6 * x[:, 1], -3.4 + 0.9 * x[:, 2] - 0.7 * x[:, 3]])
    truth = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in truth])
    splits = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    folds = Folds(x, y, splits, 5, 1)
    held = [truth[out] for _, out in splits]  # the true probabilities, as a perfectly calibrated model's
    argmax = [classification_metrics(y[out], probabilities)["f1_macro"] for (_, out), probabilities in zip(splits, held)]
    tuned = with_tuned_decision(FamilyScore("linear", None, {}, argmax, 0.0, fold_probabilities=held), folds)
    weights = tuned.decision["class_weights"]
    assert weights[0] == 1 and weights[1] > 1 and weights[2] > 1, weights
    from tasks.decision import best_class_weights
    # nothing to gain: argmax's own weight, 1, is on the grid and kept
    assert best_class_weights(np.array([0, 0, 1, 2]), np.eye(3)[[0, 0, 1, 2]]) == [1.0, 1.0, 1.0]
    assert tuned.mean > np.mean(argmax) + 0.05, (tuned.mean, np.mean(argmax))
    answered = decide(np.vstack(held), tuned.decision)
    assert (answered == (np.vstack(held) * np.asarray(weights)).argmax(1)).all() and (answered == 2).any()
    balanced = Folds(x, np.arange(3000) % 3, splits, 5, 1)  # equal classes: not searched
    score = FamilyScore("linear", None, {}, argmax, 0.0, fold_probabilities=held)
    assert with_tuned_decision(score, balanced) is score


def test_a_rare_class_is_answered_by_the_decision_the_folds_chose(tmp_path, maas_home):
    """~3% fraud: argmax all but never names it; the tuned cut does, in the bundle, the pyfunc and the gate."""
    from deployments.batcher import predictions

    prepared, config = prepared_table("rare", tmp_path, "model.families=[linear, hgb]", "selection.ensemble=false")
    sealed = prepared.sealed()
    comparison = compare_families(sealed, config, TrainingSettings(config.model, config.train), "r")
    chosen = comparison.chosen
    assert chosen.decision["threshold"] < 0.5, comparison.leaderboard()
    assert "argmax" in chosen.note and chosen.row()["decision"] == chosen.decision
    variants = fit_chosen_family(sealed, comparison, config.seed, tmp_path / "variants")
    set_decision(variants, chosen.decision)
    bundle = ModelBundle.load(variants.built[0].bundle_dir)
    assert bundle.decision == chosen.decision
    rows = prepared.splits.x_test
    probabilities = bundle.predict_proba(rows)
    answered = bundle.predict(rows)["label"].to_numpy()
    cut = chosen.decision["threshold"]
    expected = np.where(probabilities[:, 1] >= cut, bundle.labels[1], bundle.labels[0])
    assert (answered == expected).all() and (answered == "yes").sum() > (probabilities.argmax(1) == 1).sum()
    assert [answer["label"] for answer in predictions(bundle, probabilities)] == list(expected)
    test = evaluate_bundle(variants.built[0].bundle_dir, rows, prepared.splits.y_test)
    argmax_f1 = classification_metrics(prepared.splits.y_test, test.probabilities)["f1_macro"]
    assert test.metrics["f1_macro"] > argmax_f1, (test.metrics, argmax_f1)
    assert (test.predicted() == (probabilities[:, 1] >= cut)).all()


def test_the_kernel_svm_reads_features_clipped_in_its_graph_too(tmp_path):
    """A value far out in one column moves the SVM no further than the clip, in memory and in the bundle."""
    prepared, config = prepared_table("churn", tmp_path)
    arrays = prepared.arrays
    spec = ClassicSpec("svm", arrays.x_train.shape[1], len(prepared.labels), {"C": 3.0, "gamma_scale": 0.5})
    model = fit_classic(spec, arrays.x_train, arrays.y_train, config.seed)
    bundle = ModelBundle.load(write_bundle(tmp_path / "bundle", model, spec, prepared))
    far, at_clip = arrays.x_val[:20].copy(), arrays.x_val[:20].copy()
    far[:, 0], at_clip[:, 0] = 40.0, SVM_CLIP
    np.testing.assert_allclose(model.predict_proba(far), model.predict_proba(at_clip), atol=1e-12)
    np.testing.assert_allclose(bundle.predict_features(far), model.predict_proba(at_clip), atol=1e-5)
    assert 0.0 < model.predict_proba(arrays.x_val).max() <= 1.0


def test_the_kernel_svm_is_left_out_of_tables_too_large_for_it():
    config = quick_config("wine", "model.families=[network, hgb, svm]", "selection.kernel_max_rows=1000")
    assert families_for_rows(config.model, config.selection, 1000) == (["network", "hgb", "svm"], "")
    kept, note = families_for_rows(config.model, config.selection, 1001)
    assert kept == ["network", "hgb"] and "kernel_max_rows 1000" in note
    alone = quick_config("wine", "model.family=svm", "selection.kernel_max_rows=1000")
    assert families_for_rows(alone.model, alone.selection, 50_000)[0] == ["svm"]  # asked for by name: kept


def test_the_kernel_svm_is_judged_by_the_rows_its_final_fit_takes_not_by_the_compared_sample(tmp_path, maas_home):
    """A small budget shrinks the sample the families meet on; the winner is still fitted on every
    train + validation row, where the SVM's square cost lives."""
    prepared, config = prepared_table("linear", tmp_path, "model.families=[linear, svm]", "selection.sample_rows=100",
                                      "selection.kernel_max_rows=150")
    fitted_rows = len(prepared.arrays.y_train) + len(prepared.arrays.y_val)
    assert fitted_rows > 150
    comparison = compare_families(prepared.sealed(), config, TrainingSettings(config.model, config.train), "k")
    assert [row["family"] for row in comparison.leaderboard()] == ["linear"], comparison.leaderboard()
    assert comparison.left_out == f"svm left out: {fitted_rows} training rows > selection.kernel_max_rows 150"
