"""Model selection across families: the network (tuned by tasks/tune.py), histogram gradient boosting
and a regularized linear model, compared by stratified k-fold cross-validation on train +
validation (repeated on small tables), each within `selection.time_budget_s`. The test split is
not read here (the flow hands this stage sealed data): it stays for the final word.

No family wins everywhere: on smooth or mixed tables the MLP led scikit-learn's HGB, on a table of
thresholds and interactions over heavy-tailed columns HGB led by 5 points (issue notes); so each
run finds out. The best mean CV F1 wins; among families within `selection.family_tolerance` of it
(default 0: only exact ties) the simplest is kept (linear, then hgb, then the network). At 0.005,
the 24k-row orders table kept linear 0.005 behind HGB and lost 1.9 points of test F1 to it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import optuna
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import StratifiedKFold, train_test_split

from maas.budget import rows_for_budget
from maas.config import ModelConfig, RunConfig, SelectionConfig
from maas.figures import log_leaderboard
from maas.run_context import RunContext, run_logger, write_child_run
from maas.studies import finished_trials, open_table_study
from maas.tracking import flatten
from models import NetworkSpec
from models.classic import ClassicSpec, classic_size, export_classic_onnx, fit_classic
from models.ensemble import EnsembleSpec, average_probabilities, fitted_weights, merge_averaging
from tasks.compress import Variant, Variants
from tasks.data import PreparedData, TrainingArrays, stratified_sample, stratify_by
from tasks.decision import (best_decision, cross_fitted_scores, decided_macro_f1, describe, searches_decision,
                            sibling_folds)
from tasks.evaluate import classification_metrics
from tasks.export import export_onnx, update_metadata, write_bundle
from tasks.train import TrainingSettings, progress_logger, spec_for_data, train_network, train_on_data, within_budget
from tasks.tune import open_storage

SIMPLICITY = {"linear": 0, "hgb": 1, "svm": 2, "mlp": 3, "cnn": 3, "ensemble": 4}  # ties go to the simpler family
LEADERBOARD_DIGITS = 4  # CV means are shown (and compared for ties) to 4 decimals
# Macro F1 a tuned decision (tasks/decision.py) must add, cross-fitted, to be kept: on balanced
# tables (breast_cancer) a cross-fitted cut cost 0.1-0.6 point; on a 2%-positive table argmax never
# named the rare class (0.495) and the cut reached 0.547-0.549 (LR, HGB).
DECISION_MIN_GAIN = 0.005
NETWORK_NAMES = ("network", "mlp", "cnn")


def candidate_families(model: ModelConfig) -> list[str]:
    """'network' and/or the scikit-learn families this run compares (one, unless family is auto)."""
    names = model.families if model.family == "auto" else [model.family]
    ordered = ["network" if name in NETWORK_NAMES else name for name in names]
    return list(dict.fromkeys(ordered))


def tunes_network(config: RunConfig) -> bool:
    return config.tuning.enabled and "network" in candidate_families(config.model)


def tuning_workers_to_start(config: RunConfig) -> int:
    """Worker processes the run starts beside its own for the study (tuning.workers - 1), none when
    it tunes no network."""
    return config.tuning.workers - 1 if tunes_network(config) else 0


# --- folds -----------------------------------------------------------------------------------------


def selection_rows(prepared: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows together, preprocessed: what the families are compared on."""
    arrays = prepared.arrays
    return np.vstack([arrays.x_train, arrays.x_val]), np.concatenate([arrays.y_train, arrays.y_val])


@dataclass(frozen=True)
class Folds:
    """The rows the families are compared on and the (train rows, held-out rows) pairs, each run of
    `folds` pairs being one repeat."""

    x: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    folds: int
    repeats: int



def make_folds(prepared: PreparedData, selection: SelectionConfig, seed: int) -> Folds:
    """Stratified folds over train + validation (a stratified sample of selection.sample_rows of them on
    large tables), repeated (new shuffles) on small tables; no more folds than the rarest class has rows."""
    x, y = selection_rows(prepared)
    keep = stratified_sample(y, selection.sample_rows, seed)  # on large tables the families meet on a sample
    if keep is not None:
        x, y = x[keep], y[keep]
    folds = max(2, min(selection.cv_folds, int(np.bincount(y).min())))
    repeats = selection.cv_repeats if len(y) < selection.repeat_below_rows else 1
    splits = [split for repeat in range(repeats)
              for split in StratifiedKFold(folds, shuffle=True, random_state=seed + repeat).split(np.zeros(len(y)), y)]
    return Folds(x, y, splits, folds, repeats)


