"""The one typed run configuration: embedded defaults, a YAML preset, then CLI flags on top."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maas.errors import MaasInputError

BUILTIN_DATASETS = ("breast_cancer", "digits", "wine", "sentiment")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Which table to learn from and how to split it."""

    dataset: str = Field("breast_cancer",
                         description="built-in name or a table file (CSV/TSV/JSON, also compressed; Parquet; Excel)")
    target: str | None = Field(None, description="target column (built-ins: 'target')")
    sheet: str | int = Field(0, description="an Excel dataset's sheet: its name, or its position from 0")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    min_rows_per_class: int = Field(10, ge=3)
    rare_classes: Literal["drop", "error"] = Field(
        "drop", description="a class with fewer than min_rows_per_class rows: its rows dropped with a warning "
                            "(the model never predicts it), or the run refused; refused too with under two classes left")
    max_category_levels: int = Field(50, ge=2, description="a category keeps this many of its most frequent "
                                     "training values, the rest read as one unknown value; with more distinct "
                                     "values than half the rows it is dropped as ID-like")
    max_unparsable_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="stray strings a numeric column may hold (coerced to NaN)"
    )
    text_columns: list[str] = Field(
        default_factory=list, description="columns read as free text (sentence embeddings of the pretrained "
                                          "encoder); others are found by text_min_words")
    merge_label_spellings: bool = Field(True, description="target labels that differ only in case or surrounding "
                                        "spaces ('Yes', 'yes ') are one class")
    text_min_words: float = Field(4.0, gt=0, description="a string column whose values average this many words "
                                  "and are mostly distinct is read as text, not as categories")
    text_max_length: int = Field(128, ge=8, le=512, description="tokens of a text the encoder reads; longer texts "
                                 "are truncated (said in /metadata)")
    text_encoder_precision: Literal["int8", "fp32"] = Field(
        "int8", description="the encoder's weights: int8 embeds ~2x faster at cosine 0.99 to fp32; the heads "
                            "are fitted on the embeddings of the encoder that serves")
    text_finetune_epochs: int = Field(0, ge=0, le=20, description="0: the pretrained encoder as it is; N: first "
                                      "fine-tuned N epochs on the training rows' texts and labels (a linear head, the "
                                      "epoch best on validation kept); on sentiment 2 epochs took F1 from 0.69 to 0.76")
    text_finetune_lr: float = Field(3e-5, gt=0, le=1e-2, description="the encoder's learning rate when fine-tuned "
                                    "(AdamW, decaying linearly to 0; the head's is 1e-3)")
    text_search_trials: int = Field(0, ge=0, le=100, description="0: the text settings as configured; N: frozen "
                                    "or fine-tuned, the learning rate, the epochs and the max length searched in N "
                                    "trials on a sample of the texts (the configured ones tried first), the best "
                                    "then used")
    text_search_max_s: float = Field(600, ge=10, description="the text search ends within this; under a run budget "
                                     "at most a third of the 'text' stage's share")
    text_search_texts: int = Field(2000, ge=20, description="training texts each trial of the text search reads "
                                   "(and half as many validation texts it is scored on)")
    text_finetune_max_s: float = Field(1800, gt=0, description="fine-tuning, and then distillation, each shorten their "
                                       "schedule to end within this; under a run budget (budget.time_s) at most half "
                                       "the 'text' stage's share each")
    text_student_layers: int = Field(3, ge=0, le=5, description="with fine-tuning: a student keeping this many of "
                                     "the 6 layers, distilled from the fine-tuned encoder (as many epochs), serves "
                                     "when its validation F1 is within text_student_tolerance (about 2x faster at 3); "
                                     "0: the fine-tuned encoder serves")
    text_student_tolerance: float = Field(0.01, ge=0, le=0.2, description="validation macro F1 the student may "
                                          "lose against the fine-tuned encoder and still serve")
    extra_paths: list[str] = Field(
        default_factory=list,
        description="CSV/Parquet files of more rows (same columns and target), appended before the split; "
                    "the monitor's retraining passes labelled production rows this way",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must be below 0.8")
        return self

    @property
    def is_builtin(self) -> bool:
        return self.dataset in BUILTIN_DATASETS

    @property
    def short_name(self) -> str:
        """A name for experiments and registered models: the built-in name or the table file's name."""
        if self.is_builtin:
            return self.dataset
        from maas.tables import table_name  # here, not at import: it brings pandas, which a config does not need

        # a file 'R&D sales: v2.csv' names its model 'maas-R-D sales- v2', one MLflow and Prefect take
        return NAME_BANNED.sub("-", table_name(Path(self.dataset)))


FamilyName = Literal["network", "mlp", "cnn", "hgb", "linear", "svm"]


class ModelConfig(Section):
    """Model families and the networks' shape hyperparameters (see models/)."""

    family: Literal["auto", "mlp", "cnn", "hgb", "linear", "svm"] = Field(
        "auto", description="auto: compare `families` by cross-validation and keep the best; else that family alone"
    )
    families: list[FamilyName] = Field(
        default_factory=lambda: ["network", "hgb", "linear", "svm"], min_length=1,
        description="candidates of family auto; network: cnn for image-like data (digits), else mlp; "
                    "svm: only on tables of up to selection.kernel_max_rows train + validation rows",
    )
    hidden_sizes: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    cnn_channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=3)

    @model_validator(mode="after")
    def _positive_widths(self) -> ModelConfig:
        for name in ("hidden_sizes", "cnn_channels"):
            if any(width < 1 for width in getattr(self, name)):
                raise ValueError(f"{name} entries must be positive integers")
        return self


