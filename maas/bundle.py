"""The model bundle at run time: JSON preprocessing + an ONNX graph, loaded without pickle.

This module is copied next to every logged model (MLflow `code_paths`), so it must import nothing
from maas or torch: numpy, pandas and onnxruntime only. Training uses the same `transform` to
build its tensors, so what trains is exactly what serves.

Bundle folder layout:
    model.onnx          network, input 'features' float32 [batch, n_features] -> 'probabilities'
    preprocessing.json  per-column imputation, scaling and one-hot categories, fitted on train
    metadata.json       labels, input schema, target, network spec, metrics, manifest
    encoder/            only with text columns: encoder.onnx (token ids -> sentence embedding),
                        tokenizer.json (run by the `tokenizers` library), encoder.json

A text column's features are its sentence embedding, standardised with means and scales fitted on
the training rows' embeddings; they sit after the numeric and one-hot blocks. A date column is a
numeric column marked "date": its value is days since 1970-01-01 (UTC), read from datetimes of any
unit or zone and from ISO 8601 strings alike; its calendar parts that varied in training (month,
day of month, day of week, hour) follow the numeric block, standardised like it. A column whose
file wrote its numbers or dates in a local way ("$1,200.50", "12.5%", "1.200,50 €", "31.12.2026")
keeps that way in its spec ("number_format", "date_format"), so serving reads a row of the training
file as training read it; plain numbers and ISO 8601 dates are read there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

MODEL_FILE = "model.onnx"
ENCODER_DIR = "encoder"  # inside the bundle; models/text_encoder.py writes its files
ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_FILE = "encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
MEMO_LIMIT = 200_000  # texts a training process remembers; a long-lived worker must not keep every text it saw
PREPROCESSING_FILE = "preprocessing.json"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
PROBABILITY_PREFIX = "proba_"  # pyfunc's output column of each class: proba_<label>
# A class's name (metadata "labels", /predict's "label") read back in the target column's type
# (metadata "label_type"), for pyfunc and /invocations, where MLflow's own flavors answer 1, not "1".
LABEL_TYPES: dict[str, Callable[[str], Any]] = {"integer": int, "number": float, "boolean": lambda name: name == "True",
                                                "string": str}
FEATURE_LIMIT = 1e6  # the largest standardized feature a graph is given, in standard deviations


UNKNOWN_CATEGORY_WARNING = "values the model has no category for, read as an unknown category"


class InputSchemaError(ValueError):
    """Rows that do not fit the model's input schema (a missing column, say)."""


def required_columns(preprocessing: dict[str, Any]) -> list[str]:
    """Raw input columns the model reads, in schema order."""
    return [c["name"] for c in preprocessing["numeric"]] + [
        c["name"] for c in preprocessing["categorical"]
    ] + [c["name"] for c in preprocessing.get("text", [])]


def feature_count(preprocessing: dict[str, Any]) -> int:
    """Width of the matrix `transform` produces (numeric columns, their dates' parts and missing-value
    flags + one-hot slots + embeddings)."""
    numeric = preprocessing["numeric"]
    return len(numeric) + sum(len(c.get("parts", [])) + bool(c.get("missing_flag")) for c in numeric) + sum(
        len(c["categories"]) for c in preprocessing["categorical"]
    ) + sum(len(c["mean"]) for c in preprocessing.get("text", []))


# --- dates -----------------------------------------------------------------------------------------

EPOCH = pd.Timestamp("1970-01-01")


def dates_as_days(values: Any, date_format: str | None = None) -> np.ndarray:
    """A date column's values as days since 1970-01-01 UTC (float64; NaN where missing or unreadable).

    Days, not the datetime's integer: pandas counts in ns, us or s depending on where a column came
    from (Parquet gives us, a frame built from strings ns), so the same date read as a number
    differed 1000x between training and serving. Strings are read as ISO 8601, what JSON clients and
    pandas write; a zone is converted to UTC, a naive time taken as UTC; anything else is missing.
    date_format: the strftime format the training file wrote its dates in ("%d.%m.%Y"), tried first.
    A number is Unix time (unix_days)."""
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return unix_days(series.to_numpy(dtype=np.float64, na_value=np.nan))
    numbers = None
    if series.dtype == object:
        is_number = series.map(lambda value: isinstance(value, (int, float, np.integer, np.floating))
                               and not isinstance(value, (bool, np.bool_))).to_numpy(dtype=bool)
        if is_number.any():
            numbers = np.full(len(series), np.nan)
            numbers[is_number] = unix_days(series[is_number].to_numpy(dtype=np.float64))
    if not pd.api.types.is_datetime64_any_dtype(series):
        readable = series.map(lambda value: isinstance(value, (str, pd.Timestamp, np.datetime64)) or hasattr(value, "isoformat"))
        series = series.where(readable.astype(bool))
        as_iso = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601")
        if date_format:
            as_written = pd.to_datetime(series.map(lambda value: value.strip() if isinstance(value, str) else None),
                                        errors="coerce", utc=True, format=date_format)
            as_iso = as_written.fillna(as_iso)
        series = as_iso
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    days = ((series - EPOCH) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64, na_value=np.nan)
    return days if numbers is None else np.where(np.isnan(numbers), days, numbers)