def macro_f1(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    return classification_metrics(y_true, probabilities)["f1_macro"]


# --- one fit per family ----------------------------------------------------------------------------


@dataclass
class Fitted:
    """A model fitted on one fold: its held-out probabilities and how to export it."""

    model: Any
    probabilities: np.ndarray
    seconds: float


def fit_network_fold(settings: TrainingSettings, spec, x: np.ndarray, y: np.ndarray, x_out: np.ndarray,
                     seed: int) -> Fitted:
    """The network on a fold: early-stopped on 15% of the fold's own training rows, never on the
    rows it is scored on."""
    started = time.perf_counter()
    x_fit, x_stop, y_fit, y_stop = train_test_split(x, y, test_size=0.15, random_state=seed, stratify=stratify_by(y))
    result = train_network(spec, TrainingArrays(x_fit, y_fit, x_stop, y_stop), settings.train, seed)
    with torch.no_grad():
        probabilities = torch.softmax(result.network(torch.as_tensor(x_out, dtype=torch.float32)), 1).numpy()
    return Fitted(result.network, probabilities, time.perf_counter() - started)


def fit_classic_fold(spec: ClassicSpec, x: np.ndarray, y: np.ndarray, x_out: np.ndarray, seed: int) -> Fitted:
    started = time.perf_counter()
    estimator = fit_classic(spec, x, y, seed)
    return Fitted(estimator, estimator.predict_proba(x_out), time.perf_counter() - started)


def graph_figures(fitted: Fitted, spec, x_sample: np.ndarray) -> tuple[int, float]:
    """(ONNX graph bytes, p50 ms for 64 rows) of a fold's model, exported as the bundle would be."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        if isinstance(spec, ClassicSpec):
            export_classic_onnx(fitted.model, spec.n_features, path)
        else:
            export_onnx(fitted.model, spec.n_features, path)
        graph = path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    batch = np.resize(x_sample.astype(np.float32), (64, x_sample.shape[1]))
    times = []
    for _ in range(30):
        started = time.perf_counter()
        session.run(None, {session.get_inputs()[0].name: batch})
        times.append(time.perf_counter() - started)
    return len(graph), float(np.median(times) * 1000)


# --- the comparison --------------------------------------------------------------------------------


@dataclass
class FamilyScore:
    """One row of the leaderboard."""

    family: str  # mlp, cnn, hgb, linear, svm or ensemble
    spec: Any  # NetworkSpec or ClassicSpec of the settings compared
    params: dict[str, Any]
    fold_f1: list[float]
    fit_seconds: float  # mean per fit
    size_bytes: int = 0
    p50_ms_b64: float = 0.0
    trials: int = 0
    note: str = ""
    fold_probabilities: list[np.ndarray] = field(default_factory=list, repr=False)
    decision: dict | None = None  # the decision rule its fold_f1 were scored by (maas.bundle.decide); None: argmax

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_f1))

    @property
    def sd(self) -> float:
        return float(np.std(self.fold_f1, ddof=1)) if len(self.fold_f1) > 1 else 0.0

    def row(self) -> dict[str, Any]:
        return {"family": self.family, "cv_f1_macro_mean": round(self.mean, LEADERBOARD_DIGITS),
                "cv_f1_macro_sd": round(self.sd, LEADERBOARD_DIGITS),
                "folds": len(self.fold_f1), "fit_s": round(self.fit_seconds, 3), "size_bytes": self.size_bytes,
                "p50_ms_b64": round(self.p50_ms_b64, 4), "trials": self.trials, "note": self.note,
                "decision": self.decision}


@dataclass
class Comparison:
    """The comparison stage's result: the leaderboard (best first) and the family kept."""

    scores: list[FamilyScore]
    chosen: FamilyScore
    reason: str
    folds: int = 0
    repeats: int = 1
    settings: TrainingSettings | None = None  # the network's, for an ensemble's network member
    left_out: str = ""  # candidates the table's size ruled out, and why
    labels: list[str] = field(default_factory=list)  # the classes, as a decision rule names them

    @property
    def is_network(self) -> bool:
        return isinstance(self.chosen.spec, NetworkSpec)

    def member(self, family: str) -> FamilyScore:
        return next(score for score in self.scores if score.family == family)

    def leaderboard(self) -> list[dict[str, Any]]:
        return [{**score.row(), "selected": score is self.chosen} for score in self.scores]


class CrossValidation(NamedTuple):
    scores: list[float]  # macro F1 per fold, in the order of the splits
    fit_seconds: float  # mean per fit
    last: Fitted | None  # the last fold's model
    probabilities: list[np.ndarray]  # each fold's held-out probabilities


def cross_validate(fit_fold, spec, folds: Folds, splits: list, deadline: float) -> CrossValidation:
    """Macro F1 per fold of `splits`; stops at the deadline after at least two folds."""
    x, y = folds.x, folds.y
    scores, seconds, probabilities, last = [], [], [], None
    for train_rows, out_rows in splits:
        if len(scores) >= 2 and time.perf_counter() > deadline:
            break
        last = fit_fold(spec, x[train_rows], y[train_rows], x[out_rows])
        scores.append(macro_f1(y[out_rows], last.probabilities))
        seconds.append(last.seconds)
        probabilities.append(last.probabilities)
    return CrossValidation(scores, float(np.mean(seconds)) if seconds else 0.0, last, probabilities)


def offers_sparse_linear(n_features: int, n_classes: int) -> bool:
    """L1 is searched on two classes (liblinear fits it as fast as lbfgs fits L2) and on wide tables.
    On a narrow many-class table saga's L1 fits cost ~30x lbfgs's (digits: 35 of the linear study's
    38 s) and did not score above L2 (0.9637 against 0.968)."""
    return n_classes == 2 or n_features >= SPARSE_MIN_FEATURES


def suggest_classic(trial: optuna.Trial, family: str, n_features: int, n_classes: int) -> dict[str, Any]:
    if family == "hgb":
        return {"learning_rate": trial.suggest_float("learning_rate", 0.02, 0.3, log=True),
                "max_leaf_nodes": trial.suggest_int("max_leaf_nodes", 7, 63, log=True),
                "min_samples_leaf": trial.suggest_int("min_samples_leaf", 3, 60, log=True),
                "l2_regularization": trial.suggest_float("l2_regularization", 1e-4, 10.0, log=True),
                "max_iter": trial.suggest_int("max_iter", 50, 400, log=True)}
    if family == "svm":
        return {"C": trial.suggest_float("C", 0.1, 100.0, log=True),
                "gamma_scale": trial.suggest_float("gamma_scale", 0.05, 5.0, log=True)}
    # L2, or L1 (sparse: where a few of many columns carry the signal, L2 spread its weight over all;
    # a 400 x 1,500 table with 3 that matter: L2 0.62, L1 0.98 cross-validated macro F1)
    if not offers_sparse_linear(n_features, n_classes):
        return {"C": trial.suggest_float("C", 1e-3, 100.0, log=True)}
    return {"C": trial.suggest_float("C", 1e-3, 100.0, log=True),
            "l1_ratio": trial.suggest_categorical("l1_ratio", [0.0, 1.0])}


CLASSIC_DEFAULTS = {"hgb": {"learning_rate": 0.1, "max_leaf_nodes": 31, "min_samples_leaf": 20,
                            "l2_regularization": 1e-4, "max_iter": 100},  # scikit-learn's, l2 at the range's floor
                    "linear": {"C": 1.0},
                    "svm": {"C": 1.0, "gamma_scale": 1.0}}  # scikit-learn's C and gamma='scale'


SPARSE_LINEAR = {"C": 0.1, "l1_ratio": 1.0}
SPARSE_MIN_FEATURES = 100  # features (one-hot slots and embeddings included) from which L1 is searched on many classes


def families_for_rows(model: ModelConfig, selection: SelectionConfig, rows: int) -> tuple[list[str], str]:
    """The candidates this table affords, and a note on any left out: family auto drops the kernel
    SVM above selection.kernel_max_rows (its fit and its Platt scaling grow with the square of the rows).
    `rows`: the train + validation rows a winner is fitted on, not the sample the families meet on. By
    the sample, an 18,895-row text table under `--budget 2m` (a 4,444-row sample) let the SVM in, and
    its final fit on every row ran past 7 minutes."""
    families = candidate_families(model)
    if model.family == "auto" and "svm" in families and rows > selection.kernel_max_rows:
        return [name for name in families if name != "svm"], \
            f"svm left out: {rows} training rows > selection.kernel_max_rows {selection.kernel_max_rows}"
    return families, ""


class TunedFamily(NamedTuple):
    params: dict[str, Any]
    trials: int
    validation: CrossValidation | None  # the best trial's folds, when it ran in this process


def tune_classic(family: str, folds: Folds, config: RunConfig, study_name: str, fingerprint: str, deadline: float
                 ) -> TunedFamily:
    """A small resumable Optuna study over the family's settings, scored by the mean F1 of every fold
    (repeats included: on small tables one repeat's mean moved by its sd/sqrt(5) ~ 1 point between
    shuffles, and TPE chased that noise); its first trial is the defaults. Returns the best settings,
    the study's trials, and the best trial's cross-validation if this process ran it: each trial is
    the whole cross-validation on the leaderboard's folds, so it is not run again (on 240 tickets with
    384 embedding columns, that second pass of HGB's was cut by the budget to 2 of 10 folds).

    A trial's folds stop at the deadline too, after two: uncut, HGB's first trial took 157 s of a
    43 s share (5 folds of 19k sentences' embeddings on an AVX2-only EPYC). The first trial to
    finish keeps the folds it reached; a later one cut short is pruned, since a mean over fewer
    folds does not rank against the others'."""
    n_features, n_classes = folds.x.shape[1], int(folds.y.max()) + 1
    best: dict[int, CrossValidation] = {}  # trial number -> its folds, the best trial's only

    def objective(trial: optuna.Trial) -> float:
        spec = ClassicSpec(family, n_features, n_classes, suggest_classic(trial, family, n_features, n_classes))
        validation = cross_validate(partial(fit_classic_fold, seed=config.seed), spec, folds, folds.splits, deadline)
        trial.set_user_attr("fold_f1", validation.scores)
        if len(validation.scores) < len(folds.splits) and finished_trials(trial.study):
            raise optuna.TrialPruned(f"{len(validation.scores)} of {len(folds.splits)} folds in the time budget")
        mean = float(np.mean(validation.scores))
        if not best or mean > float(np.mean(next(iter(best.values())).scores)):
            best.clear()
            best[trial.number] = validation
        return mean

    study = open_table_study(open_storage(config.tuning), study_name, fingerprint, direction="maximize",
                             sampler=optuna.samplers.TPESampler(seed=config.seed))
    if not study.trials:
        if family == "linear" and offers_sparse_linear(n_features, n_classes):  # L2 first, then the sparse one
            study.enqueue_trial({**CLASSIC_DEFAULTS[family], "l1_ratio": 0.0})
            study.enqueue_trial(SPARSE_LINEAR)
        else:
            study.enqueue_trial(CLASSIC_DEFAULTS[family])
    remaining = config.selection.family_trials - len(finished_trials(study))
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, timeout=max(1.0, (deadline - time.perf_counter()) * 0.7),
                       catch=(ValueError,), gc_after_trial=False)
    return TunedFamily(dict(study.best_trial.params), len(study.trials), best.get(study.best_trial.number))


