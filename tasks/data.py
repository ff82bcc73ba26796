"""Data prep: load a table, validate it, split it, fit preprocessing on the training rows only."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import train_test_split

from maas.budget import Budget
from maas.bundle import (DATE_PARTS, ENCODER_NAME, EPOCH, as_texts, attach, blank, date_example, date_parts,
                         dates_as_days, formatted_number, formatted_numbers, hours_of_day, is_boolean, spelt_alike,
                         text_encoder, transform)
from maas.config import BUILTIN_DATASETS, DataConfig
from maas.errors import MaasInputError
from maas.orchestration import retry_unless_input_error
from maas.paths import encoders_home
from maas.run_context import StageTimer, run_logger
from maas.tables import (DECIMAL_COMMA, MODEL_IGNORED, REPEATED_NAMES, SKIPPED_LINES, SPACED_FIELDS, listing,
                         local_path, read_table_file)

BUILTIN_TARGET = "target"
MIN_ROWS_FOR_ID_CHECK = 20  # below this, all-unique columns are too common to call IDs
# A string column with more distinct values than this share of rows names rows (emails, titles), not
# groups of them; below it, a many-valued category (cities, products) keeps its most frequent values.
MOSTLY_DISTINCT = 0.5
MAX_CODES = 10  # distinct strings a column of numbers may hold as codes (few_codes)
# A string column is read as dates when its values start as ISO 8601 dates do, or when they all read
# in one of the forms below (a time may follow). "2024" alone is a number. 03/12/2026 is March or
# December depending on the writer: a column's own values decide (a 13th of a month, or a month 13,
# tells); where none does, the column is left alone with a note, not guessed.
ISO_DATE_START = r"^\s*\d{4}-\d{2}-\d{2}"
DATE_FORMS = [  # (format, the same with day and month swapped, or None when the form has one reading)
    ("%m/%d/%Y", "%d/%m/%Y"), ("%d-%m-%Y", "%m-%d-%Y"), ("%m/%d/%y", "%d/%m/%y"), ("%d-%m-%y", "%m-%d-%y"),
    ("%d.%m.%Y", None), ("%d.%m.%y", None), ("%Y/%m/%d", None), ("%Y.%m.%d", None),
    ("%d %b %Y", None), ("%d-%b-%Y", None), ("%d-%b-%y", None), ("%b %d, %Y", None), ("%b %d %Y", None),
    ("%d %B %Y", None), ("%B %d, %Y", None), ("%B %d %Y", None),
]
DATE_TIMES = ["", " %H:%M", " %H:%M:%S", " %I:%M %p", " %I:%M:%S %p"]
DATE_LIKE = (r"^(?:\d{1,4}[./-]\d{1,2}[./-]\d{2,4}|\d{1,2}[ -][A-Za-z]{3,9}\.?[ -]\d{2,4}|[A-Za-z]{3,9}\.? \d{1,2},? \d{4})"
             r"(?: \d{1,2}:\d{2}(?::\d{2})?(?: ?[AaPp][Mm])?)?$")
FORMAT_SAMPLE = 2_000  # values a column's date or number format is found on, before all are read in it


@dataclass
class RawTable:
    """A loaded table before validation, with what is known about where it came from."""

    frame: pd.DataFrame
    target: str
    source: str
    image_shape: tuple[int, int] | None = None


@dataclass
class DataSplits:
    """Raw feature rows per split (preprocessing applies later) and integer-coded labels."""

    x_train: pd.DataFrame
    y_train: np.ndarray
    x_val: pd.DataFrame
    y_val: np.ndarray
    x_test: pd.DataFrame
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainingArrays:
    """Preprocessed train and validation splits: transformed once, reused by every trial and variant."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


class SealedSplitRead(RuntimeError):
    """A stage that chooses (tuning, families, variants) read the test split."""


class SealedSplit:
    """Stands in for the test split in the stages that choose: any use of it raises, so the test
    figures stay an unbiased report of the choice (tests/unit/test_selection.py)."""

    def _refuse(self, *_args, **_kwargs):
        raise SealedSplitRead("the test split is sealed until the chosen model's report")

    __len__ = __iter__ = __getitem__ = __array__ = __bool__ = _refuse

    def __getattr__(self, name: str):
        self._refuse()


@dataclass
class PreparedData:
    """Everything later stages need from the data, and what the model bundle carries."""

    splits: DataSplits
    labels: list[str]
    target: str
    source: str
    preprocessing: dict[str, Any]
    input_schema: list[dict[str, str]]
    dropped_columns: dict[str, str]
    fingerprint: str
    image_shape: tuple[int, int] | None
    n_rows: int
    notes: list[str] = field(default_factory=list)
    label_type: str = "string"  # the target column's type, which pyfunc answers labels in (label_type_of)

    @cached_property
    def arrays(self) -> TrainingArrays:
        """Train and validation rows through the fitted preprocessing, as the network sees them."""
        splits = self.splits
        return TrainingArrays(transform(splits.x_train, self.preprocessing), splits.y_train,
                              transform(splits.x_val, self.preprocessing), splits.y_val)

    def with_training_sample(self, rows: int | None, seed: int) -> PreparedData:
        """The same data, its training rows cut to a stratified sample of `rows` (itself when it has
        no more than that): trials and family comparisons on large tables train on it."""
        keep = stratified_sample(self.splits.y_train, rows, seed)
        if keep is None:
            return self
        arrays = self.arrays
        copy = replace(self, splits=replace(self.splits, x_train=self.splits.x_train.iloc[keep].reset_index(drop=True),
                                            y_train=self.splits.y_train[keep]))
        copy.__dict__["arrays"] = TrainingArrays(arrays.x_train[keep], arrays.y_train[keep], arrays.x_val, arrays.y_val)
        return copy

    def sealed(self) -> PreparedData:
        """The same data with the test split sealed (SealedSplit), for the stages that choose."""
        splits = replace(self.splits, x_test=SealedSplit(), y_test=SealedSplit())
        copy = replace(self, splits=splits)
        copy.__dict__["arrays"] = self.arrays  # the cached transform, not recomputed
        return copy

    def description(self) -> dict[str, Any]:
        """Where the data came from and what the model takes: data/schema.json on the run."""
        return {"source": self.source, "target": self.target, "labels": self.labels,
                "input_schema": self.input_schema, "dropped_columns": self.dropped_columns,
                "fingerprint": self.fingerprint}

    def summary_params(self) -> dict[str, Any]:
        """Flat facts about the data, for MLflow params."""
        return {
            "data.source": self.source,
            "data.target": self.target,
            "data.fingerprint": self.fingerprint,
            "data.n_rows": self.n_rows,
            "data.n_features_in": len(self.input_schema),
            "data.n_classes": len(self.labels),
            "data.n_train": len(self.splits.x_train),
            "data.n_val": len(self.splits.x_val),
            "data.n_test": len(self.splits.x_test),
            "data.dropped_columns": ",".join(self.dropped_columns) or "-",
            # how each text column is read, as used (a text search may have chosen other than configured)
            **{f"text.{column['name']}.{key}": column[key] for column in self.preprocessing.get("text", [])
               for key in ("encoder", "max_length")},
        }


