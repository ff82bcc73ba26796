"""The text encoder's settings searched instead of guessed: the pretrained encoder frozen or
fine-tuned, and then its learning rate and epochs, and the tokens of a text it reads. Fine-tuning
pays on some corpora (+6.6 points of macro F1 on the sentiment set) and not on others (short,
keyword-like texts), and its learning rate decides whether it pays at all, so a run should find out.

Each trial reads a sample of the training texts and is scored on a sample of the validation texts
by a logistic regression refitted on that trial's own embeddings: the way the served variant is
scored (models/text_encoder.served_variant), so a frozen and a fine-tuned trial compare like for
like. The first two trials are the configured settings, frozen and fine-tuned, so the defaults are
always among the candidates; then Optuna's TPE (settings already scored are pruned, not counted).
The whole search ends within `max_seconds`: each fine-tuning trial shortens its schedule to its
share, less the time scoring takes. Trials go to an Optuna journal file, so a
killed search resumes its finished trials and a re-run with the same table reuses them all. The
test rows are never read: only LabelledTexts (train and validation) comes in.

A sample favours the frozen encoder a little (fine-tuning gains more from more texts), so a tie goes
to the cheaper frozen encoder only when it is at least as good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas.studies import finished_trials, journal_storage
from models.text_encoder import FineTuning, LabelledTexts, MeanPooledEncoder

FROZEN, FINE_TUNED = "frozen", "fine-tuned"
LR_RANGE = (1e-5, 1e-4)  # AdamW on a pretrained BERT-sized encoder: above 1e-4 it forgets, below 1e-5 it barely moves
EPOCH_RANGE = (1, 3)
TRIAL_SHARE = 0.25  # of max_seconds, one fine-tuning trial's limit: at least 4 trials fit
MIN_TRIAL_S = 5.0
STUDY_NAME = "text-settings"
MAX_PROPOSALS = 3  # per trial asked for: TPE may re-propose settings already scored (pruned, not counted)  # less left than this: the search stops rather than start a trial it must cut to nothing


@dataclass(frozen=True)
class TextSearch:
    """How the text settings are searched (DataConfig.text_search_*)."""

    trials: int = 8
    max_seconds: float = 600.0
    train_texts: int = 2000
    val_texts: int = 1000
    max_lengths: tuple[int, ...] = (64, 128, 256)
    defaults: FineTuning = field(default_factory=FineTuning)  # the configured settings, tried first
    seed: int = 0


@dataclass(frozen=True)
class TextChoice:
    """The best trial's settings and score, and what the search cost."""

    mode: str
    max_length: int
    encoder_lr: float
    epochs: int
    val_f1: float
    trials: int
    seconds: float

    def describe(self) -> str:
        tuned = f", lr {self.encoder_lr:.1e}, {self.epochs} epoch(s)" if self.mode == FINE_TUNED else ""
        return (f"{self.mode} encoder, max length {self.max_length}{tuned} (validation macro F1 {self.val_f1:.4f} "
                f"on a sample; {self.trials} trial(s), {self.seconds:.0f} s)")


def search_space(trial, search: TextSearch) -> dict[str, Any]:
    """Every suggest call of the search, in one place."""
    settings = {"mode": trial.suggest_categorical("mode", [FROZEN, FINE_TUNED]),
                "max_length": trial.suggest_categorical("max_length", list(search.max_lengths))}
    if settings["mode"] == FINE_TUNED:
        settings["encoder_lr"] = trial.suggest_float("encoder_lr", *LR_RANGE, log=True)
        settings["epochs"] = trial.suggest_int("epochs", *EPOCH_RANGE)
    return settings


def sampled(texts: LabelledTexts, search: TextSearch) -> LabelledTexts:
    """At most train_texts / val_texts of each split, the same rows for every trial."""
    import numpy as np

    rng = np.random.default_rng(search.seed)
    train = rng.permutation(len(texts.train))[:search.train_texts]
    val = rng.permutation(len(texts.val))[:search.val_texts]
    return LabelledTexts([texts.train[row] for row in train], np.asarray(texts.y_train)[train],
                         [texts.val[row] for row in val], np.asarray(texts.y_val)[val])