def score_family(family: str, prepared: PreparedData, config: RunConfig, settings: TrainingSettings,
                 folds: Folds, study_name: str) -> FamilyScore:
    """One family's row: tuned where it has a study (the network's ran before), then cross-validated."""
    deadline = time.perf_counter() + config.selection.time_budget_s
    if family == "network":
        spec = spec_for_data(settings.model, prepared)
        fit_fold = partial(fit_network_fold, settings, seed=config.seed)
        params, trials, validation = {"train": settings.train.model_dump(), "network": spec.to_dict()}, 0, None
    else:
        params, trials, validation = tune_classic(family, folds, config, f"{study_name}-{family}", prepared.fingerprint, deadline)
        spec = ClassicSpec(family, folds.x.shape[1], len(prepared.labels), params)
        fit_fold = partial(fit_classic_fold, seed=config.seed)
    if validation is None:  # the network, or a best trial from an earlier run of the study
        validation = cross_validate(fit_fold, spec, folds, folds.splits, deadline)
    note = "" if len(validation.scores) == len(folds.splits) else \
        f"{len(validation.scores)} of {len(folds.splits)} folds in the time budget"
    size, latency = graph_figures(validation.last, spec, folds.x[:64])
    return FamilyScore(spec.family, spec, params, validation.scores, validation.fit_seconds, size, latency, trials,
                       note, validation.probabilities)