# pydantic's rule for a number given as a datetime: above 2e10 it counts milliseconds (what pandas'
# to_json writes by default, and JavaScript's Date), else seconds
UNIX_MILLISECONDS_ABOVE = 2e10
MAX_UNIX_SECONDS = 9.2e9  # pandas' Timestamp range (years 1677 to 2262); beyond it: unreadable
# Nearer 0 (1966-10 to 1973-03 in seconds) a number is more likely a count than a Unix time: an
# Excel serial day (45000) among a workbook's date cells, which training read as missing, not 1970.
MIN_UNIX_SECONDS = 1e8


def unix_days(numbers: np.ndarray) -> np.ndarray:
    """Unix times (seconds, or milliseconds by pydantic's rule) as days since 1970-01-01; NaN where
    out of range."""
    seconds = np.where(np.abs(numbers) > UNIX_MILLISECONDS_ABOVE, numbers / 1000, numbers)
    readable = (np.abs(seconds) <= MAX_UNIX_SECONDS) & (np.abs(numbers) >= MIN_UNIX_SECONDS)
    return np.where(readable, seconds / 86400, np.nan)


DATE_PARTS = ("month", "dayofmonth", "dayofweek", "hour")


def date_parts(days: np.ndarray, parts: list[str]) -> np.ndarray:
    """Calendar parts of days since 1970-01-01 (imputed: no NaN), a column each: what a trend in
    days does not show a model (weekdays, months, paydays, the hour). Monday is 0, hours are
    fractional."""
    whole = np.floor(days)
    calendar = whole.astype(np.int64).astype("datetime64[D]")
    months = calendar.astype("datetime64[M]")
    values = {"month": lambda: months.astype(np.int64) % 12 + 1,
              "dayofmonth": lambda: (calendar - months.astype("datetime64[D]")).astype(np.int64) + 1,
              "dayofweek": lambda: (whole + 3) % 7,  # 1970-01-01 was a Thursday
              "hour": lambda: (days - whole) * 24}
    return np.column_stack([values[part]().astype(np.float64) for part in parts]) if parts else \
        np.zeros((len(days), 0))


def date_example(date_format: str | None) -> str:
    """A date as the format writes it, for messages: 2026-03-12 09:30 in that format."""
    return datetime(2026, 3, 12, 9, 30).strftime(date_format or "%Y-%m-%d")


# spec keys of a numeric column whose values training read in a form of their own (column_numbers)
OWN_FORMS = ("date", "number_format", "time_of_day")


def column_numbers(values: Any, column: dict[str, Any]) -> np.ndarray:
    """A numeric column's raw values as float64 (NaN: missing or unreadable): a date column as days,
    a column with a number format read in it."""
    if column.get("date"):
        return dates_as_days(values, column.get("date_format"))
    if column.get("number_format"):
        return formatted_numbers(values, column["number_format"]["decimal"])
    if column.get("time_of_day"):
        return np.array([hours_of_day(value) for value in values], dtype=np.float64)
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)


# --- numbers as a file writes them ----------------------------------------------------------------