class TrainConfig(Section):
    """Optimisation of one network: AdamW, mini-batches, early stopping on validation loss."""

    max_epochs: int = Field(150, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(15, ge=1, description="epochs without val-loss improvement before stop")
    max_seconds: float | None = Field(None, gt=0, description="stop after the epoch that passes this (set by budget)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0: one for small networks "
                         "(their ops are too small to split: a second thread only spins), else torch's default")


class Range(Section):
    """A numeric interval to search; log scale for rates spanning decades."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class MLPSearchSpace(Section):
    """What tuning may change for the tabular MLP: optimiser and shape."""

    lr: Range = Range(low=1e-4, high=3e-2, log=True)
    weight_decay: Range = Range(low=1e-6, high=1e-2, log=True)
    dropout: Range = Range(low=0.0, high=0.5)
    batch_size: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    width: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1)
    depth: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)


class CNNSearchSpace(Section):
    """What tuning may change for the small CNN: optimiser, channels (c, 2c) and head width."""

    lr: Range = Range(low=1e-4, high=3e-2, log=True)
    weight_decay: Range = Range(low=1e-6, high=1e-2, log=True)
    dropout: Range = Range(low=0.0, high=0.5)
    batch_size: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    width: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    channels: list[int] = Field(default_factory=lambda: [8, 16, 32], min_length=1)


class TuningConfig(Section):
    """The Optuna study: sampler, pruner, budget, storage, objectives and search spaces."""

    enabled: bool = True
    n_trials: int | None = Field(20, ge=1, description="finished trials the study should hold")
    timeout_s: float | None = Field(None, gt=0)
    n_jobs: int = Field(1, ge=1, le=64, description="parallel trials (threads; GIL-bound: 1.33x on 2 cores)")
    workers: int = Field(1, ge=1, le=64, description="processes running trials of the study: the run's own and "
                         "workers-1 started beside it, each with cores/workers threads (tasks/tune_workers.py)")
    remote_workers: bool = Field(False, description="`maas tune-worker` processes on other hosts may join the study "
                                 "(with a storage they reach, e.g. PostgreSQL); the run waits for their trials")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    objectives: list[Literal["f1_macro", "size", "latency"]] = Field(
        default_factory=lambda: ["f1_macro"], min_length=1
    )
    pareto_pick: Literal["best_quality", "smallest", "fastest"] = Field(
        "fastest", description="multi-objective: which Pareto trial within quality_tolerance wins"
    )
    quality_tolerance: float = Field(0.005, ge=0, le=1, description="F1 a Pareto pick may give up")
    max_epochs: int = Field(60, ge=1, description="per trial")
    sample_rows: int | None = Field(20_000, ge=100, description="trials train on a stratified sample of at most "
                                    "this many training rows (the final training uses all), at the default budget (9 min; "
                                    "budget.time_s scales it in proportion, down to 2,000); null: all rows")
    patience: int = Field(10, ge=1, description="per trial")
    storage: str | None = Field(None, description="SQLAlchemy URL; default SQLite in MAAS_HOME")
    study_name: str | None = Field(None, description="default: the experiment name")
    heartbeat_interval_s: int = Field(30, ge=1)
    grace_period_s: int | None = Field(None, ge=1, description="default: 2x heartbeat interval")
    max_retry: int = Field(1, ge=0, description="reruns of a trial whose process died")
    max_failures: int = Field(10, ge=1, description="failed trials in a row before giving up")
    grid_points: int = Field(3, ge=2, description="values per numeric range for the grid sampler")
    min_gain_se: float = Field(
        2.0, ge=0, description="the best trial replaces the configured settings only if its validation F1 beats "
                               "the baseline trial's by more than this many standard errors; 0: always the best",
    )
    mlp: MLPSearchSpace = Field(default_factory=MLPSearchSpace)
    cnn: CNNSearchSpace = Field(default_factory=CNNSearchSpace)

    @property
    def in_processes(self) -> bool:
        """Trials of the study run in more than one process (tuning.workers, maas tune-worker), which
        coordinate through the study's storage."""
        return self.workers > 1 or self.remote_workers

    @model_validator(mode="after")
    def _budget_and_objectives(self) -> TuningConfig:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("set n_trials, timeout_s or both")
        if self.n_jobs > 1 and self.in_processes:
            raise ValueError("set n_jobs (threads) or workers / remote_workers (processes), not both")
        if self.objectives[0] != "f1_macro" or len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives start with f1_macro, then optionally size and/or latency, once each")
        return self


VARIANT_NAMES = ("fp32", "pruned", "structured", "int8", "distilled")


class CompressionConfig(Section):
    """Which variants of the trained network to build, and how hard to compress each."""

    variants: list[Literal["fp32", "pruned", "structured", "int8", "distilled"]] = Field(
        default_factory=lambda: list(VARIANT_NAMES), min_length=1,
        description="fp32 is the reference and is always built",
    )
    sparsity: float = Field(0.75, gt=0, lt=1, description="pruned: share of weights set to zero")
    keep_units: float = Field(0.5, gt=0, lt=1, description="structured: share of hidden units/channels kept")
    student_scale: float = Field(0.25, gt=0, lt=1, description="distilled: student width vs teacher")
    student_dropout: float = Field(0.0, ge=0, lt=1, description="distilled: the soft targets already regularize")
    temperature: float = Field(4.0, gt=0, description="distilled: softening of the teacher's outputs")
    alpha: float = Field(0.7, ge=0, le=1, description="distilled: weight of the teacher's loss vs the labels'")
    finetune_epochs: int = Field(30, ge=1, description="pruned/structured: fine-tune budget (early-stopped)")
    finetune_lr_scale: float = Field(0.3, gt=0, le=1, description="fine-tune lr = train.lr x this")
    int8_calibration_rows: int = Field(512, ge=1, description="int8: training rows that calibrate the activation ranges")
    int8_ops: list[Literal["MatMul", "Gemm", "Conv"]] = Field(
        default_factory=lambda: ["MatMul", "Gemm"],
        description="ONNX ops ORT quantizes; Conv is left out (ConvInteger was slower here)",
    )

    @field_validator("variants")
    @classmethod
    def _fp32_first(cls, variants: list[str]) -> list[str]:
        return list(dict.fromkeys(["fp32", *variants]))  # the reference first, no repeats


class SelectionConfig(Section):
    """Which variant wins: the policy, the tolerance it may trade, and hard limits."""

    policy: Literal["best_quality", "fastest", "smallest"] = Field(
        "fastest", description="among variants within tolerance of the best F1"
    )
    tolerance: float = Field(0.005, ge=0, le=1, description="macro F1 a faster/smaller variant may give up")
    speed_tolerance: float = Field(0.1, ge=0, lt=1, description="fastest: rows/s this close to the top count as a tie")
    max_latency_ms: float | None = Field(None, gt=0, description="batch-1 p99 limit")
    max_size_bytes: int | None = Field(None, gt=0)
    cv_folds: int = Field(5, ge=2, le=20, description="stratified folds comparing the model families")
    cv_repeats: int = Field(2, ge=1, le=10, description="repeats of the folds on tables under repeat_below_rows")
    repeat_below_rows: int = Field(5000, ge=0, description="train+validation rows under which folds are repeated")
    time_budget_s: float = Field(60.0, gt=0, description="per family: its study and its cross-validation")
    family_trials: int = Field(10, ge=1, description="Optuna trials per scikit-learn family (the first: its defaults)")
    sample_rows: int | None = Field(20_000, ge=100, description="the families are compared on a stratified sample "
                                    "of at most this many train + validation rows, at the default budget (budget.time_s "
                                    "scales it in proportion, down to 2,000); null: all rows")
    ensemble: bool = Field(True, description="also score the soft vote of the compared families")
    vote_weights: Literal["equal", "fitted", "auto"] = Field(
        "auto", description="the vote's weights: equal, fitted by ensemble selection on the families' held-out "
        "probabilities (scored cross-fitted), or auto: both, the one with the higher CV mean kept")
    vote_margin_se: float = Field(2.0, ge=0, le=10, description="keep the vote over the family chosen when that "
                                  "family's CV lead over it is within this many standard errors of their fold-by-fold "
                                  "differences (0: the best mean alone decides)")
    vote_members_se: float | None = Field(None, ge=0, le=10, description="the vote averages only the families the "
                                          "best one leads by no more than this many standard errors of their "
                                          "fold-by-fold differences (null: every family)")
    kernel_max_rows: int = Field(5000, ge=100, description="family auto leaves the kernel SVM out above this many "
                                 "train + validation rows, the rows a winner is fitted on (its fit grows with the square of the rows)")
    family_tolerance: float = Field(0.0, ge=0, le=1, description="CV macro F1 a simpler family may give up "
                                    "(linear, then hgb, then the network)")
    tune_decision: bool = Field(True, description="answer by a tuned decision (two classes: a cut on the second "
                                "class's probability; unequal classes: a weight per class) where, cross-fitted, it "
                                "raises a family's CV macro F1 by 0.005 or more; off: the likelier class")


ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$"  # MLflow's alias names, 255 characters at most


def checked_alias(alias: str) -> str:
    """An alias MLflow takes: letters, digits, _ and -, and not one it reserves ('latest', 'v3')."""
    if not re.fullmatch(ALIAS_PATTERN, alias):
        raise ValueError(f"alias '{alias[:60]}': letters, digits, _ and - only (255 at most), starting with a letter or _")
    if alias.lower() == "latest" or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise ValueError(f"alias '{alias}' is reserved by MLflow")
    return alias


# Characters a name may not hold: MLflow's registered models refuse '/' and ':', Prefect's
# deployments (named after the model) '/', '%', '&', '<' and '>'.
NAME_BANNED = re.compile(r"[/:%&<>]")


class RegistryConfig(Section):
    """Where the winner is registered, and the gate it must pass to become champion."""

    model_name: str | None = Field(None, description="default: maas-<dataset>")
    champion_alias: str = Field("champion", pattern=ALIAS_PATTERN)
    challenger_alias: str = Field("challenger", pattern=ALIAS_PATTERN)
    gate_metric: Literal["f1_macro", "accuracy", "roc_auc", "precision_macro", "recall_macro"] = "f1_macro"
    min_improvement: float = Field(0.0, ge=0, le=1, description="the challenger must beat the champion by more")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or NAME_BANNED.search(name)):
            raise ValueError("a model name may not be empty nor hold / : % & < > (MLflow's and Prefect's names refuse them)")
        return name

    @model_validator(mode="after")
    def _aliases(self) -> RegistryConfig:
        checked_alias(self.champion_alias)
        checked_alias(self.challenger_alias)
        if self.champion_alias == self.challenger_alias:
            raise ValueError("champion_alias and challenger_alias must differ")
        return self