def vote_members(singles: list[FamilyScore], members_se: float | None) -> list[FamilyScore]:
    """The families the vote averages: every one (None), or those the best family (by CV mean) leads by
    no more than `members_se` standard errors of their fold-by-fold differences (paired_lead), the best
    included. A family clearly worse than the best only pulls an equal-weight vote towards its errors."""
    if members_se is None or not singles:
        return list(singles)
    best = max(singles, key=lambda score: score.mean)
    return [score for score in singles if score is best or within_noise(paired_lead(best, score), members_se)]


def vote_of(singles: list[FamilyScore], folds: Folds, selection: SelectionConfig, labels: list[str] | None = None
            ) -> FamilyScore | None:
    """The vote as a candidate: its members by selection.vote_members_se, scored on the folds, its
    decision tuned where selection.tune_decision asks; None with selection.ensemble off or one member."""
    members, cut_short = on_every_fold(vote_members(singles, selection.vote_members_se))
    if not selection.ensemble or len(members) < 2:
        return None
    fitted = weighted_vote_score(members, folds, selection.tune_decision, labels) \
        if selection.vote_weights in ("fitted", "auto") else None
    if selection.vote_weights == "fitted":
        vote = fitted
    else:
        equal = vote_score(members, folds)
        equal = with_tuned_decision(equal, folds, labels) if selection.tune_decision else equal
        vote = better_vote(equal, fitted)
    return replace(vote, note=f"{vote.note}; {cut_short}") if vote is not None and cut_short else vote