CURRENCY_SIGNS = "$€£¥₹₩₽¢"
# before the number: currency signs, ISO 4217 codes ("USD 5"), a sign, spaces, in any order
_LEADING = re.compile(rf"^(?:[{CURRENCY_SIGNS}]|[A-Z]{{3}}(?![A-Za-z])|[-+\u2212]|\s)+")
# after it: a currency sign or code, a percent sign, spaces
_TRAILING = re.compile(rf"(?:[{CURRENCY_SIGNS}%]|(?<![A-Za-z])[A-Z]{{3}}|\s)+$")
# digit groups: by a comma, a dot, an apostrophe (Swiss) or a (narrow) no-break space or space,
# whichever the decimal mark is not; the same mark between every group of three
_GROUP_MARKS = {".": ",'\u00a0\u202f ", ",": ".'\u00a0\u202f "}
_NUMBER = {decimal: re.compile(
    rf"(?:\d{{1,3}}(?P<group>[{re.escape(marks)}])\d{{3}}(?:(?P=group)\d{{3}})*|\d+)(?:{re.escape(decimal)}\d*)?"
    rf"|{re.escape(decimal)}\d+") for decimal, marks in _GROUP_MARKS.items()}


def formatted_number(value: Any, decimal: str) -> float:
    """One value of a column whose file wrote numbers with currency, percent or digit-group marks:
    "$1,200.50" 1200.5, "(1,200)" -1200 (accounting), "12.5%" 0.125, "1.200,50 €" 1200.5 (decimal ",").
    A number is itself; anything else (a stray word, a missing value) is NaN."""
    if value is None or isinstance(value, bool):
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip()
    negative = text.startswith("(") and text.endswith(")")
    if negative:
        text = text[1:-1]
    leading = _LEADING.match(text)
    if leading:
        negative ^= (leading.group().count("-") + leading.group().count("\u2212")) % 2 == 1
        text = text[leading.end():]
    trailing = _TRAILING.search(text)
    percent = False
    if trailing:
        percent = "%" in trailing.group()
        text = text[:trailing.start()]
    match = _NUMBER[decimal].fullmatch(text)
    if match is None:
        return float("nan")
    group = match.group("group")
    number = float((text.replace(group, "") if group else text).replace(decimal, "."))
    number = -number if negative else number
    return number / 100 if percent else number


def formatted_numbers(values: Any, decimal: str) -> np.ndarray:
    return np.array([formatted_number(value, decimal) for value in values], dtype=np.float64)


# --- times of day ----------------------------------------------------------------------------------

# 14:30, 14:30:05, 14:30:05.250, 2:30 PM, 2:30 p.m.: a shift, a booking or a transaction time; 36:15, a duration
_TIME_OF_DAY = re.compile(r"(\d{1,3}):([0-5]\d)(?::([0-5]\d)(?:[.,]\d+)?)?\s*(?:([AaPp])\.?\s*[Mm]\.?)?")


def hours_of_day(value: Any) -> float:
    """A time of day as hours since midnight: "14:30" 14.5, "2:30 PM" 14.5, a datetime.time (an
    Excel or Parquet time cell) alike; a number is itself (hours); anything else is NaN. A duration
    written so ("36:15", "12:34" of minutes and seconds) reads as its first unit, which a model takes
    as well as the true length: it is proportional to it."""
    if value is None or isinstance(value, bool):
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, time):
        return value.hour + value.minute / 60 + (value.second + value.microsecond / 1e6) / 3600
    match = _TIME_OF_DAY.fullmatch(str(value).strip())
    if match is None:
        return float("nan")
    hours, minutes, seconds, half = int(match[1]), int(match[2]), int(match[3] or 0), match[4]
    if half:
        if not 1 <= hours <= 12:
            return float("nan")
        hours = hours % 12 + (12 if half in "Pp" else 0)
    return hours + minutes / 60 + seconds / 3600


# --- categories ------------------------------------------------------------------------------------

# A column training's pandas read as True / False (its categories are "True" and "False") comes from
# clients spelled many ways: JSON true, "true", "TRUE" (as Excel writes it, and pandas reads as
# True), 1, "yes". Each reads as the category it means, as a pydantic bool field would take it:
# before, "TRUE" or 1 was a category the model had never seen, and the answer silently ignored it.
BOOLEAN_SPELLINGS = {**dict.fromkeys(("true", "t", "yes", "y", "on", "1", "1.0"), "True"),
                     **dict.fromkeys(("false", "f", "no", "n", "off", "0", "0.0"), "False")}
BOOLEAN_CATEGORIES = frozenset(("True", "False"))


def is_boolean(column: dict[str, Any]) -> bool:
    return len(column["categories"]) <= 2 and BOOLEAN_CATEGORIES.issuperset(column["categories"])


def as_categories(values: np.ndarray, column: dict[str, Any]) -> np.ndarray:
    """A categorical column's values as text (None: missing) as its categories are written: a
    True / False column's other spellings of true and false as "True" and "False"."""
    if not is_boolean(column):
        return values
    return np.array([BOOLEAN_SPELLINGS.get(value.strip().lower(), value) if isinstance(value, str) else value
                     for value in values], dtype=object)