class PriceConfig(Section):
    """What a tier costs a key per month: a base price, the rows it includes, and a price per 1,000
    rows past those. Decimal, so a bill is exact to the cent."""

    monthly_base: Decimal = Field(Decimal("0"), ge=0, description="per key and month, even with no use")
    included_rows: int = Field(0, ge=0, description="rows in the base price")
    per_1k_rows: Decimal = Field(Decimal("0"), ge=0, description="per 1,000 rows past included_rows")
    currency: str = Field("USD", pattern="^[A-Z]{3}$")


class TierConfig(Section):
    """One service level: how fast and how much a key of this tier may call, and its price."""

    requests_per_minute: int = Field(..., ge=1)
    monthly_rows: int = Field(..., ge=1)
    price: PriceConfig = Field(default_factory=PriceConfig)
    model: str | None = Field(None, description="alias (or NAME@ALIAS, NAME/VERSION) this tier is served from, "
                                                "e.g. challenger; default: the service's model")


class TLSConfig(Section):
    """HTTPS for the service: a certificate and its key, PEM files on the serving host."""

    certfile: str | None = Field(None, description="PEM certificate (chain); with keyfile, the service answers on https")
    keyfile: str | None = Field(None, description="PEM private key of certfile")

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("needs both certfile and keyfile, or neither")
        return self

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