# --- loading ----------------------------------------------------------------------------------


SENTIMENT_FILE = Path(__file__).resolve().parent.parent / "maas" / "datasets" / "sentiment.csv.gz"


def load_builtin(name: str) -> RawTable:
    """A scikit-learn dataset as a DataFrame whose target holds the class names; or `sentiment`,
    23.6k human-rated sentences (maas/datasets/README.md) with their source as a category."""
    from sklearn import datasets

    if name == "sentiment":
        frame = pd.read_csv(SENTIMENT_FILE).rename(columns={"sentiment": BUILTIN_TARGET})
        return RawTable(frame, BUILTIN_TARGET, name)

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
    }
    if name not in loaders:
        raise MaasInputError(f"unknown dataset '{name}'; built-ins: {', '.join(BUILTIN_DATASETS)}")
    bunch = loaders[name](as_frame=True)
    frame = bunch.frame.copy()
    names = np.asarray([str(label) for label in bunch.target_names], dtype=object)
    frame[BUILTIN_TARGET] = names[frame[BUILTIN_TARGET].to_numpy()]
    image_shape = tuple(bunch.images.shape[1:]) if name == "digits" else None
    return RawTable(frame, BUILTIN_TARGET, name, image_shape)


def missing_column_hint(name: str, frame: pd.DataFrame) -> str:
    """What a missing column's name may have meant: the same name in another case or spacing, a close
    spelling, or a header that is data (every name a number: the file has no header row)."""
    import difflib

    names = [str(column) for column in frame.columns]
    same = spelt_alike(name, names)
    if same is not None:
        return f"; did you mean '{same}'?"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    if len(names) > 1 and all(pd.notna(pd.to_numeric(column, errors="coerce")) for column in names):
        return " (every column name is a number: the file seems to have no header row; add one)"
    if header_is_data(frame):
        return " (the column names look like values of their columns: the file seems to have no header row; add one)"
    return ""


def header_is_data(frame: pd.DataFrame) -> bool:
    """Whether the names pandas took from the first line are a row of data, as in a headerless
    UCI file (`39, State-gov, 77516, ...`): most names are numbers in a numeric column or values found
    in their own column (pandas suffixes a repeated one: '<=50K.1')."""
    if frame.shape[1] < 2:
        return False
    sample = frame.head(1000)
    looks_like_data = 0
    for position, name in enumerate(frame.columns):
        column = sample.iloc[:, position]
        name = str(name).strip()
        if pd.api.types.is_numeric_dtype(column) and pd.notna(pd.to_numeric(name, errors="coerce")):
            looks_like_data += 1
        elif not pd.api.types.is_numeric_dtype(column):
            values = set(column.dropna().astype(str).str.strip())
            looks_like_data += name in values or re.sub(r"\.\d+$", "", name) in values
    return looks_like_data * 2 > frame.shape[1]


def load_table(data: DataConfig) -> RawTable:
    """The configured dataset: a built-in by name, else a file path with a --target column."""
    if data.is_builtin:
        table = load_builtin(data.dataset)
        if data.target not in (None, BUILTIN_TARGET):
            raise MaasInputError(
                f"dataset '{data.dataset}' is built in; its target column is '{BUILTIN_TARGET}', "
                f"not '{data.target}'"
            )
        return table
    path = local_path(data.dataset)
    if path.suffix == "" and not path.exists():
        raise MaasInputError(
            f"unknown dataset '{data.dataset}': not a built-in ({', '.join(BUILTIN_DATASETS)}) "
            "and no such file"
        )
    frame = read_table_file(path, data.sheet, data.target)
    if data.target is None:
        raise MaasInputError(f"{path}: name the target column with --target (columns: {listing(frame.columns)})")
    return RawTable(frame, data.target, str(path))


def append_extra_rows(table: RawTable, extra_paths: list[str]) -> RawTable:
    """The table with the rows of each extra file below it (same columns, target included).

    This is how labelled production rows join a retraining run; a file whose columns differ is
    refused by name rather than silently padded with NaN. Labelled production rows lack the columns
    their model ignored (an ID, a constant: the prediction log never kept them) and say which
    (frame.attrs[MODEL_IGNORED]): those columns leave the whole table, as that training dropped them;
    padded, an ID column with gaps was no longer unique per row and became an input.
    """
    if not extra_paths:
        return table
    extras, ignored = [], set()
    for raw_path in extra_paths:
        path = local_path(raw_path)
        extra = read_table_file(path, column=table.target)
        declared = set(extra.attrs.get(MODEL_IGNORED, ()))
        missing = [name for name in table.frame.columns if name not in extra.columns]
        ignored.update(declared.intersection(missing))
        missing = [name for name in missing if name not in declared]
        unknown = [name for name in extra.columns if name not in table.frame.columns]
        if missing or unknown:
            problem = f"lacks column(s) {listing(missing)}" if missing else f"has unknown column(s) {listing(unknown)}"
            raise MaasInputError(f"{path}: extra rows for {table.source} {problem}")
        extras.append(extra)
    columns = [name for name in table.frame.columns if name not in ignored]
    frames = [table.frame[columns]] + [as_numeric_target(extra[columns], table.frame[table.target], table.target)
                                       for extra in extras]
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs = {**table.frame.attrs, MODEL_IGNORED: sorted(ignored)}
    return RawTable(frame, table.target, f"{table.source}+{len(extra_paths)} extra", table.image_shape)


def as_numeric_target(extra: pd.DataFrame, target: pd.Series, name: str) -> pd.DataFrame:
    """Extra rows whose labels are the model's label strings ('30', as the prediction log's ground
    truth holds them), read as numbers where the table's target is numbers (30.0 in a labels column
    with a gap): else '30' and 30.0 were two classes."""
    if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target) \
            or pd.api.types.is_numeric_dtype(extra[name]):
        return extra
    numbers = pd.to_numeric(extra[name], errors="coerce")
    if numbers[extra[name].notna()].isna().any():  # a word among them: left as it is, a class of its own
        return extra
    return extra.assign(**{name: numbers})


# --- validation and cleaning -------------------------------------------------------------------


class Coerced(NamedTuple):
    """A text column read as numbers: the numbers (NaN where a value was not one), how many values
    were not, and those values as codes (value -> count) where they were few recurring strings."""

    numbers: pd.Series
    n_bad: int
    codes: dict[str, int]


def _coerce_mostly_numeric(column: pd.Series, max_bad_fraction: float) -> Coerced | None:
    """A text column that is numbers but for a few stray strings, or for a few codes ("<5", "unknown",
    "n/a" in a lab value) however often they come -> the numbers, the others as missing. Read as
    categories, such a column kept its 50 most frequent numbers as levels and lost the rest, and
    their order; read so, each row keeps its number, and the missing-value flag its code's absence."""
    filled = ~blank(column)
    present = column[filled]
    if present.empty:
        return None
    parsed = pd.to_numeric(present, errors="coerce")
    n_bad = int(parsed.isna().sum())
    if n_bad == len(present):
        return None
    codes = {}
    if n_bad > max_bad_fraction * len(present):
        codes = few_codes(present[parsed.isna()], len(present))
        if not codes:
            return None
    numbers = np.full(len(column), np.nan)
    numbers[filled] = parsed.to_numpy(dtype=np.float64, na_value=np.nan)  # parsed once; blanks stay missing
    return Coerced(pd.Series(numbers, index=column.index), n_bad, codes)