def on_every_fold(members: list[FamilyScore]) -> tuple[list[FamilyScore], str]:
    """The members that reached as many folds as any did, and a note naming those left out. The vote is
    scored on the folds every member reached, so one family the time budget cut short made it a mean over
    those few, ranked against the others' over all: on 1,500 support tickets with a text column, HGB cut
    to 2 of 10 folds left a vote scored on 2 (0.6473 ± 0.0014) chosen over linear's 10 (0.6444)."""
    most = max((len(member.fold_f1) for member in members), default=0)
    kept = [member for member in members if len(member.fold_f1) == most]
    cut = [f"{member.family} ({len(member.fold_f1)} of {most} folds)"
           for member in members if len(member.fold_f1) < most]
    return kept, f"left out of the vote, cut short by the time budget: {', '.join(cut)}" if cut else ""


def better_vote(equal: FamilyScore, fitted: FamilyScore | None) -> FamilyScore:
    """vote_weights auto: the fitted vote where its cross-fitted CV mean is above the equal vote's, else
    the equal one (a tie too: nothing fitted). Both scores are honest, so the higher one is the better
    guess; its note says what the other scored. Neither rule was ahead on every table of the selection
    benchmark (fitted: 3%-fraud, defects; equal: breast_cancer's CV, wine)."""
    if fitted is None:
        return equal
    chosen, other, what = (fitted, equal, "equal") if fitted.mean > equal.mean else (equal, fitted, "fitted")
    return replace(chosen, note=f"{chosen.note}; weights {what}: CV {other.mean:.4f}")


def vote_score(members: list[FamilyScore], folds: Folds) -> FamilyScore:
    """The equal-weight soft vote of the families, scored on the folds every member reached, from
    the members' own held-out probabilities (nothing is fitted, so nothing is optimistic)."""
    reached = min(len(member.fold_probabilities) for member in members)
    probabilities = [average_probabilities([member.fold_probabilities[index] for member in members])
                     for index in range(reached)]
    scores = [macro_f1(folds.y[out_rows], held) for held, (_, out_rows) in zip(probabilities, folds.splits)]
    return vote_row(members, None, folds, scores, probabilities)


def vote_row(members: list[FamilyScore], weights: list[float] | None, folds: Folds, fold_f1: list[float],
             probabilities: list[np.ndarray]) -> FamilyScore:
    """The vote's leaderboard row: its members (and weights; None: equal), its fold scores, and the
    members' summed fit time, size and latency."""
    spec = EnsembleSpec("ensemble", folds.x.shape[1], int(folds.y.max()) + 1,
                        [member.spec.to_dict() for member in members], weights)
    params = {"members": [member.family for member in members], **({"weights": weights} if weights else {})}
    return FamilyScore("ensemble", spec, params, fold_f1, sum(member.fit_seconds for member in members),
                       sum(member.size_bytes for member in members), sum(member.p50_ms_b64 for member in members),
                       0, "sizes and latencies: the members' sums", probabilities)


def weighted_vote_score(members: list[FamilyScore], folds: Folds, tune_decision: bool,
                        labels: list[str] | None = None) -> FamilyScore | None:
    """The vote with fitted weights (models.ensemble.fitted_weights, by macro F1 at the decision
    tuned for the weighted probabilities wherever one is searched, kept or not; else at argmax),
    scored cross-fitted: each fold is answered by the weights, and the decision, that the other
    folds of its repeat chose from their held-out rows, so its score is as honest as a member's.
    The weights kept are fitted on every held-out row; members left with none are dropped, and a
    vote left with one member is none (that family is on the leaderboard already). A decision is
    kept as with_tuned_decision keeps one: where, cross-fitted, it adds DECISION_MIN_GAIN to argmax.
    The members are taken best CV mean first, so that a tie in a round's picks goes to the better
    family: macro F1 of the labels ties often, and in the families' order (mlp, hgb, linear, svm) the
    breast-cancer vote's weights and its cross-fitted score (0.9670 against 0.9728) came out otherwise."""
    members = sorted(members, key=lambda member: -member.mean)
    reached = min(len(member.fold_probabilities) for member in members)
    outs = [out_rows for _, out_rows in folds.splits[:reached]]
    searching = tune_decision and searches_decision(folds.y, int(folds.y.max()) + 1)

    def fit(indices: list[int]) -> tuple[list[float], dict | None]:
        y = np.concatenate([folds.y[outs[index]] for index in indices])
        held = [np.concatenate([member.fold_probabilities[index] for index in indices]) for member in members]
        weights = fitted_weights(y, held, partial(decided_macro_f1, search=searching))
        return weights, best_decision(y, average_probabilities(held, weights)) if searching else None

    argmax_f1, decided_f1, probabilities = [], [], []
    for index in range(reached):
        siblings = sibling_folds(index, reached, folds.folds)
        weights, decision = fit(siblings) if siblings else (None, None)
        held = average_probabilities([member.fold_probabilities[index] for member in members], weights)
        probabilities.append(held)
        argmax_f1.append(macro_f1(folds.y[outs[index]], held))
        decided_f1.append(classification_metrics(folds.y[outs[index]], held, decision)["f1_macro"])
    weights, decision = fit(list(range(reached)))
    if sum(weight > 0 for weight in weights) < 2:
        return None
    decided = searching and np.mean(decided_f1) >= np.mean(argmax_f1) + DECISION_MIN_GAIN
    kept = [(member, weight) for member, weight in zip(members, weights) if weight > 0]
    shares = ", ".join(f"{member.family} {weight:.2f}" for member, weight in kept)
    row = vote_row([member for member, _ in kept], [weight for _, weight in kept], folds,
                   decided_f1 if decided else argmax_f1, probabilities)
    note = "; ".join(filter(None, [row.note, f"weights {shares}",
                                   decision_note(decision, labels, float(np.mean(argmax_f1))) if decided else ""]))
    return replace(row, note=note, decision=decision if decided else None)