CORS_ORIGIN = re.compile(r"^https?://[^/\s?#]+/?$")


class CorsConfig(Section):
    """Which web pages may call the service from a browser (CORS). Off by default: a browser then
    refuses a page on another origin the answers. A key in a page is visible to its users: give such
    a page a key of a tier whose limits fit, or call the service from the page's own server."""

    allow_origins: list[str] = Field(default_factory=list, description="origins whose pages may call the "
                                     "service, e.g. https://app.example.com (scheme, host, port); '*': any page")
    allow_credentials: bool = Field(False, description="let pages send cookies or HTTP authentication with their "
                                    "calls (not with '*'); API keys travel in headers and need no credentials")
    max_age_s: int = Field(600, ge=0, le=86_400, description="how long a browser may cache the answer to its "
                           "preflight request")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and "*" in origin:
                raise ValueError(f"'{origin}': an origin is matched as written, so name each one "
                                 "(https://a.example.com, https://b.example.com), or '*' for any page")
            if origin != "*" and not CORS_ORIGIN.match(origin):
                raise ValueError(f"'{origin}' is not an origin: scheme and host (and port), no path, "
                                 "e.g. https://app.example.com, or '*'")
        return [origin.rstrip("/") for origin in origins]

    @model_validator(mode="after")
    def _no_credentials_for_any_page(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials needs the origins named: with '*' any page could call with "
                             "its visitors' credentials")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