def few_codes(not_numbers: pd.Series, n_present: int) -> dict[str, int]:
    """The values that are not numbers, by count, where they are at most MAX_CODES distinct strings
    each seen at least twice, in at most half of the column; otherwise {} (a column of categories
    that holds some numbers, say sizes S, M, L, 10, 12)."""
    counts = not_numbers.astype(str).str.strip().value_counts()
    if len(not_numbers) * 2 > n_present or len(counts) > MAX_CODES or counts.min() < 2:
        return {}
    return {str(value): int(count) for value, count in counts.items()}


def coerced_note(name: str, n_bad: int, codes: dict[str, int]) -> str:
    """The run's note on a column read as numbers with `n_bad` values as missing (its codes named)."""
    if not codes:
        return f"column '{name}': {n_bad} non-numeric value(s) coerced to missing"
    named = ", ".join(f"'{code}' x{count}" for code, count in codes.items())
    return f"column '{name}' read as numbers: its {n_bad} values that are not ({named}) read as missing, which a flag feature marks"


def holds_nested_values(column: pd.Series) -> bool:
    """Lists, arrays or mappings in the cells (Parquet keeps them): no single value a model reads."""
    if column.dtype != object:
        return False
    return any(isinstance(value, (list, tuple, dict, set, np.ndarray)) for value in column.dropna().iloc[:1000])


def holds_true_false(column: pd.Series) -> bool:
    """True / False values: a bool column, or one with gaps, which pandas reads as objects. Both are
    categories "True" and "False" (serving reads "TRUE", 1, "yes" as them); before, a gap made the
    column numbers, where a client's "TRUE" was refused and the pyfunc read it as missing."""
    if pd.api.types.is_bool_dtype(column):
        return True
    return column.dtype == object and all(isinstance(value, (bool, np.bool_)) for value in column.dropna())


class Cleaned(NamedTuple):
    features: pd.DataFrame
    dropped: dict[str, str]  # column -> why it was dropped
    coerced: set[str]  # text columns read as numbers, their stray strings as missing values
    texts: list[str] = []  # columns read as free text
    formats: dict[str, dict[str, Any]] = {}  # column -> how its strings were read (number_format, date_format)


def spread_sample(values: pd.Series) -> pd.Series:
    """Up to FORMAT_SAMPLE distinct values, spread over the column: a file sorted by date shows only
    early-month days in its first rows, which read as day/month and as month/day alike."""
    distinct = values.drop_duplicates()
    if len(distinct) <= FORMAT_SAMPLE:
        return distinct
    return distinct.iloc[np.linspace(0, len(distinct) - 1, FORMAT_SAMPLE).astype(int)]


def parsed_share(values: pd.Series, date_format: str) -> float:
    return float(pd.to_datetime(values, errors="coerce", format=date_format).notna().mean())


def find_date_format(present: pd.Series, max_bad_fraction: float, notes: list[str], name: str) -> str | None:
    """The one DATE_FORMS format (with a time or not) the column's strings read in, but for stray
    values; None if none does, or if day and month could be either way round (noted)."""
    sample = spread_sample(present.str.strip())
    enough = 1 - max_bad_fraction
    if sample.empty or sample.str.match(DATE_LIKE).mean() < enough:
        return None
    for form, swapped in DATE_FORMS:
        for time_part in DATE_TIMES:
            shares = {form + time_part: parsed_share(sample, form + time_part)}
            if swapped:
                shares[swapped + time_part] = parsed_share(sample, swapped + time_part)
            best = max(shares, key=shares.get)
            if shares[best] < enough:
                continue
            if len(set(shares.values())) < len(shares):  # every value reads either way round
                notes.append(f"column '{name}': dates such as '{sample.iloc[0]}' read as day/month and as "
                             "month/day alike, so they are left as text; write them as ISO 8601 (2026-03-12)")
                return None
            return best
    return None


class ReadDates(NamedTuple):
    dates: pd.Series  # naive UTC datetimes
    n_bad: int  # unreadable values, now missing
    date_format: str | None  # the file's own format, when not ISO 8601


def read_as_dates(column: pd.Series, max_bad_fraction: float, notes: list[str], name: str) -> ReadDates | None:
    """A datetime column, or strings that are dates (ISO 8601, one of DATE_FORMS throughout, or
    ISO 8601 beside one of them) but for a few stray values; None for any other column."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return None
    empty = blank(column)
    date_format, iso_count = None, 0
    if not pd.api.types.is_datetime64_any_dtype(column):
        present = column[~empty].astype(str)
        if present.empty:
            return None
        iso = present.str.match(ISO_DATE_START)
        if iso.mean() < 1 - max_bad_fraction:
            # Tables merged from two systems write some dates ISO 8601 and the rest in a form of their
            # own: the rest decide that form (and day/month order); serving reads both, as here.
            date_format = find_date_format(present[~iso], max_bad_fraction, notes, name)
            if date_format is None:
                return None
            iso_count = int(iso.sum())
    days = dates_as_days(column, date_format)
    n_bad = int((np.isnan(days) & ~empty).sum())
    if n_bad > max_bad_fraction * max(1, int((~empty).sum())):
        return None
    if date_format and iso_count:
        notes.append(f"column '{name}': dates written two ways, {iso_count} as ISO 8601 and "
                     f"{int((~empty).sum()) - iso_count} as {date_format} ({date_example(date_format)}); both read")
    return ReadDates(pd.Series(EPOCH + pd.to_timedelta(days, unit="D"), index=column.index).dt.round("us"), n_bad,
                     date_format)


def read_as_times(column: pd.Series, max_bad_fraction: float) -> tuple[pd.Series, int] | None:
    """Times of day ("14:30", "2:30 PM", an Excel time cell) as hours since midnight, but for a few
    stray values; None for a column that is not times. Such a column was dropped as ID-like before:
    its distinct strings are many, and pandas reads none as dates."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        return None
    present = column[~blank(column)]
    if present.empty:
        return None
    sample = spread_sample(present)
    if np.isnan([hours_of_day(value) for value in sample]).mean() > max_bad_fraction:
        return None
    hours = pd.Series([hours_of_day(value) for value in column], index=column.index, dtype=np.float64)
    n_bad = int(hours.loc[present.index].isna().sum())
    if n_bad > max_bad_fraction * len(present) or all(isinstance(value, (int, float)) for value in present):
        return None
    return hours, n_bad


class ReadNumbers(NamedTuple):
    numbers: pd.Series
    n_bad: int
    decimal: str