# --- the decision rule ---------------------------------------------------------------------------------


def with_tuned_decision(score: FamilyScore, folds: Folds, labels: list[str] | None = None) -> FamilyScore:
    """The family answered by a tuned decision (tasks/decision.py: a cut on two classes, class
    weights on unequal ones) when that raises its cross-fitted CV macro F1 by DECISION_MIN_GAIN or
    more; the decision is then the best on every held-out row of its folds. Otherwise as it was (argmax)."""
    n_classes = int(folds.y.max()) + 1
    if len(score.fold_probabilities) < 2 or not searches_decision(folds.y, n_classes):
        return score
    outs = [out_rows for _, out_rows in folds.splits[:len(score.fold_probabilities)]]
    crossed = cross_fitted_scores(folds.y, outs, score.fold_probabilities, folds.folds,
                                  lambda y, held, decision: classification_metrics(y, held, decision)["f1_macro"])
    if np.mean(crossed) < score.mean + DECISION_MIN_GAIN:
        return score
    decision = best_decision(np.concatenate([folds.y[rows] for rows in outs]), np.concatenate(score.fold_probabilities))
    note = "; ".join(filter(None, [score.note, decision_note(decision, labels, score.mean)]))
    return replace(score, fold_f1=crossed, decision=decision, note=note)


def decision_note(decision: dict, labels: list[str] | None, argmax_mean: float) -> str:
    """The leaderboard's words for a kept decision, beside the CV mean it beat at argmax."""
    return f"decision {describe(decision, labels)} (argmax: {argmax_mean:.4f})"


def set_decision(variants: Variants, decision: dict | None) -> None:
    """Write the chosen family's decision into every variant's bundle, which then answers by it
    (ModelBundle.labels_of, the gate, the pyfunc) and is evaluated by it."""
    if decision:
        for variant in variants.built:
            update_metadata(variant.bundle_dir, decision=decision)