def category_sets(preprocessing: dict[str, Any]) -> list[frozenset[str]]:
    """Each categorical column's categories as a set, for unknown_categories (the service keeps them)."""
    return [frozenset(column["categories"]) for column in preprocessing["categorical"]]


def unknown_categories(categorical: list[np.ndarray], preprocessing: dict[str, Any],
                       known_sets: list[frozenset[str]] | None = None) -> dict[str, str]:
    """Per categorical column with a value (not missing) that is none of the model's categories, the
    first such value: it reads as all zeros, as a category the model never saw (or kept) does. What
    a client needs to know when a typo or a new spelling quietly changed its answer."""
    unknown = {}
    for column, values, known in zip(preprocessing["categorical"], categorical,
                                     known_sets or category_sets(preprocessing)):
        for value in as_categories(values, column):
            if value is not None and value not in known:
                unknown[column["name"]] = value
                break
    return unknown


# --- text ------------------------------------------------------------------------------------------


class TextEncoder:
    """Texts -> sentence embeddings: the model's own tokenizer.json run by `tokenizers` (truncated
    at max_length tokens), then the encoder graph, one text per call. Dynamic int8 quantizes each
    call's activations with one scale, so in a padded batch a text's embedding moved with its
    batch-mates (0.03 in a probability); alone it is its own, and on sentences batching gained
    only 6% (int8, one thread: 543 texts/s in batches of 64, 510 alone). `memo` keeps each text's
    embedding (training embeds the same rows for fitting, every split and the test report).

    threads None (every core: training, monitoring) runs a one-thread session per core side by side
    (ONNX Runtime releases the GIL): one text is too small a call to split across cores, and on 2
    cores two sessions embedded 126 texts/s where one session on two threads embedded 103 (int8, a
    Zen 1 EPYC), the same embeddings to the bit. The service gives one thread (serving.model_threads): its requests overlap."""

    def __init__(self, folder: Path, max_length: int, threads: int | None = None, memo: bool = False):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tokenizer_json = (folder / TOKENIZER_FILE).read_bytes()
        self.tokenizer = Tokenizer.from_buffer(tokenizer_json)
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.max_length, self.threads = max_length, threads
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or 1
        graph = (folder / ENCODER_FILE).read_bytes()
        self.sessions = [ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
                         for _ in range(1 if threads else len(os.sched_getaffinity(0)))]
        self.dim = self.sessions[0].get_outputs()[0].shape[1]
        self.memo: dict[str, np.ndarray] | None = shared_memo(graph, tokenizer_json, max_length) if memo else None
        self._counter = None  # the tokenizer without truncation, made when drift first asks

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Given a thread budget (the service's, the compute ceiling's), the texts are tokenized on
        the calling thread: `encode_batch` splits a batch over a pool of one thread per core, which
        on a busy core spends more than it saves (8 sentences: 0.33 ms alone, 0.50 ms of CPU split
        over 2 cores; 32: 1.36 against 1.63), and the service's other worker has the other core."""
        if self.threads:
            return [self.tokenizer.encode(text).ids for text in texts]
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def token_stats(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per text: its length in tokens, untruncated and without [CLS]/[SEP], and the share of them
        the vocabulary does not know ([UNK]; NaN for an empty text). What drift watches without the model."""
        if self._counter is None:
            self._counter = self.tokenizer.__class__.from_str(self.tokenizer.to_str())
            self._counter.no_truncation()
        counter = self._counter
        unknown_id = counter.token_to_id("[UNK]")
        encodings = counter.encode_batch(texts, add_special_tokens=False)
        lengths = np.array([len(encoding.ids) for encoding in encodings], dtype=np.float64)
        unknown = np.array([sum(token == unknown_id for token in encoding.ids) for encoding in encodings], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return lengths, np.where(lengths > 0, unknown / lengths, np.nan)

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim]."""
        if self.memo is None:
            return self._embed(texts)
        todo = list(dict.fromkeys(text for text in texts if text not in self.memo))
        if len(self.memo) + len(todo) > MEMO_LIMIT:
            self.memo.clear()
        if todo:
            self.memo.update(zip(todo, self._embed(todo)))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.memo[text] for text in texts])

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        token_ids = self.token_ids(texts)

        def embed_every(step: int, first: int) -> None:
            session = self.sessions[first]
            for index in range(first, len(token_ids), step):
                tokens = np.asarray([token_ids[index]], dtype=np.int64)
                out[index] = session.run(None, {"input_ids": tokens, "attention_mask": np.ones_like(tokens)})[0][0]

        sessions = min(len(self.sessions), len(texts))
        if sessions <= 1:
            embed_every(1, 0)
        else:
            with ThreadPoolExecutor(sessions) as pool:
                list(pool.map(partial(embed_every, sessions), range(sessions)))
        return out