def read_formatted_numbers(column: pd.Series, max_bad_fraction: float, prefer: str = ".") -> ReadNumbers | None:
    """Strings that are numbers written with currency, percent or digit-group marks ("$1,200.50",
    "12.5%", "1.200,50 €"), but for stray values; the decimal mark is the one that reads more of
    them, `prefer` on a tie: "1,200" is twelve hundred, and in a file whose numbers use decimal
    mark ',' "12.500" is twelve thousand five hundred. None when neither reads enough."""
    present = column[~blank(column)]  # numbers among the strings (rows appended from the prediction log) read as numbers
    if present.empty:
        return None
    sample = spread_sample(present)
    enough = 1 - max_bad_fraction
    readable = {decimal: float(np.isfinite(formatted_numbers(sample, decimal)).mean()) for decimal in (".", ",")}
    decimal = max(readable, key=lambda mark: (readable[mark], mark == prefer))
    if readable[decimal] < enough:
        return None
    numbers = pd.Series(formatted_numbers(column, decimal), index=column.index)
    n_bad = int(numbers.loc[present.index].isna().sum())
    return None if n_bad > max_bad_fraction * len(present) else ReadNumbers(numbers, n_bad, decimal)


def dots_in_a_decimal_comma_file(name: str, column: pd.Series, decimal: str) -> list[str]:
    """The note on how a column of plain numbers with dots was read in a file whose decimal mark is ','."""
    dotted = column[column.astype(str).str.contains(".", regex=False) & ~blank(column)]
    if dotted.empty:
        return []
    example = str(dotted.iloc[0]).strip()
    if decimal == ".":
        return [f"column '{name}': numbers written with decimal mark '.' ({example}), unlike the file's ','; read so"]
    return [f"column '{name}': '.' read as the digit-group mark ({example} is {formatted_number(example, ','):.10g}), "
            "the file's decimal mark being ','"]


# A text column may hold a few numbers (a ticket body "404", a cell a spreadsheet typed as a number);
# one whose values are not nearly all strings is not text.
MOSTLY_STRINGS = 0.95


def mean_words(column: pd.Series) -> float:
    """Words per value, on average over the values present; 0 for a column that is not nearly all strings."""
    present = column.dropna()
    sample = present.iloc[:1000]
    if present.empty or sum(isinstance(value, str) for value in sample) < MOSTLY_STRINGS * len(sample):
        return 0.0
    return float(present.astype(str).str.split().str.len().mean())


def holds_scalars(column: pd.Series) -> bool:
    """Numbers or true/false among a text column's values, which training reads as their text."""
    return any(isinstance(value, (int, float, np.number, np.bool_)) and not pd.isna(value) for value in column)


def is_free_text(column: pd.Series, min_words: float) -> bool:
    """Sentences, not categories or codes: values of min_words words on average, mostly distinct."""
    present = column.dropna()
    return mean_words(column) >= min_words and present.nunique() >= 0.5 * len(present)


# Phrases of a few words each (titles, subjects), mostly distinct, are dropped as ID-like below
# `data.text_min_words`; the note on such a column says how to read it as text instead.
PHRASE_WORDS = 2.0


def as_text_hint(column: pd.Series, name: str) -> str:
    """For an ID-like column of phrases, or one of more categories than are kept: how to have it read
    as text; else ''."""
    words = mean_words(column)
    if words < PHRASE_WORDS:
        return ""
    return (f"; its values are phrases of {words:.1f} words on average: to read it as text, "
            f"name it in data.text_columns (--set 'data.text_columns=[{name}]')")


def clean_features(features: pd.DataFrame, data: DataConfig, notes: list[str], keep_all: bool = False,
                   decimal_comma: bool = False) -> Cleaned:
    """Coerce near-numeric text, cast numerics to float, drop unusable columns (with reasons).

    keep_all: keep even constant columns (an image's blank border pixels keep its grid whole).
    decimal_comma: the file wrote its numbers with decimal mark ',' (split by ';'), so its numeric
    columns keep that number format: pandas reads such a file's rows with sep=';' alone as strings
    ("190,4"), which serving must read as training did, not as missing.
    """
    kept: dict[str, pd.Series] = {}
    dropped: dict[str, str] = {}
    coerced_columns: set[str] = set()
    texts: list[str] = []
    formats: dict[str, dict[str, Any]] = {}
    n_rows = len(features)
    unknown = [name for name in data.text_columns if name not in features.columns]
    if unknown:
        named = ", ".join(f"'{name}'" for name in unknown)
        raise MaasInputError(f"data.text_columns names {named}, not among the columns {listing(features.columns)}")
    for name in features.columns:
        column = features[name]
        if column.isna().all():
            dropped[name] = "all values empty"
            continue
        if holds_nested_values(column):
            dropped[name] = "holds lists or mappings, not single values"
            continue
        as_dates = None if name in data.text_columns else read_as_dates(column, data.max_unparsable_fraction, notes, name)
        if as_dates is not None:
            dates, n_bad, date_format = as_dates
            if dates.nunique(dropna=True) <= 1:
                dropped[name] = "constant"
                continue
            kept[name] = dates
            if n_bad:
                coerced_columns.add(name)
            if date_format:
                formats[name] = {"date_format": date_format}
            unreadable = f", {n_bad} unreadable value(s) as missing" if n_bad else ""
            written = f", written as {date_format} ({date_example(date_format)})" if date_format else ""
            notes.append(f"column '{name}' read as dates (days since 1970-01-01 and calendar parts{written}{unreadable})")
            continue
        as_times = None if name in data.text_columns else read_as_times(column, data.max_unparsable_fraction)
        if as_times is not None:
            hours, n_bad = as_times
            if hours.nunique(dropna=True) <= 1:
                dropped[name] = "constant"
                continue
            kept[name], formats[name] = hours, {"time_of_day": True}
            if n_bad:
                coerced_columns.add(name)
            unreadable = f", {n_bad} unreadable value(s) as missing" if n_bad else ""
            notes.append(f"column '{name}' read as times, h:mm[:ss] in hours (14:30 and 2:30 PM are 14.5{unreadable})")
            continue
        if name in data.text_columns or (not pd.api.types.is_numeric_dtype(column)
                                         and is_free_text(column, data.text_min_words)):
            kept[name] = column.astype(object)
            texts.append(name)
            notes.append(f"column '{name}' read as free text ({ENCODER_NAME} sentence embeddings)")
            continue
        integers_from_text = False  # whole numbers that came as text: judged as pandas' integers are, below
        boolean = holds_true_false(column)
        if not pd.api.types.is_numeric_dtype(column) or boolean:
            coerced = None if boolean else _coerce_mostly_numeric(column, data.max_unparsable_fraction)
            # In a file whose numbers use decimal mark ',', pandas leaves "2.3" and "12.500" as text, and
            # plain parsing would read both with '.': right for the first, a thousand times off for the
            # second. So such a column's mark is decided as for marked numbers, ',' on a tie, and kept:
            # before, it read "2.3" as 2.3 in training and serving refused it (and read "12.500" as 12500).
            formatted = None if boolean or (coerced is not None and not coerced[1] and not decimal_comma) else \
                read_formatted_numbers(column, data.max_unparsable_fraction, "," if decimal_comma else ".")
            if formatted is not None and (coerced is None or formatted.n_bad < coerced[1]
                                          or (decimal_comma and formatted.n_bad <= coerced[1])):
                plain = coerced is not None and formatted.n_bad == coerced[1]  # no marks, but for the dots
                if plain:  # whole ones may be an ID, as pandas' integers are
                    integers_from_text = bool((formatted.numbers.dropna() % 1 == 0).all())
                    notes.extend(dots_in_a_decimal_comma_file(name, column, formatted.decimal))
                column, n_bad, decimal = formatted
                formats[name] = {"number_format": {"decimal": decimal}}
                if n_bad:
                    coerced_columns.add(name)
                unreadable = f", {n_bad} unreadable value(s) as missing" if n_bad else ""
                if not plain:
                    notes.append(f"column '{name}' read as numbers written with currency, percent or digit-group "
                                 f"marks (decimal mark '{decimal}'{unreadable})")
            elif coerced is not None:
                column, n_bad, codes = coerced
                if decimal_comma:  # read as plain numbers are, with '.', and so served
                    formats[name] = {"number_format": {"decimal": "."}}
                integers_from_text = bool((column.dropna() % 1 == 0).all())
                if n_bad:  # none: numbers that came as text (a footer's word made the column text, say)
                    coerced_columns.add(name)
                    notes.append(coerced_note(name, n_bad, codes))
        is_numeric = pd.api.types.is_numeric_dtype(column) and not boolean
        if is_numeric and decimal_comma and name not in formats:
            formats[name] = {"number_format": {"decimal": ","}}
        if is_numeric and pd.api.types.is_float_dtype(column):
            infinite = np.isinf(column.to_numpy(dtype=np.float64, na_value=np.nan))
            if infinite.any():  # missing, as serving reads them; as numbers they made the scaling NaN
                column = column.where(~infinite)
                notes.append(f"column '{name}': {int(infinite.sum())} infinite value(s) read as missing")
        n_unique = column.nunique(dropna=True)
        if keep_all and is_numeric:
            kept[name] = column.astype(np.float64)
        elif n_unique <= 1:
            dropped[name] = "constant"
        elif (
            n_unique == n_rows
            and n_rows >= MIN_ROWS_FOR_ID_CHECK
            and (not pd.api.types.is_float_dtype(column) or integers_from_text)
        ):
            dropped[name] = "unique per row (ID-like)" + as_text_hint(column, name)
        elif not is_numeric and n_unique > max(data.max_category_levels, MOSTLY_DISTINCT * n_rows):
            dropped[name] = f"{n_unique} distinct values in {n_rows} rows (ID-like)" + as_text_hint(column, name)
        else:
            if not is_numeric and n_unique > data.max_category_levels:
                notes.append(f"column '{name}': {n_unique} categories; the {data.max_category_levels} most frequent "
                             "in training are kept, the rest read as one unknown category (data.max_category_levels)"
                             + as_text_hint(column, name))
            kept[name] = column.astype(np.float64) if is_numeric else column.astype(object)
    for name, reason in dropped.items():
        notes.append(f"column '{name}' dropped: {reason}")
    if not kept:
        reasons = [f"'{name}' {reason}" for name, reason in dropped.items()]
        raise MaasInputError("no usable feature columns: " + "; ".join(reasons[:8])
                             + (f"; ... ({len(reasons)} in all)" if len(reasons) > 8 else ""))
    return Cleaned(pd.DataFrame(kept, index=features.index), dropped, coerced_columns & set(kept), texts,
                   {name: how for name, how in formats.items() if name in kept})