def choose_family(scores: list[FamilyScore], tolerance: float, vote_margin_se: float = 0.0
                  ) -> tuple[FamilyScore, str]:
    """The best CV mean, or the simplest family within `tolerance` of it. Means equal as the
    leaderboard prints them are a tie, which the simpler family takes: on 24,000 orders the vote
    (0.6771, its members' summed size and latency) was chosen over HGB (0.6771) by a difference
    below the fourth decimal, and read 1.4 points worse on the test split.

    With vote_margin_se (2 by default), the vote is kept where that choice leads it by no more than so
    many standard errors (paired_lead): a lead in the noise names a family by chance, and the vote's
    errors average out. benchmarks/results/model_selection_outer.md replays it on 5 splits of 9
    tables: 2 SE left the selected model 0.0040 of test macro F1 under the best single family on
    average, against 0.0057 for the best mean alone; it gained on 4 (rare +0.018, wine +0.006), lost on
    2 (defects -0.013, churn -0.002) and left the 3 with a clear leader alone (thresholds, sparse,
    digits). 3 SE gained more on average but cost digits 0.007, where the vote's weaker members
    dragged svm down (vote_members prunes them; see the README for why it is off by default).
    A family scoring the same as the vote on every fold keeps its place: that is a tie, not noise, and
    the vote would only add its other members' size and latency."""
    shown = lambda score: round(score.mean, LEADERBOARD_DIGITS)  # noqa: E731
    best = max(scores, key=lambda score: score.mean)
    close = [score for score in scores if shown(score) >= shown(best) - tolerance - 1e-12]
    chosen = min(close, key=lambda score: (SIMPLICITY[score.family], -score.mean))
    why = f"best cross-validated macro F1 {best.mean:.4f} ± {best.sd:.4f}"
    if chosen is not best and shown(chosen) == shown(best):
        why = (f"tied with {best.family} at cross-validated macro F1 {chosen.mean:.4f}, and simpler: "
               f"{chosen.mean:.4f} ± {chosen.sd:.4f}")
    elif chosen is not best:
        why = (f"simplest within {tolerance:.3f} of the best ({best.family} {best.mean:.4f}): "
               f"{chosen.mean:.4f} ± {chosen.sd:.4f}")
    vote = next((score for score in scores if score.family == "ensemble"), None)
    if vote_margin_se > 0 and vote is not None and chosen is not vote:
        lead, error = paired_lead(chosen, vote)
        if error > 0 and within_noise((lead, error), vote_margin_se):  # 0: the same on every fold, a tie
            shared = min(len(chosen.fold_f1), len(vote.fold_f1))
            where = "" if shared == len(vote.fold_f1) == len(chosen.fold_f1) else f" on the {shared} folds both reached"
            how = (f"{chosen.family} leads it by {lead:+.4f}{where}, within {vote_margin_se:g} standard errors "
                   f"({vote_margin_se:g} x {error:.4f}) of their fold-by-fold differences") if lead > 0 else \
                f"it scores {-lead:+.4f} against {chosen.family}{where}"
            why = f"the vote, as {how}: {vote.mean:.4f} ± {vote.sd:.4f}"
            chosen = vote
    return chosen, f"{chosen.family}: {why} over {len(chosen.fold_f1)} folds"


def paired_lead(leader: FamilyScore, other: FamilyScore) -> tuple[float, float]:
    """How far `leader` leads `other` on the folds both reached, and that mean's standard error
    (of the paired differences: each fold's rows are the same for both). One fold: no error known (NaN)."""
    reached = min(len(leader.fold_f1), len(other.fold_f1))
    differences = np.subtract(leader.fold_f1[:reached], other.fold_f1[:reached])
    error = float(np.std(differences, ddof=1) / np.sqrt(reached)) if reached > 1 else float("nan")
    return float(np.mean(differences)), error


def within_noise(lead: tuple[float, float], margin_se: float) -> bool:
    """A (lead, standard error) no more than margin_se errors; an unknown error (NaN) is not noise."""
    return lead[0] <= margin_se * lead[1]


def compare_families(prepared: PreparedData, config: RunConfig, settings: TrainingSettings,
                     study_name: str) -> Comparison:
    """The comparison stage: every candidate family on the same folds; the leaderboard, best first."""
    folds = make_folds(prepared, config.selection, config.seed)
    fitted_rows = len(prepared.arrays.y_train) + len(prepared.arrays.y_val)  # what the winner is fitted on
    families, left_out = families_for_rows(config.model, config.selection, fitted_rows)
    scores = [score_family(family, prepared, config, settings, folds, study_name) for family in families]
    if config.selection.tune_decision:
        scores = [with_tuned_decision(score, folds, prepared.labels) for score in scores]
    vote = vote_of(scores, folds, config.selection, prepared.labels)
    if vote is not None:
        scores.append(vote)
    scores.sort(key=lambda score: -score.mean)
    chosen, reason = choose_family(scores, config.selection.family_tolerance, config.selection.vote_margin_se)
    return Comparison(scores, chosen, reason, folds.folds, folds.repeats, settings, left_out, prepared.labels)


def fit_chosen_family(prepared: PreparedData, comparison: Comparison, seed: int, folder: Path) -> Variants:
    """A scikit-learn winner fitted on train + validation, or the vote of every family (each fitted
    as it would be alone, merged into one graph), exported as the one variant (named fp32, like an
    uncompressed network: compression variants are for the networks)."""
    started = time.perf_counter()
    spec = comparison.chosen.spec
    if isinstance(spec, EnsembleSpec):
        graphs, sizes = zip(*(final_graph(prepared, comparison.member(name), comparison.settings, seed)
                              for name in comparison.chosen.params["members"]))
        model, size = merge_averaging(list(graphs), comparison.chosen.params.get("weights")), sum(sizes)
    else:
        x, y = selection_rows(prepared)
        model = fit_classic(spec, x, y, seed)
        size = classic_size(model)
    bundle = write_bundle(folder / "fp32", model, spec, prepared)
    return Variants([Variant("fp32", bundle, spec, size, size, {"family": spec.family},
                             time.perf_counter() - started, saw_validation=True)], [])