class PrivacyConfig(Section):
    """What the prediction log keeps of callers' inputs (Presidio's anonymizers, per column), applied
    before a row is written; and how long logged inputs are kept."""

    columns: dict[str, Literal["keep", "drop", "hash", "mask", "encrypt"]] = Field(
        default_factory=dict, description="column -> keep | drop | hash (HMAC-SHA256 with a secret salt) | "
        "mask (all but the last 4 characters) | encrypt (AES-256-GCM, with a key from the environment)")
    default: Literal["keep", "drop", "hash", "mask", "encrypt"] = Field("keep", description="policy of a column "
                                                                        "not named in columns")
    hash_salt_env: str = Field("MAAS_LOG_HASH_SALT", description="environment variable holding the hash policy's salt")
    encryption_key_env: str = Field("MAAS_LOG_ENCRYPTION_KEY", description="environment variable holding the "
                                    "encrypt policy's key: 32 url-safe base64 bytes (cryptography.fernet.Fernet.generate_key())")
    retention_days: float | None = Field(None, gt=0, description="logged inputs older than this are purged by the "
                                         "monitoring flow (and `maas purge`); usage counts stay")

    def policy(self, column: str) -> str:
        return self.columns.get(column, self.default)

    @property
    def active(self) -> bool:
        return self.default != "keep" or any(policy != "keep" for policy in self.columns.values())