def without_rare_classes(frame: pd.DataFrame, target: pd.Series, data: DataConfig,
                         notes: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """The rows of classes with at least data.min_rows_per_class rows, when two or more such classes
    remain (data.rare_classes=drop), as AutoGluon does: a class of 3 rows in a table of thousands
    cannot be learned or tested, and refusing the table for it stopped the whole run. Otherwise the
    table as it is, for encode_target to refuse with its one line."""
    counts = target.value_counts()
    counts = counts[counts > 0]  # a Parquet categorical's unused levels are no classes
    rare = counts[counts < data.min_rows_per_class]
    if rare.empty or data.rare_classes == "error" or len(counts) - len(rare) < 2:
        return frame, target
    kept = ~target.isin(rare.index).to_numpy()
    shown = ", ".join(f"'{label}' ({count} row{'s' if count > 1 else ''})" for label, count in rare.head(5).items())
    notes.append(f"{len(rare)} class(es) with fewer than {data.min_rows_per_class} rows (data.min_rows_per_class): "
                 f"{shown}{', ...' if len(rare) > 5 else ''}; their {int((~kept).sum())} row(s) dropped, and the model "
                 f"never predicts them (data.rare_classes=error refuses the table instead)")
    return frame.loc[kept], target.loc[kept]


def merged_label_spellings(target: pd.Series, name: str, data: DataConfig, notes: list[str]) -> pd.Series:
    """Labels that differ only in case or surrounding spaces ('Yes', 'yes', 'YES ') are one class,
    spelt as the most frequent of them: a typed column's variants are not classes of their own
    (data.merge_label_spellings=false keeps them apart)."""
    if not data.merge_label_spellings or pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
        return target
    as_text = target.astype(str)
    spellings: dict[str, list[str]] = {}
    for spelling in as_text.value_counts().index:  # most frequent first
        spellings.setdefault(spelling.strip().casefold(), []).append(spelling)
    merged = {spelling: group[0].strip() for group in spellings.values() if len(group) > 1 for spelling in group}
    if not merged:
        return target
    for group in (group for group in spellings.values() if len(group) > 1):
        notes.append(f"target '{name}': labels {', '.join(repr(spelling) for spelling in group)} differ only in case "
                     f"or spaces: one class, '{group[0].strip()}' (data.merge_label_spellings)")
    return as_text.map(lambda spelling: merged.get(spelling, spelling)).where(target.notna())


def whole_numbers(values: np.ndarray) -> bool:
    """Floats that are all whole (1.0, 2.0): a class column read as floats because it had gaps."""
    return bool(np.all(np.mod(values, 1) == 0))


def label_type_of(target: pd.Series) -> str:
    """What the target column's classes are, as bundle.LABEL_TYPES reads them back from their names:
    a 0/1 column's model answers pyfunc callers 0 and 1, not '0' and '1', so `predicted == y` holds."""
    kind = pd.api.types.infer_dtype(target, skipna=True)  # also an object column of True/False (it had gaps)
    if kind == "boolean":
        return "boolean"
    if kind == "integer":
        return "integer"
    if kind in ("floating", "mixed-integer-float"):
        return "integer" if whole_numbers(target.dropna().to_numpy(dtype=float)) else "number"  # as encode_target names them
    return "string"


def encode_target(target: pd.Series, name: str, data: DataConfig) -> tuple[np.ndarray, list[str]]:
    """Class labels as strings (numeric classes in numeric order) and integer codes."""
    if pd.api.types.is_numeric_dtype(target):
        values = target.to_numpy()
        if pd.api.types.is_float_dtype(target) and whole_numbers(values):
            values = values.astype(np.int64)
        classes = np.unique(values)
        if values.dtype.kind == "f" and len(classes) > data.max_category_levels:
            # a measured quantity (a price, a duration), which would otherwise fail below on its
            # rarest "class" of one row, a message that does not say what is wrong
            raise MaasInputError(
                f"target '{name}' holds continuous numbers ({len(classes)} distinct values, e.g. {classes[0]:g} "
                f"and {classes[-1]:g}): maas trains classifiers; bin the target into classes first")
        labels = [str(value) for value in classes]
        codes = np.searchsorted(classes, values)
    else:
        as_text = target.astype(str).to_numpy()
        labels = sorted(set(as_text))
        codes = np.searchsorted(np.asarray(labels, dtype=object), as_text)
    if len(labels) < 2:
        raise MaasInputError(
            f"target '{name}' has a single class ('{labels[0]}'); at least two are needed"
        )
    counts = np.bincount(codes, minlength=len(labels))
    if counts.min() < data.min_rows_per_class:
        smallest = int(counts.argmin())
        many = len(labels) > data.max_category_levels and (counts >= data.min_rows_per_class).sum() < 2
        raise MaasInputError(
            f"target '{name}': class '{labels[smallest]}' has {counts[smallest]} "
            f"row{'s' if counts[smallest] > 1 else ''}; each class needs at least {data.min_rows_per_class} "
            "(data.min_rows_per_class)"
            + (f"; {len(labels)} classes in {len(codes)} rows: an ID or a measured quantity rather than classes? "
               "maas trains classifiers" if many else "")
        )
    return codes.astype(np.int64), labels


def without_repeated_headers(frame: pd.DataFrame, source: str, notes: list[str]) -> pd.DataFrame:
    """The table less rows that repeat its header: files joined one after another (`cat a.csv b.csv`)
    keep each one's header line as a row, which would be a class named after the target and a stray
    string in every column."""
    if len(frame.columns) < 2 or all(pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes):
        return frame
    repeats = np.ones(len(frame), dtype=bool)
    for name, column in frame.items():
        values = column.astype(str).str.strip().to_numpy()
        name = str(name).strip()
        repeats &= (values == name) | (values == re.sub(r"\.\d+$", "", name))  # pandas' a.1 for a second 'a'
        if not repeats.any():
            return frame
    notes.append(f"{source}: {int(repeats.sum())} row(s) repeat the header (files joined one after another): dropped")
    return frame.loc[~repeats]


def fingerprint_table(frame: pd.DataFrame) -> str:
    """Content hash of the table as loaded (values, column names and dtypes), order-sensitive."""
    digest = hashlib.sha256()
    digest.update("|".join(f"{name}:{dtype}" for name, dtype in frame.dtypes.items()).encode())
    nested = [name for name in frame.columns if holds_nested_values(frame[name])]
    hashable = frame.assign(**{name: frame[name].astype(str) for name in nested}) if nested else frame
    digest.update(pd.util.hash_pandas_object(hashable, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


# --- split and preprocessing ---------------------------------------------------------------------


def stratify_by(y: np.ndarray) -> np.ndarray | None:
    """y, for a stratified split, when every class has the two rows that needs; else None (plain)."""
    return y if np.bincount(y).min() >= 2 else None


def stratified_sample(y: np.ndarray, rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a stratified sample of `rows` labels; None when there are no more than that."""
    if rows is None or len(y) <= rows:
        return None
    keep, _ = train_test_split(np.arange(len(y)), train_size=rows, stratify=stratify_by(y), random_state=seed)
    return np.sort(keep)


def split_rows(
    features: pd.DataFrame, codes: np.ndarray, data: DataConfig, seed: int
) -> DataSplits:
    """Stratified train / validation / test split, reproducible for a seed."""
    index = np.arange(len(features))
    rest, test = train_test_split(
        index, test_size=data.test_fraction, stratify=codes, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=data.val_fraction / (1 - data.test_fraction),
        stratify=codes[rest],
        random_state=seed,
    )
    rows = features.reset_index(drop=True)
    return DataSplits(
        rows.iloc[train].reset_index(drop=True), codes[train],
        rows.iloc[val].reset_index(drop=True), codes[val],
        rows.iloc[test].reset_index(drop=True), codes[test],
    )


def fit_date_parts(days: np.ndarray) -> list[dict[str, Any]]:
    """The calendar parts of a date column that vary on the training rows, with their scaling."""
    values = date_parts(days, list(DATE_PARTS))
    means, scales = values.mean(axis=0), values.std(axis=0)
    return [{"part": part, "mean": float(mean), "scale": float(scale)}
            for part, mean, scale in zip(DATE_PARTS, means, scales) if scale > 1e-9]


def fit_preprocessing(x_train: pd.DataFrame, coerced: set[str] = frozenset(), max_levels: int = 50,
                      formats: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Imputation and scaling for numerics, categories for one-hot: from training rows only (text
    columns: fit_text_scales). `coerce` marks the numeric columns that were text with stray strings in
    training: serving reads such a string as a missing value there too, and refuses it elsewhere.
    formats: how a column's strings were written (Cleaned.formats), kept in its spec for serving."""
    numeric, categorical = [], []
    for name in x_train.columns:
        column = x_train[name]
        is_date = pd.api.types.is_datetime64_any_dtype(column)
        if is_date or pd.api.types.is_numeric_dtype(column):
            if is_date:
                column = pd.Series(dates_as_days(column), index=column.index)
            median = float(column.median()) if column.notna().any() else 0.0
            filled = column.fillna(median)
            std = float(filled.std(ddof=0))
            numeric.append({"name": name, "fill": median, "mean": float(filled.mean()),
                            "scale": std if std > 1e-12 else 1.0, "coerce": name in coerced, **(formats or {}).get(name, {}),
                            **({"missing_flag": True} if column.isna().any() else {}),
                            **({"date": True, "parts": fit_date_parts(filled.to_numpy())} if is_date else {})})
        else:
            present = column.dropna().astype(str)
            fill = str(present.mode().iloc[0]) if not present.empty else ""
            # the most frequent values; the rest read as all zeros, as a category first seen at serving does
            categories = sorted(set(present.value_counts().index[:max_levels]) | {fill})
            categorical.append({"name": name, "fill": fill, "categories": categories})
    return {"numeric": numeric, "categorical": categorical}


def labelled_texts(splits: DataSplits, column: str):
    """A text column's training and validation texts with their labels: what the encoder is
    searched, fine-tuned and chosen on (the test rows never)."""
    from models.text_encoder import LabelledTexts

    return LabelledTexts(as_texts(splits.x_train[column].tolist()), splits.y_train,
                         as_texts(splits.x_val[column].tolist()), splits.y_val)


def searched_text_settings(splits: DataSplits, texts: list[str], data: DataConfig, fingerprint: str, seed: int,
                           notes: list[str]) -> DataConfig:
    """`data` with its text settings (fine-tuned or not, learning rate, epochs, max length) replaced
    by the best of data.text_search_trials trials on the first text column (models/text_search.py),
    the configured settings tried first. The trials go to a journal beside the exported encoders, so a
    re-run on the same table and settings takes the same choice without a trial."""
    if not data.text_search_trials:
        return data
    from models.text_encoder import FineTuning
    from models.text_search import FINE_TUNED, TextSearch, search_text_settings

    search = TextSearch(trials=data.text_search_trials, max_seconds=data.text_search_max_s,
                        train_texts=data.text_search_texts, val_texts=max(10, data.text_search_texts // 2),
                        defaults=FineTuning(epochs=data.text_finetune_epochs or FineTuning.epochs, encoder_lr=data.text_finetune_lr,
                                            max_length=data.text_max_length), seed=seed)
    digest = hashlib.sha256(f"{fingerprint}|{texts[0]}|{search}".encode()).hexdigest()[:12]
    choice = search_text_settings(labelled_texts(splits, texts[0]), search,
                                  encoders_home() / f"text-search-{digest}.journal")
    notes.append(f"text settings searched on column '{texts[0]}': {choice.describe()}")
    fine_tuned = choice.mode == FINE_TUNED
    return data.model_copy(update={"text_max_length": choice.max_length,
                                   "text_finetune_epochs": choice.epochs if fine_tuned else 0,
                                   "text_finetune_lr": choice.encoder_lr if fine_tuned else data.text_finetune_lr})


def text_encoder_folder(splits: DataSplits, texts: list[str], data: DataConfig, fingerprint: str, seed: int,
                        notes: list[str]) -> Path:
    """The exported encoder the text columns are read with: the pretrained one, or (with
    data.text_finetune_epochs) one fine-tuned on the training rows of the first text column, early-
    stopped on the validation rows, and (with data.text_student_layers) a student distilled from it,
    served instead when its validation F1 is within data.text_student_tolerance; the pretrained one
    when fine-tuning did not beat it there. Exported once per table and settings. The test rows are
    not read."""
    from models.text_encoder import (PRETRAINED, Distillation, FineTuning, cached_encoder, distil, export_once, fine_tune,
                                     served_variant)

    if data.text_finetune_epochs == 0:
        return cached_encoder(encoders_home(), data.text_encoder_precision)
    tuning = FineTuning(epochs=data.text_finetune_epochs, encoder_lr=data.text_finetune_lr,
                        max_length=data.text_max_length, max_seconds=data.text_finetune_max_s, seed=seed)
    distillation = Distillation(layers=data.text_student_layers, epochs=data.text_finetune_epochs,
                                max_length=data.text_max_length, max_seconds=data.text_finetune_max_s, seed=seed)
    settings = f"{tuning}|{distillation if data.text_student_layers else ''}|{data.text_student_tolerance}|pretrained"
    digest = hashlib.sha256(f"{fingerprint}|{texts[0]}|{settings}|{data.text_encoder_precision}".encode()).hexdigest()[:12]
    labelled = labelled_texts(splits, texts[0])
    said: list[str] = []

    def write(folder: Path) -> None:
        candidates = {"teacher": fine_tune(labelled.train, labelled.y_train, labelled.val, labelled.y_val, tuning)}
        if data.text_student_layers:
            candidates["student"] = distil(candidates["teacher"], labelled.train, labelled.val, labelled.y_val,
                                           distillation)
        chosen, exported, scores = served_variant(candidates, labelled, data.text_encoder_precision,
                                                  data.text_student_tolerance, data.text_max_length, folder / "variants",
                                                  pretrained=cached_encoder(encoders_home(), data.text_encoder_precision))
        for name, model in candidates.items():
            said.append(f"{name} {model.epochs_run:.2f} epoch(s) in {model.seconds:.0f} s, validation macro F1 "
                        f"{scores[name]:.4f} ({data.text_encoder_precision}, a linear head refitted on its embeddings)")
        said.append(f"the pretrained encoder as shipped {scores[PRETRAINED]:.4f}")
        said.append(f"serving the {chosen}" + (": fine-tuning did not beat it on the validation texts"
                                               if chosen == PRETRAINED else ""))
        for item in exported.iterdir():
            item.rename(folder / item.name)
        shutil.rmtree(folder / "variants")

    folder = export_once(encoders_home() / f"{ENCODER_NAME}-{data.text_encoder_precision}-finetuned-{digest}", write)
    notes.append(f"text encoder fine-tuned on column '{texts[0]}': " + (
        "; ".join(said) if said else f"reused from an earlier run ({folder.name})"))
    return folder


def text_column(name: str, data: DataConfig, mean: list[float], scale: list[float],
                encoder: str = ENCODER_NAME) -> dict[str, Any]:
    """A text column's entry in the preprocessing: how it is read and its embedding's scales."""
    return {"name": name, "fill": "", "max_length": data.text_max_length, "encoder": encoder,
            "precision": data.text_encoder_precision, "mean": mean, "scale": scale}


def text_placeholders(texts: list[str], data: DataConfig) -> list[dict[str, Any]]:
    """Text columns as a preflight describes them: the embedding's width, nothing embedded."""
    if not texts:
        return []
    from models.text_encoder import EMBEDDING_DIM, pretrained_dir

    pretrained_dir()  # the package is installed, or one line says which to install
    return [text_column(name, data, [0.0] * EMBEDDING_DIM, [1.0] * EMBEDDING_DIM) for name in texts]


# A text column whose tokens the encoder's (English WordPiece) vocabulary mostly does not know
# (Chinese, Thai, ...) embeds as [UNK]s: said in a warning, since the column then carries little.
UNKNOWN_TOKENS_WARNING = 0.2
UNKNOWN_TOKENS_SAMPLE = 2_000  # training texts the share is taken on, each on its first characters:
UNKNOWN_TOKENS_CHARS = 2_000  # 2,000 whole 10,000-word texts took 17 s to tokenize


def unknown_token_share(encoder, texts: list[str]) -> float:
    """Of all the tokens in `texts`, the share the vocabulary does not know."""
    lengths, unknown = encoder.token_stats(texts)
    total = lengths.sum()
    return float(np.nansum(unknown * lengths) / total) if total else 0.0


def fit_text_scales(x_train: pd.DataFrame, texts: list[str], data: DataConfig, folder: Path,
                    notes: list[str]) -> list[dict[str, Any]]:
    """Each text column's embedding mean and scale on the training rows, the encoder in `folder`
    attached (memoising embeddings for the splits that follow)."""
    from models.text_encoder import describe_encoder

    columns, described = [], describe_encoder(folder)
    for name in texts:
        encoder = text_encoder(attach(text_column(name, data, [], []), folder, memo=True))
        values = as_texts(x_train[name].tolist())
        unknown = unknown_token_share(encoder, [text[:UNKNOWN_TOKENS_CHARS] for text in values[:UNKNOWN_TOKENS_SAMPLE]])
        if unknown > UNKNOWN_TOKENS_WARNING:
            notes.append(f"column '{name}': {unknown:.0%} of its tokens are unknown to {ENCODER_NAME}'s English "
                         "vocabulary ([UNK]), so its embeddings carry little of this text (another language or script?)")
        embedding = encoder.embed(values).astype(np.float64)
        scale = embedding.std(axis=0)
        columns.append(attach(text_column(name, data, embedding.mean(axis=0).round(7).tolist(),
                                          np.where(scale > 1e-6, scale, 1.0).round(7).tolist(), described),
                              folder, memo=True))
    return columns


def written_as(column: dict[str, Any]) -> dict[str, str]:
    """How a numeric or date column's strings are read besides plain numbers and ISO 8601, for the schema."""
    if column.get("date_format"):
        return {"format": f"{column['date_format']} (e.g. {date_example(column['date_format'])}) or ISO 8601"}
    if column.get("time_of_day"):
        return {"format": "a time of day (14:30, 14:30:05, 2:30 PM) or hours since midnight as a number"}
    if column.get("number_format"):
        decimal = column["number_format"]["decimal"]
        return {"format": f"a number, or text with currency, percent and digit-group marks, decimal mark '{decimal}'"}
    return {}


def input_schema(preprocessing: dict[str, Any]) -> list[dict[str, str]]:
    """Raw input columns the model expects and their kind, for serving and MLflow."""
    return [{"name": c["name"], "type": "datetime" if c.get("date") else "number", **written_as(c)}
            for c in preprocessing["numeric"]] + [
        {"name": c["name"], "type": "boolean" if is_boolean(c) else "string"} for c in preprocessing["categorical"]
    ] + [{"name": c["name"], "type": "text"} for c in preprocessing.get("text", [])]


def prepare_data(data: DataConfig, seed: int, fit_text: bool = True) -> PreparedData:
    """The whole data stage: load, validate, clean, split, fit preprocessing. fit_text=False (the
    CLI's preflight) validates without reading text through the encoder: its columns get placeholder
    scales of the right width, and the encoder's package is only checked to be there."""
    table = append_extra_rows(load_table(data), data.extra_paths)
    frame = table.frame
    if table.target not in frame.columns:
        raise MaasInputError(f"{table.source}: target column '{table.target}' not found; columns: "
                             f"{listing(frame.columns)}{missing_column_hint(table.target, frame)}")
    notes: list[str] = []
    skipped = frame.attrs.get(SKIPPED_LINES)
    if skipped:  # pyfunc's rows come from the same read: say how to make it
        how = f"header={skipped}" if Path(table.source).suffix.lower() in (".xlsx", ".xlsm") else f"skiprows={skipped}"
        notes.append(f"{Path(table.source).name}: the {skipped} line(s) above the header naming '{table.target}' "
                     f"skipped (a title; pandas reads the table so with {how})")
    if frame.attrs.get(SPACED_FIELDS):
        notes.append(f"{Path(table.source).name}: a space follows each delimiter ('a, b'): read without it in names "
                     f"and values (pandas reads the table so with skipinitialspace=True)")
    if frame.attrs.get(DECIMAL_COMMA):
        notes.append(f"{Path(table.source).name}: split by ';', so its numbers were read with decimal mark ',' "
                     f"(pandas reads the table so with sep=';', decimal=','); requests may send them either way")
    if frame.attrs.get(MODEL_IGNORED):
        notes.append(f"column(s) {listing(frame.attrs[MODEL_IGNORED])} left out: the labelled production rows "
                     "appended lack them, as the model they were answered by ignored them")
    for name, renamed in frame.attrs.get(REPEATED_NAMES, {}).items():
        notes.append(f"{Path(table.source).name}: {len(renamed)} columns are named '{name}': read as "
                     f"{', '.join(repr(column) for column in renamed)}, pandas' names, which requests use too"
                     + (f"; the target is the first, and the rest are inputs: "
                        f"{', '.join(repr(column) for column in renamed[1:])}" if name == table.target else ""))
    frame = without_repeated_headers(frame, Path(table.source).name, notes)
    fingerprint = fingerprint_table(frame)
    target = frame[table.target]
    missing_target = target.isna().to_numpy()
    if missing_target.all():
        raise MaasInputError(f"{table.source}: target column '{table.target}' is empty")
    if missing_target.any():
        notes.append(f"{int(missing_target.sum())} row(s) without a target value dropped")
        frame = frame.loc[~missing_target]
        target = target.loc[~missing_target]
    if holds_nested_values(target):
        raise MaasInputError(f"{table.source}: target column '{table.target}' holds lists or mappings, not class labels")
    target = merged_label_spellings(target, table.target, data, notes)
    frame, target = without_rare_classes(frame, target, data, notes)
    codes, labels = encode_target(target, table.target, data)
    features, dropped, coerced, texts, formats = clean_features(
        frame.drop(columns=[table.target]), data, notes, keep_all=table.image_shape is not None,
        decimal_comma=bool(frame.attrs.get(DECIMAL_COMMA)),
    )
    image_shape = table.image_shape if not dropped else None  # a dropped pixel breaks the grid
    splits = split_rows(features, codes, data, seed)
    preprocessing = fit_preprocessing(splits.x_train.drop(columns=texts), coerced, data.max_category_levels, formats)
    if texts and fit_text:
        data = searched_text_settings(splits, texts, data, fingerprint, seed, notes)
        preprocessing["text"] = fit_text_scales(splits.x_train, texts, data,
                                                text_encoder_folder(splits, texts, data, fingerprint, seed, notes), notes)
    elif texts:
        preprocessing["text"] = text_placeholders(texts, data)
    for column in preprocessing.get("text", []):  # the file's rows, numbers and all, are answered
        if holds_scalars(features[column["name"]]):
            column["scalars_as_text"] = True
    return PreparedData(
        splits=splits,
        labels=labels,
        target=table.target,
        source=table.source,
        preprocessing=preprocessing,
        input_schema=input_schema(preprocessing),
        dropped_columns=dropped,
        fingerprint=fingerprint,
        image_shape=image_shape,
        n_rows=len(features),
        notes=notes,
        label_type=label_type_of(target),
    )


def report_data(prepared: PreparedData) -> None:
    """What cleaning did (a warning each) and the split sizes, for the run's log."""
    logger = run_logger()
    for note in prepared.notes:
        logger.warning(note)
    splits = prepared.splits
    logger.info("%s: %d rows, %d input columns, %d classes -> train %d / val %d / test %d", prepared.source,
                prepared.n_rows, len(prepared.input_schema), len(prepared.labels), len(splits.x_train),
                len(splits.x_val), len(splits.x_test))


def budgeted_data(data: DataConfig, budget: Budget) -> DataConfig:
    """Searching the text settings, fine-tuning the text encoder, then distilling it, under the run's
    budget: the 'text' stage's allotment (maas/budget.py) in equal parts for those that run, floored
    to 10 s so that the same budget names the same search and exported encoder on a re-run. Time the
    search's choice does not use (a frozen encoder) passes on to the later stages."""
    searching = data.text_search_trials > 0
    if (data.text_finetune_epochs == 0 and not searching) or budget.time_s is None:
        return data
    part = max(10.0, budget.allot("text") / (searching + 1 + bool(data.text_student_layers)) // 10 * 10)
    update = {"text_finetune_max_s": min(data.text_finetune_max_s, part)}
    if searching:
        update["text_search_max_s"] = min(data.text_search_max_s, part)
    return data.model_copy(update=update)


# --- Prefect wrapper -------------------------------------------------------------------------------


# No fixed short timeout: besides reading and splitting the table, this stage embeds every text and
# may search, fine-tune and distil the encoder, each bounded by its own budget (data.text_*_max_s).
@task(name="prepare-data", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_input_error,
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE)
def prepare_data_task(data: DataConfig, seed: int, timer: StageTimer) -> PreparedData:
    """Before any MLflow run exists (bad input leaves nothing behind); recorded once the run opens."""
    prepared = timer.run("data", prepare_data, data, seed)
    report_data(prepared)
    return prepared