_encoders: dict[tuple, TextEncoder] = {}
_memos: dict[str, dict[str, np.ndarray]] = {}  # by encoder content (shared_memo)


def shared_memo(graph: bytes, tokenizer_json: bytes, max_length: int) -> dict[str, np.ndarray]:
    """The embedding memo of every memoising encoder in this process with the same graph, tokenizer
    and max_length, wherever its files lie. A bundle of the pretrained encoder carries a copy of the
    data stage's, so its variants' scores on the validation rows (tasks/evaluate.py) find the data
    stage's embeddings, and the champion's score at the gate finds the test rows' from the report:
    the same to the bit (one text per call, one thread per session). On the built-in sentiment set
    (`--budget 2m`, a Zen 4 EPYC) evaluate went from 7.4 to 2.2 s, and on a retrain the gate from
    9.6 to 1.7 s. A fine-tuned or distilled encoder is other bytes, and embeds its own."""
    digest = hashlib.blake2b(graph, digest_size=16)
    digest.update(tokenizer_json)
    digest.update(str(max_length).encode())
    return _memos.setdefault(digest.hexdigest(), {})


def text_encoder(column: dict[str, Any]) -> TextEncoder:
    """The encoder a text column's runtime keys point at, loaded once per process."""
    if "_encoder_dir" not in column:
        raise InputSchemaError(f"text column '{column['name']}': no encoder attached (load the bundle with ModelBundle.load)")
    key = (column["_encoder_dir"], column["max_length"], column.get("_threads"), column.get("_memo", False))
    if key not in _encoders:
        _encoders[key] = TextEncoder(Path(key[0]), key[1], key[2], key[3])
    return _encoders[key]


def attach(column: dict[str, Any], folder: Path, threads: int | None = None, memo: bool = False) -> dict[str, Any]:
    """A text column pointed at an encoder folder (runtime keys, '_'-prefixed, never written: see persistable)."""
    return {**column, "_encoder_dir": str(Path(folder).resolve()), "_threads": threads, "_memo": memo}


def with_encoder(preprocessing: dict[str, Any], folder: Path, threads: int | None = None,
                 memo: bool = False) -> dict[str, Any]:
    """The preprocessing with its text columns attached to an encoder folder."""
    if not preprocessing.get("text"):
        return preprocessing
    return {**preprocessing, "text": [attach(column, folder, threads, memo) for column in preprocessing["text"]]}


def persistable(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing without runtime keys, as preprocessing.json holds it."""
    if not preprocessing.get("text"):
        return preprocessing
    return {**preprocessing, "text": [{key: value for key, value in column.items() if not key.startswith("_")}
                                      for column in preprocessing["text"]]}


def as_texts(values: Any) -> list[str]:
    """A text column's values as strings; a missing value is the empty text."""
    return ["" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value) for value in values]


def text_features(texts: list[str], column: dict[str, Any]) -> np.ndarray:
    """A text column's block: its embedding, standardised as fitted on the training rows."""
    embedding = text_encoder(column).embed(texts).astype(np.float64)
    return (embedding - array_of(column["mean"])) / array_of(column["scale"])


_made: dict[tuple, tuple[Any, Any]] = {}  # (id of a preprocessing list, what) -> (that list, what was made of it)
MAX_MADE = 1024  # a service holds a few bundles; a scheduler loads one a check: past this, the cache starts afresh


def made_once(source: list, what, make):
    """make(source), once per preprocessing list (lists read from JSON, never changed after): a
    one-text request's model call converted its column's 384 means and scales each time (~17 us),
    a one-row table request its columns' fills, means and scales (~7 us of ~20 us of transform).
    The list is kept with what was made, so its id is not reused while it is cached."""
    key = (id(source), what)
    cached = _made.get(key)
    if cached is not None and cached[0] is source:
        return cached[1]
    if len(_made) >= MAX_MADE:
        _made.clear()
    made = make(source)
    _made[key] = (source, made)
    return made