class ServingConfig(Section):
    """The prediction service: which model, limits, auth, tiers, and the prediction log."""

    model: str | None = Field(None, description="NAME, NAME@ALIAS or NAME/VERSION; default maas-<dataset>@champion")
    build_bento: bool = Field(True, description="training ends by packaging a newly promoted champion as a Bento")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    auth: bool = Field(True, description="false: no API keys (local development only)")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger bodies get 413")
    max_rows_per_request: int = Field(1000, ge=1)
    strict_columns: bool = Field(False, description="true: a column the model does not read is a 400; false: it "
                                 "is ignored and named in the X-Maas-Ignored-Columns header")
    workers: int = Field(0, ge=0, description="service processes, 0: one per core (2 here: +50% rows/s against 1, "
                         "client on the same cores); tier limits hold across them")
    max_batch_size: int = Field(512, ge=1, description="adaptive batching: rows per model call at most")
    model_threads: int = Field(1, ge=0, description="ONNX Runtime threads per model call; 0: one per core")
    trace_predictions: bool = Field(False, description="an OpenTelemetry span per /predict request; BentoML records "
                                    "them even with no exporter, at ~half the service's CPU per one-row request")
    access_log: bool = Field(True, description="BentoML's access log line per request, written once per "
                                "event-loop turn (off: ~10% more one-row rows/s at concurrency 32)")
    reload_interval_s: float = Field(30.0, gt=0, description="maas serve: when an alias moves, the new version "
                                     "answers within this many seconds, without a restart")
    limits_backend: Literal["local", "redis"] = Field("local", description="where tier rate limits and monthly "
                                                      "quotas are counted: local (this server's workers) or redis "
                                                      "(every replica that names the same redis_url and prefix)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="limits_backend redis: the server (a password "
                           "in it is redacted from logs and MLflow params)")
    limits_prefix: str = Field("maas:limits:", min_length=1, description="limits_backend redis: the key prefix, one per "
                               "service whose replicas share limits")
    tls: TLSConfig = Field(default_factory=TLSConfig)
    public_endpoints: list[Literal["/metadata", "/metrics"]] = Field(
        ["/metadata", "/metrics"], description="answered without a key; leave one out and it needs a key "
        "(/metadata: scope predict, /metrics: read:usage or admin). Health checks are always public")
    key_rotation_grace_s: float = Field(86_400, ge=0, description="maas keys rotate: how long the old secret keeps "
                                        "working next to the new one")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    keep_alive_s: int = Field(75, ge=1, description="maas serve: an idle keep-alive connection is closed after this "
                              "many seconds; longer than clients keep theirs (httpx 5 s, nginx upstreams 60 s), so the "
                              "server never closes a connection as a client reuses it (a reset, not an answer)")
    prediction_log_sample: float = Field(1.0, ge=0, le=1, description="share of requests logged for monitoring")
    prediction_log_rows_per_minute: int | None = Field(
        6000, ge=1, description="rows of inputs each service worker logs per minute at most (bursts up to a "
        "minute's worth are logged whole; past it, a sample); null: every sampled request. Usage and bills count "
        "every request either way")
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {
        "free": TierConfig(requests_per_minute=60, monthly_rows=100_000),
        "pro": TierConfig(requests_per_minute=6000, monthly_rows=100_000_000,
                          price=PriceConfig(monthly_base=Decimal("49.00"), included_rows=1_000_000,
                                            per_1k_rows=Decimal("0.02"))),
    })