def final_graph(prepared: PreparedData, member: FamilyScore, settings: TrainingSettings | None, seed: int
                ) -> tuple[bytes, int]:
    """A family's final model as ONNX, and its parameters: the network trained as the network path
    trains it (early-stopped on validation), a scikit-learn family fitted on train + validation."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        if isinstance(member.spec, ClassicSpec):
            x, y = selection_rows(prepared)
            estimator = fit_classic(member.spec, x, y, seed)
            export_classic_onnx(estimator, member.spec.n_features, path)
            parameters = classic_size(estimator)
        else:
            report = progress_logger(run_logger(), settings.train.max_epochs)
            network = train_on_data(prepared, settings, seed, report).network
            export_onnx(network, member.spec.n_features, path)
            parameters = sum(weights.numel() for weights in network.parameters())
        return path.read_bytes(), parameters


def record_comparison(ctx: RunContext, comparison: Comparison) -> None:
    """A child run per family, the leaderboard as a table and a plot, a Prefect table, a log line each."""
    rows = comparison.leaderboard()
    if comparison.left_out:
        ctx.logger.info("%s", comparison.left_out)
    cut = [f"{score.family}: {score.note}" for score in comparison.scores  # the vote's note names its members' cuts
           if "time budget" in score.note and score.family != "ensemble"]
    if cut:
        ctx.budget.cut("compare", "; ".join(cut))
    for score, row in zip(comparison.scores, rows):
        ctx.logger.info("family %-6s CV F1 %.4f ± %.4f (%d folds)  fit %.2f s  %8d bytes  %.3f ms @64%s%s",
                        score.family, score.mean, score.sd, len(score.fold_f1), score.fit_seconds, score.size_bytes,
                        score.p50_ms_b64, f"  ({score.note})" if score.note else "", "  <- selected" if row["selected"] else "")
        figures = {"params": {"family": score.family, **flatten(score.params, "family.")},
                   "metrics": {"cv/f1_macro_mean": score.mean, "cv/f1_macro_sd": score.sd,
                               "cv/folds": len(score.fold_f1), "fit_s": score.fit_seconds,
                               "size/model_bytes": score.size_bytes, "latency/p50_ms_b64": score.p50_ms_b64}}
        ctx.defer(write_child_run, ctx.ref, f"family-{score.family}", {"maas.family": score.family}, figures, ())
    ctx.record(tags={"maas.family": comparison.chosen.family, "maas.family_selection": comparison.reason},
               params={"family.decision": describe(comparison.chosen.decision, comparison.labels)},
               metrics={"cv/f1_macro_mean": comparison.chosen.mean, "cv/f1_macro_sd": comparison.chosen.sd})
    ctx.defer(log_leaderboard, ctx.run_id, rows, ctx.scratch_dir("families"))
    ctx.artifacts.table("families", rows, f"Families by {comparison.folds}-fold CV x{comparison.repeats} "
                                          f"on train + validation; selected {comparison.reason}")
    ctx.logger.info("selected family %s", comparison.reason)


def record_family_fit(ctx: RunContext, variants: Variants) -> None:
    fitted = variants.built[0]
    ctx.record(params={"family.final_fit": "train+validation"})
    ctx.logger.info("%s fitted on train + validation in %.1f s (%d parameters)", fitted.spec.family, fitted.seconds,
                    fitted.parameters)


# --- Prefect wrappers ------------------------------------------------------------------------------


@task(name="compare-families", retries=0, timeout_seconds=6 * 3600, cache_policy=NO_CACHE)
def compare_task(ctx: RunContext, prepared: PreparedData, config: RunConfig, settings: TrainingSettings) -> Comparison:
    study_name = config.tuning.study_name or config.experiment_name
    selection = config.selection.model_copy(update={"sample_rows": rows_for_budget(config.selection.sample_rows,
                                                                                   ctx.budget.time_s)})
    config = config.model_copy(update={"selection": selection})
    allotted = ctx.budget.allot("compare")
    if allotted is not None:  # the families share the stage's allotment
        per_family = min(selection.time_budget_s, allotted / len(candidate_families(config.model)))
        config = config.model_copy(update={"selection": selection.model_copy(update={"time_budget_s": per_family})})
    return ctx.run_stage("compare", partial(compare_families, prepared, config, settings, study_name),
                         record_comparison)


@task(name="fit-family", retries=0, timeout_seconds=3600, cache_policy=NO_CACHE)
def fit_family_task(ctx: RunContext, prepared: PreparedData, comparison: Comparison, seed: int) -> Variants:
    if comparison.settings is not None:  # a vote's network member trains within the training stage's allotment
        comparison = replace(comparison, settings=within_budget(comparison.settings, ctx.budget))
    return ctx.run_stage("train", partial(fit_chosen_family, prepared, comparison, seed, ctx.scratch_dir("variants")),
                         record_family_fit)