def refitted_f1(encoder: MeanPooledEncoder, texts: LabelledTexts, max_length: int) -> float:
    """Validation macro F1 of a logistic regression fitted on the encoder's embeddings of the
    training texts (torch, fp32, batches of like lengths)."""
    from models.text_encoder import embeddings, refitted_head_f1, text_tokenizer

    tokenizer = text_tokenizer(max_length)
    return refitted_head_f1(embeddings(encoder, tokenizer, texts.train).cpu().numpy(), texts.y_train,
                            embeddings(encoder, tokenizer, texts.val).cpu().numpy(), texts.y_val)


class TextObjective:
    """One trial: the frozen encoder scored, or the encoder fine-tuned on the sample within its share
    of the time left (search_text_settings starts a trial only with MIN_TRIAL_S left), then scored."""

    def __init__(self, texts: LabelledTexts, search: TextSearch, deadline: float):
        self.texts, self.search, self.deadline = texts, search, deadline
        self.scoring_s = 0.0  # what scoring an encoder took (the first frozen trial): kept out of a trial's fine-tuning

    def seconds_left(self) -> float:
        """Of the search's time, what a trial may still train for: scoring comes after it."""
        return self.deadline - time.monotonic() - self.scoring_s

    def __call__(self, trial) -> float:
        import optuna

        from models.text_encoder import fine_tune, load_encoder, training_device

        settings = search_space(trial, self.search)
        for earlier in finished_trials(trial.study):
            if earlier.params == trial.params:  # TPE re-proposes the frozen encoder's few settings: no new trial
                raise optuna.TrialPruned(f"the settings of trial {earlier.number}")
        if settings["mode"] == FROZEN:
            started = time.monotonic()
            score = refitted_f1(load_encoder().to(training_device()), self.texts, settings["max_length"])
            self.scoring_s = max(self.scoring_s, time.monotonic() - started)
            return score
        tuned = fine_tune(self.texts.train, self.texts.y_train, self.texts.val, self.texts.y_val, FineTuning(
            epochs=settings["epochs"], encoder_lr=settings["encoder_lr"], max_length=settings["max_length"],
            max_seconds=min(self.search.max_seconds * TRIAL_SHARE, self.seconds_left()), seed=self.search.seed))
        trial.set_user_attr("epochs_run", tuned.epochs_run)
        return refitted_f1(tuned.encoder, self.texts, settings["max_length"])


def searched_trials(journal: Path) -> list:
    """The finished trials of the search in `journal`, in order."""
    import optuna

    return finished_trials(optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(journal)))


def search_text_settings(texts: LabelledTexts, search: TextSearch, journal: Path | None = None) -> TextChoice:
    """The best settings found for these texts (see the module's docstring). `journal`: the Optuna
    journal file the trials go to and are resumed from (None: in memory)."""
    import optuna

    started = time.monotonic()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=None if journal is None else journal_storage(journal),
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=search.seed),
                                load_if_exists=True)
    if not study.trials:
        defaults = search.defaults
        length = defaults.max_length if defaults.max_length in search.max_lengths else search.max_lengths[0]
        study.enqueue_trial({"mode": FROZEN, "max_length": length})
        study.enqueue_trial({"mode": FINE_TUNED, "max_length": length, "encoder_lr": defaults.encoder_lr,
                             "epochs": min(max(defaults.epochs, EPOCH_RANGE[0]), EPOCH_RANGE[1])})
    if not study.user_attrs.get("done"):
        objective = TextObjective(sampled(texts, search), search, started + search.max_seconds)
        for _ in range(MAX_PROPOSALS * search.trials):  # repeats are pruned and do not count
            if len(finished_trials(study)) >= search.trials or objective.seconds_left() < MIN_TRIAL_S:
                break
            study.optimize(objective, n_trials=1)
        study.set_user_attr("done", True)  # a re-run takes this choice as it is (and so reuses its export)
    return choice_of(study, time.monotonic() - started)


def choice_of(study, seconds: float) -> TextChoice:
    """The best finished trial; on a tie the frozen one (the same score for less work)."""
    finished = finished_trials(study)
    if not finished:
        raise RuntimeError("the text search finished no trial within its time; raise data.text_search_max_s")
    best = max(finished, key=lambda trial: (trial.value, trial.params["mode"] == FROZEN))
    params = best.params
    return TextChoice(mode=params["mode"], max_length=int(params["max_length"]),
                      encoder_lr=float(params.get("encoder_lr", 0.0)), epochs=int(params.get("epochs", 0)),
                      val_f1=float(best.value), trials=len(finished), seconds=seconds)