class DriftConfig(Section):
    """Data drift of logged inputs against the training reference kept in the model bundle."""

    psi_threshold: float = Field(0.2, gt=0, description="a feature drifted: PSI above this (and KS agrees)")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="the KS test (numbers) or chi-square test (categories) "
                            "must also reject at this level")
    max_bins: int = Field(10, ge=2, le=50, description="PSI bins at most (reference quantiles)")
    min_rows_per_bin: int = Field(25, ge=1, description="fewer bins for small samples: PSI is biased up by sparse bins")
    alert_share: float = Field(0.1, gt=0, le=1, description="alert when at least this share of features drifted")
    min_rows: int = Field(50, ge=1, description="fewer logged rows than this: drift is not judged")
    reference_rows: int = Field(2000, ge=100, description="training rows per feature kept as the reference sample")
    judge_recent_dates: bool = Field(False, description="count a date column whose logged dates are newer than "
                                     "training's as drifted (default: time moved on; reported, not counted)")


class MonitoringConfig(Section):
    """The monitoring flow: what it watches, its thresholds, whom it tells, and what it may do."""

    model: str | None = Field(None, description="NAME@ALIAS to watch; default maas-<dataset>@champion")
    experiment: str | None = Field(None, description="MLflow experiment of the checks; default <experiment>-monitoring")
    drift: DriftConfig = Field(default_factory=DriftConfig)
    labels_path: str | None = Field(None, description="ground truth (a table file as for training): request_id, label, row")
    quality_window_hours: float = Field(168, gt=0, description="labelled predictions this recent count for live quality")
    min_labelled_rows: int = Field(30, ge=1, description="fewer labelled rows: live quality is not judged")
    max_quality_drop: float = Field(0.05, ge=0, le=1, description="alert when live F1 is this far below test F1")
    quality_confidence: float = Field(0.99, gt=0.5, lt=1, description="and when live F1's upper bound at this "
                                      "confidence (bootstrap over the labelled rows) is below test F1 too, as "
                                      "drift's tests reject at 0.01")
    metrics_url: str | None = Field(None, description="the service's /metrics, e.g. http://127.0.0.1:3000/metrics")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="alert above this share of 5xx answers")
    max_p99_ms: float = Field(1000, gt=0, description="alert above this p99 request latency")
    notify_block: str | None = Field(None, description="Prefect notification block 'type-slug/name' for alerts")
    retrain: bool = Field(True, description="drift or quality decay triggers a run of the training deployment")
    retrain_deployment: str | None = Field(None, description="default maas-train/<model name>-train")
    append_labelled: bool = Field(False, description="retrain with the labelled production rows appended")
    rollback: bool = Field(True, description="a new champion worse live than the one it replaced is rolled back")
    rollback_margin: float = Field(0.02, ge=0, le=1, description="F1 the old champion must lead by, same rows")

    @field_validator("metrics_url")
    @classmethod
    def _metrics_url(cls, url: str | None) -> str | None:
        # a typo here read as "the service did not answer", check after check, and alerted once
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError("not an http(s) URL, e.g. http://127.0.0.1:3000/metrics")
        return url


class ScheduleConfig(Section):
    """Cron schedules of the Prefect deployments that `maas schedule` serves."""

    train_cron: str = Field("0 3 * * 1", description="training: Mondays 03:00")
    monitor_cron: str = Field("0 * * * *", description="monitoring: hourly")
    timezone: str = "UTC"

    @field_validator("train_cron", "monitor_cron")
    @classmethod
    def _cron(cls, expression: str) -> str:
        # The shape only (five fields); Prefect parses the rest when `maas schedule` registers it.
        # Importing Prefect's parser here would cost every command 2 s.
        if not re.fullmatch(r"\s*(\S+\s+){4}\S+\s*", expression) or not re.fullmatch(r"[\d*/,\-A-Za-z?LW#\s]+", expression):
            raise ValueError(f"not a five-field cron expression: '{expression}'")
        return expression.strip()


