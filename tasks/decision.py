"""The decision rule: which class a row's probabilities are answered with.

argmax answers the likelier class, and where one class is rare it is almost never the likelier
one: on a table with 2% fraud every family at argmax scored macro F1 0.495, never naming a fraud;
on three classes of 86 / 9.5 / 4.5% a logistic regression scored 0.346. A decision tuned on
held-out probabilities names them (0.549 and 0.476 cross-fitted). Two classes get a cut on the
second class's probability; more classes get a weight per class that multiplies its probability
before argmax (the largest class keeps 1). Both are searched for the best macro F1 on held-out
rows, and scored cross-fitted: a fold is answered by the decision its repeat's other folds chose.
The rule itself (maas.bundle.decide) travels in the bundle as metadata["decision"].
"""

from __future__ import annotations

import numpy as np

CUT_CANDIDATES = 199  # quantiles of the second class's probability tried as cuts
# A class's weight: 1/25 to 25, even in log space, so 1 (argmax's own) is the middle one and can be kept.
WEIGHT_GRID = np.exp(np.linspace(-np.log(25.0), np.log(25.0), 41))
WEIGHT_ROUNDS = 2  # passes of coordinate ascent over the classes' weights
# More classes are searched only when they are unequal: the smallest under this share of the
# largest. On balanced many-class tables (digits) the search could only fit noise, at a cost.
IMBALANCE_RATIO = 0.5


def macro_f1_columns(y: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of each column of `predicted` (rows x candidates) against y: one confusion matrix per
    column from a single bincount (20,000 rows x 41 candidates in a few ms, any number of classes)."""
    candidates = predicted.shape[1]
    cells = n_classes * n_classes
    codes = y[:, None] * n_classes + predicted + np.arange(candidates)[None, :] * cells
    confusion = np.bincount(codes.ravel(), minlength=candidates * cells).reshape(candidates, n_classes, n_classes)
    true_pos = np.diagonal(confusion, axis1=1, axis2=2)
    both = confusion.sum(2) + confusion.sum(1)  # actual + said, per class
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(2 * true_pos / both).mean(1)


def macro_f1_at_cuts(y: np.ndarray, positive: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Two classes: macro F1 of answering the second class from each cut on, counted from the rows
    sorted once (macro_f1_columns builds a rows x cuts matrix: 19,200 rows x 200 cuts took 43 ms a
    call against 2 ms, and ensemble selection makes hundreds of calls)."""
    order = np.argsort(positive, kind="stable")
    ranked, positives = positive[order], y[order].astype(np.int64)
    below = np.concatenate([[0], np.cumsum(positives)])  # positives among the first k rows by probability
    first = np.searchsorted(ranked, cuts, side="left")  # rows under each cut
    said_positive = len(y) - first
    true_positive = below[-1] - below[first]
    true_negative = first - below[first]
    actual_positive, actual_negative = below[-1], len(y) - below[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_positive = np.nan_to_num(2 * true_positive / (actual_positive + said_positive))
        f1_negative = np.nan_to_num(2 * true_negative / (actual_negative + first))
    return (f1_positive + f1_negative) / 2


def best_cut(y: np.ndarray, positive: np.ndarray) -> float:
    """Two classes: the cut on the second class's probability with the best macro F1 on these rows;
    among equal ones, the nearest to 0.5 (argmax's own)."""
    candidates = np.unique(np.append(np.quantile(positive, np.linspace(0.005, 0.995, CUT_CANDIDATES)), 0.5))
    scores = macro_f1_at_cuts(y, positive, candidates)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def best_class_weights(y: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """More classes: a weight per class (the largest class's fixed at 1), by coordinate ascent on
    macro F1 over WEIGHT_GRID; among equal scores the weight nearest 1."""
    n_classes = probabilities.shape[1]
    weights = np.ones(n_classes)
    anchor = int(np.bincount(y, minlength=n_classes).argmax())
    distance = np.abs(np.log(WEIGHT_GRID))
    for _ in range(WEIGHT_ROUNDS):
        for label in (label for label in range(n_classes) if label != anchor):
            others = probabilities * weights
            others[:, label] = -np.inf
            rival, rival_label = others.max(1), others.argmax(1)
            predicted = np.where(probabilities[:, [label]] * WEIGHT_GRID[None, :] > rival[:, None], label,
                                 rival_label[:, None])
            scores = macro_f1_columns(y, predicted, n_classes)
            best = np.flatnonzero(scores >= scores.max() - 1e-12)
            weights[label] = WEIGHT_GRID[best[np.argmin(distance[best])]]
    return [round(float(weight), 4) for weight in weights]


def searches_decision(y: np.ndarray, n_classes: int) -> bool:
    """Whether a decision is worth searching: two classes, or more that are unequal."""
    counts = np.bincount(y, minlength=n_classes)
    return n_classes == 2 or counts.min() < IMBALANCE_RATIO * counts.max()


def best_decision(y: np.ndarray, probabilities: np.ndarray) -> dict:
    """The decision with the best macro F1 on these held-out rows (metadata["decision"]'s form)."""
    if probabilities.shape[1] == 2:
        return {"threshold": best_cut(y, probabilities[:, 1])}
    return {"class_weights": best_class_weights(y, probabilities)}


def decided_macro_f1(y: np.ndarray, probabilities: np.ndarray, search: bool) -> float:
    """Macro F1 of the probabilities answered by the best decision for these rows (argmax where not
    searched): what a family's tuned decision would make of them. Counted directly, not through
    tasks.evaluate's full metrics (10 classes' ROC AUC each call), since ensemble selection asks it
    a hundred times a fold."""
    from maas.bundle import decide

    predicted = decide(probabilities, best_decision(y, probabilities) if search else None)
    return float(macro_f1_columns(y, predicted[:, None], probabilities.shape[1])[0])


def sibling_folds(index: int, reached: int, folds_per_repeat: int) -> list[int]:
    """The other folds of fold `index`'s repeat, among the first `reached`: whatever answers fold
    `index` cross-fitted is chosen on their held-out rows."""
    start = index // folds_per_repeat * folds_per_repeat
    return [other for other in range(start, min(reached, start + folds_per_repeat)) if other != index]


def cross_fitted_scores(y: np.ndarray, outs: list[np.ndarray], probabilities: list[np.ndarray], folds_per_repeat: int,
                        score) -> list[float]:
    """Each fold's score(y, probabilities, decision) at the decision the other folds of its repeat
    chose from their held-out rows: a fold's own labels never set its decision. A fold alone in its
    repeat (a time budget cut the repeat short) is answered by argmax."""
    scores = []
    for index, held in enumerate(probabilities):
        siblings = sibling_folds(index, len(probabilities), folds_per_repeat)
        decision = None
        if siblings:
            decision = best_decision(np.concatenate([y[outs[other]] for other in siblings]),
                                     np.concatenate([probabilities[other] for other in siblings]))
        scores.append(score(y[outs[index]], held, decision))
    return scores


def describe(decision: dict | None, labels: list[str] | None = None) -> str:
    """A decision in a few words: 'argmax', 'P(yes) >= 0.070', 'weights crack 5.21, none 1, scratch 3.62'."""
    if not decision:
        return "argmax"
    if "threshold" in decision:
        second = labels[1] if labels else "second class"
        return f"P({second}) >= {decision['threshold']:.3f}"
    weights = decision["class_weights"]
    names = labels if labels and len(labels) == len(weights) else [f"#{index}" for index in range(len(weights))]
    return "weights " + ", ".join(f"{name} {weight:.3g}" for name, weight in zip(names, weights))