def read_only(values, dtype=None) -> np.ndarray:
    array = np.array(values, dtype=dtype)
    array.flags.writeable = False
    return array


def array_of(values: list, dtype=None) -> np.ndarray:
    """A preprocessing list as a read-only array, made once (made_once)."""
    return made_once(values, ("array", dtype), lambda source: read_only(source, dtype))


def numeric_arrays(spec: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numeric columns' fills, means and scales as read-only arrays, made once (made_once)."""
    return made_once(spec, "fill mean scale", lambda source: tuple(
        read_only([column[field] for column in source]) for field in ("fill", "mean", "scale")))


def date_part_arrays(parts: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A date column's calendar parts: their names, means and scales, made once (made_once)."""
    return made_once(parts, "date parts", lambda source: (
        [part["part"] for part in source], read_only([part["mean"] for part in source]),
        read_only([part["scale"] for part in source])))


def spelt_alike(name: str, names) -> str | None:
    """The first of `names` that is `name` but for case and surrounding spaces (not `name` itself):
    what a missing column was most likely meant as (' workclass' from a file read without
    skipinitialspace=True, 'Mean Radius ' from a client)."""
    wanted = name.strip().casefold()
    return next((other for other in names if isinstance(other, str) and other != name
                 and other.strip().casefold() == wanted), None)


def near_columns(missing: list[str], columns: pd.Index) -> str:
    """What the frame has instead of the missing columns (spelt_alike), for the error naming them."""
    near = [f"'{found}'" for found in (spelt_alike(name, columns) for name in missing) if found is not None]
    return f" (the rows have {', '.join(near[:5])}: column names match exactly)" if near else ""


def unreadable_message(column: dict[str, Any], value: Any) -> str:
    """Why a numeric column refuses a value it cannot read, naming the form training read it in: the
    service's 400 and the pyfunc's error say the same."""
    shown = f"'{str(value)[:40]}'"
    if column.get("date"):
        written = column.get("date_format")
        as_written = f"a date as the training file wrote them ({date_example(written)}) nor " if written else ""
        return (f"not {as_written}an ISO 8601 date or time ({shown}), e.g. 2026-03-12 or 2026-03-12T09:30:00+01:00, "
                "nor Unix time")
    if column.get("number_format") or column.get("time_of_day"):
        return f"{form_refusal(column)}: {shown}"
    return f"not a number: {shown}"


def form_refusal(column: dict[str, Any]) -> str:
    """A column with a number format or times of day: the form its values must come in."""
    if column.get("time_of_day"):
        return "not a time of day as the training file wrote them (e.g. 14:30, 14:30:05, 2:30 PM)"
    example = "1,200.50" if column["number_format"]["decimal"] == "." else "1.200,50"
    return f"not a number as the training file wrote them (e.g. {example}, $5, 12.5%)"


def blank(column: pd.Series) -> np.ndarray:
    """Missing or only whitespace: an empty value, not an unreadable one."""
    return (column.isna() | (column.astype(str).str.strip() == "")).to_numpy()


def refuse_unreadable(frame: pd.DataFrame, spec: list[dict[str, Any]], numeric: np.ndarray) -> None:
    """The pyfunc's counterpart of the service's 400: a value a numeric column does not read (a word
    where training saw only numbers, a date in no form it knows) is an error naming its row and
    column, not a missing value imputed without a word. Where training found such values (`coerce`:
    "n/a" among the numbers) they are missing here too, as they were there."""
    for index, column in enumerate(spec):
        raw = frame[column["name"]]
        if column.get("coerce") or pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_datetime64_any_dtype(raw):
            continue
        unread = np.isnan(numeric[:, index]) & ~blank(raw)
        if unread.any():
            row = int(np.flatnonzero(unread)[0])
            more = f" (and {int(unread.sum()) - 1} more row(s))" if unread.sum() > 1 else ""
            raise InputSchemaError(f"row {row}, column '{column['name']}': "
                                   f"{unreadable_message(column, raw.iloc[row])}{more}")


def transform(frame: pd.DataFrame, preprocessing: dict[str, Any], categorical: list[np.ndarray] | None = None,
              strict: bool = False) -> np.ndarray:
    """Raw rows -> float32 features: impute, standardise numerics, one-hot categoricals.

    Unknown categories become all-zero one-hot rows rather than an error, so a new value at
    serving time degrades gracefully instead of failing the request. categorical: the frame's
    categorical_texts, where the caller has read them already. strict: a value a numeric column
    cannot read is an InputSchemaError (refuse_unreadable), as the service's 400; otherwise missing.
    """
    missing = [name for name in required_columns(preprocessing) if name not in frame.columns]
    if missing:
        raise InputSchemaError(f"missing input column(s): {', '.join(missing)}{near_columns(missing, frame.columns)}")
    numeric = None
    spec = preprocessing["numeric"]
    # a datetime would pass as its integer, "1.200" (decimal ",") as 1.2, and a time of day not at all
    if spec and not any(c.get(form) for c in spec for form in OWN_FORMS):
        try:  # fast path: already numeric (the common case, ~10x cheaper per request)
            numeric = frame[[c["name"] for c in spec]].to_numpy(dtype=np.float64, copy=True)
        except (TypeError, ValueError):
            pass
    if spec and numeric is None:
        numeric = np.column_stack([column_numbers(frame[c["name"]], c) for c in spec])
        if strict:
            refuse_unreadable(frame, spec, numeric)
    texts = [as_texts(frame[column["name"]].tolist()) for column in preprocessing.get("text", [])]
    if categorical is None:
        categorical = categorical_texts(frame, preprocessing)
    return transform_arrays(numeric, categorical, len(frame), preprocessing, texts)


def categorical_texts(frame: pd.DataFrame, preprocessing: dict[str, Any]) -> list[np.ndarray]:
    """Each categorical column's values as text, as training's pandas wrote them (True -> "True",
    3 -> "3"); None where missing."""
    categorical = []
    for column in preprocessing["categorical"]:
        raw = frame[column["name"]]
        as_text = raw.astype(str).to_numpy(dtype=object, copy=True)
        as_text[raw.isna().to_numpy()] = None
        categorical.append(as_text)
    return categorical


def transform_arrays(
    numeric: np.ndarray | None, categorical: list[np.ndarray], n_rows: int, preprocessing: dict[str, Any],
    texts: list[list[str]] | None = None,
) -> np.ndarray:
    """The same transform on arrays already in schema order: numerics as float64 (NaN = missing),
    each categorical column as an object array of strings (None = missing), each text column as a
    list of strings. The service builds these straight from validated rows, skipping a DataFrame
    per request."""
    blocks: list[np.ndarray] = []
    spec = preprocessing["numeric"]
    if spec:
        values = numeric.copy()
        values[~np.isfinite(values)] = np.nan
        flagged = [index for index, column in enumerate(spec) if column.get("missing_flag")]
        absent = np.isnan(values[:, flagged]) if flagged else None  # before the fill hides it
        fill, mean, scale = numeric_arrays(spec)
        values = np.where(np.isnan(values), fill, values)
        with np.errstate(over="ignore"):  # past float64 (-1e308 / 0.5): inf, clipped at FEATURE_LIMIT below
            blocks.append((values - mean) / scale)
        for index, column in enumerate(spec):  # a date's calendar parts, from its (imputed) days
            if column.get("parts"):
                names, mean, scale = date_part_arrays(column["parts"])
                blocks.append((date_parts(values[:, index], names) - mean) / scale)
        if absent is not None:  # where a column had missing values in training, whether a row's is (1) or not
            blocks.append(absent.astype(np.float64))
    for column, values in zip(preprocessing["categorical"], categorical):
        as_text = np.where(pd.isna(values), column["fill"], as_categories(values, column)).astype(object)
        categories = array_of(column["categories"], object)
        blocks.append((as_text[:, None] == categories[None, :]).astype(np.float64))
    for column, values in zip(preprocessing.get("text", []), texts or []):
        blocks.append(text_features(as_texts(values), column))
    if not blocks:
        return np.zeros((n_rows, 0), dtype=np.float32)
    # 1e308 is a finite number a row may hold: standardized, it passed float32's range and reached the
    # graph as inf (a network's inf - inf is NaN). A million standard deviations is past every split
    # and saturates every unit, so no answer within it changes.
    return np.clip(np.hstack(blocks), -FEATURE_LIMIT, FEATURE_LIMIT).astype(np.float32)


def typed_labels(metadata: dict[str, Any]) -> dict[str, Any]:
    """Each class's name -> the class in the target column's type; names themselves for a bundle
    written before metadata had "label_type", and for names the type cannot read (an object column
    holding 1 and 1.0 is named '1' and '1.0')."""
    as_typed = LABEL_TYPES[metadata.get("label_type", "string")]
    try:
        return {label: as_typed(label) for label in metadata["labels"]}
    except ValueError:
        return {label: label for label in metadata["labels"]}


def decide(probabilities: np.ndarray, decision: dict[str, Any] | None = None) -> np.ndarray:
    """Each row's class index under the bundle's decision (metadata["decision"], tuned by
    cross-validation where it raised macro F1; tasks/decision.py): on two classes {"threshold": t},
    the second class from probability t on; on more {"class_weights": [...]}, the argmax of the
    probabilities times the weights; none: the likelier class. A rare class is seldom the likelier."""
    if not decision:
        return probabilities.argmax(1)
    if "threshold" in decision:
        return (probabilities[:, 1] >= decision["threshold"]).astype(np.int64)
    return (probabilities * np.asarray(decision["class_weights"])).argmax(1)


class ModelBundle:
    """A loaded bundle: raw rows in, labels and class probabilities out."""

    def __init__(self, onnx_model: bytes, preprocessing: dict[str, Any], metadata: dict[str, Any],
                 threads: int | None = None):
        """threads: ONNX Runtime's intra-op threads (None: one per core). A server wants 1: its
        requests already overlap, and ORT's spinning pool otherwise burns the cores they need."""
        import onnxruntime as ort  # deferred: importing the module must stay cheap

        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's warnings are about graph rewrites, not our input
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            onnx_model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        # A network's graph has one output; a scikit-learn one (models/classic.py) also has 'label'.
        outputs = [output.name for output in self.session.get_outputs()]
        self.output_names = ["probabilities"] if "probabilities" in outputs else outputs[:1]
        self.preprocessing = preprocessing
        self.metadata = metadata
        self.labels: list[str] = list(metadata["labels"])
        self.decision: dict[str, Any] | None = metadata.get("decision")  # a tuned decision rule: see decide
        self.typed_labels = typed_labels(metadata)

    @classmethod
    def load(cls, bundle_dir: str | Path, threads: int | None = None, memo: bool = False) -> ModelBundle:
        """memo: keep the text embeddings made, and find those this process made already with the same
        encoder files (shared_memo): for a training process scoring the bundle on rows it embedded
        before; never in a service."""
        folder = Path(bundle_dir)
        preprocessing = with_encoder(json.loads((folder / PREPROCESSING_FILE).read_text()), folder / ENCODER_DIR,
                                     threads, memo)
        return cls(
            (folder / MODEL_FILE).read_bytes(),
            preprocessing,
            json.loads((folder / METADATA_FILE).read_text()),
            threads,
        )

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities for already-transformed features (the ONNX graph alone)."""
        if len(features) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.session.run(self.output_names, {self.input_name: features})[0]

    def labels_of(self, probabilities: np.ndarray) -> np.ndarray:
        """The label each row of probabilities is answered with (decide, by the bundle's decision)."""
        return np.asarray(self.labels, dtype=object)[decide(probabilities, self.decision)]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.predict_features(transform(frame, self.preprocessing))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per input row: 'label' and one 'proba_<label>' column per class. A warning names
        the columns holding values the model has no category for (they read as an unknown category);
        a value a numeric column cannot read is an InputSchemaError naming it, as the service's 400."""
        categorical = None  # missing columns: transform names them
        if set(required_columns(self.preprocessing)) <= set(frame.columns):
            categorical = categorical_texts(frame, self.preprocessing)
            unknown = unknown_categories(categorical, self.preprocessing)
            if unknown:
                logging.getLogger("maas").warning(
                    UNKNOWN_CATEGORY_WARNING + ": %s",
                    ", ".join(f"column '{name}' (e.g. '{value[:40]}')" for name, value in unknown.items()))
        probabilities = self.predict_features(transform(frame, self.preprocessing, categorical, strict=True))
        result = pd.DataFrame(
            probabilities, columns=[f"{PROBABILITY_PREFIX}{label}" for label in self.labels], index=frame.index
        )
        result.insert(0, "label", self.labels_of(probabilities))
        return result

    def predict_typed(self, frame: pd.DataFrame) -> pd.DataFrame:
        """predict, each label in the target column's type (0 and 1 for a 0/1 target): the pyfunc's answer."""
        result = self.predict(frame)
        if any(typed != label for label, typed in self.typed_labels.items()):  # not names (string, or unread)
            result["label"] = result["label"].map(self.typed_labels)  # int64, bool or float64, as the target
        return result