class TrackingConfig(Section):
    """MLflow experiment naming."""

    experiment: str | None = Field(None, description="default: maas-<dataset>")


class BudgetConfig(Section):
    """One time budget for the run, split across tuning, families, training and compression (maas/budget.py)."""

    time_s: float | None = Field(540.0, gt=0, description="seconds for the whole run (maas run --budget 10m); "
                                 "null: unbounded. 9 minutes bounds a 200k-row table near 10 and leaves the "
                                 "built-ins (under 2 minutes) as they were; the tuning and families' samples "
                                 "grow in proportion to a larger budget")


class RunConfig(Section):
    """Everything one training run needs; each stage reads only its own section."""

    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"maas-{self.data.short_name}"

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"maas-{self.data.short_name}"

    @property
    def monitoring_experiment(self) -> str:
        return self.monitoring.experiment or f"{self.experiment_name}-monitoring"

    @property
    def train_deployment(self) -> str:
        """'flow/deployment' of the training deployment for this model (see deployments/schedules.py)."""
        return self.monitoring.retrain_deployment or f"maas-train/{self.model_name}-train"


def _describe_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first bad field, what was given and what is allowed."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        parent = _section_for(first["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{source}: unknown field '{field}'; allowed here: {allowed}"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{source}: {field}: {message}{shown}"


def _section_for(location: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the fields at a location, for listing allowed keys. A mapping
    section (serving.tiers) is walked through its keys: serving.tiers.pro is a TierConfig."""
    model: type[BaseModel] = RunConfig
    parts = list(location)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        annotation = field.annotation if field else None
        if get_origin(annotation) is dict and parts:
            parts.pop(0)  # the key, e.g. the tier's name
            annotation = get_args(annotation)[1]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """'train.lr=0.01' -> (['train', 'lr'], 0.01); the value is read as YAML (numbers, lists)."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key.strip():
        raise MaasInputError(f"--set: expected key=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value  # not YAML (a cron expression such as */5 * * * *): the text itself; the field checks it
    return key.strip().split("."), value


def _apply_override(tree: dict, path: list[str], value: Any, assignment: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        within = tuple(path[: depth + 1])
        if _section_for(within) is None and not _is_mapping_section(within):
            raise MaasInputError(f"--set {assignment}: '{'.'.join(within)}' is not a config section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MaasInputError(f"--set {assignment}: '{'.'.join(within)}' is not a config section")
    node[path[-1]] = value


def _is_mapping_section(location: tuple) -> bool:
    """A field holding a mapping of sections (serving.tiers), which --set may reach into by key."""
    owner = _section_for(location[:-1])
    field = owner.model_fields.get(str(location[-1])) if owner else None
    return field is not None and get_origin(field.annotation) is dict


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """base with update laid over it, section by section (update's scalars and lists win)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    config_path: str | Path | None = None,
    dataset: str | None = None,
    target: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Build the run config: defaults < YAML file < --dataset/--target < --set key=value."""
    tree: dict[str, Any] = RunConfig().model_dump()
    source = "config"
    if config_path is not None:
        path = Path(config_path)
        source = str(path)
        if not path.is_file():
            raise MaasInputError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MaasInputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise MaasInputError(f"{path}: expected a mapping of config sections at the top")
        tree = _deep_merge(tree, loaded)
    if dataset is not None:
        tree.setdefault("data", {})["dataset"] = dataset
    if target is not None:
        tree.setdefault("data", {})["target"] = target
    for assignment in overrides or []:
        path_parts, value = parse_override(assignment)
        _apply_override(tree, path_parts, value, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise MaasInputError(_describe_validation_error(exc, source)) from None
