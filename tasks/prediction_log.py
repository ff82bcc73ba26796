"""The service's prediction log and the ground truth that arrives later, as tables to monitor.

The service appends one entry per request (see maas/service_store.py): the raw rows it was sent and
the predictions it answered, as JSON, with the model label `name/version@alias`. Here they become
one table row per predicted row, keyed by (request_id, row), which is also how labels are joined.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from maas.bundle import blank
from maas.errors import MaasInputError
from maas.tables import local_path, read_table_file


@dataclass
class LoggedRows:
    """Rows the service predicted: raw inputs, and per row its request, time, model and label."""

    inputs: pd.DataFrame  # training columns, as sent
    meta: pd.DataFrame  # request_id, row, logged_at, model, version, predicted

    def logged_after(self, since: float) -> LoggedRows:
        """The rows logged after a time (one read of the log serves the drift and quality windows)."""
        keep = (self.meta["logged_at"] > since).to_numpy()
        if keep.all():
            return self
        return LoggedRows(self.inputs.loc[keep].reset_index(drop=True), self.meta.loc[keep].reset_index(drop=True))


def model_version(label: str) -> str | None:
    """'maas-wine/3@champion' -> '3'."""
    _, _, rest = label.partition("/")
    return rest.split("@")[0] or None


def read_logged_rows(connection: sqlite3.Connection, model_name: str, since: float, until: float) -> LoggedRows:
    """Rows predicted by any version of the model with since < logged_at <= until.

    orjson, not json: parsing is most of a check's time (100k logged requests: 2.8 s -> 0.7 s here).
    """
    import orjson

    records, meta = [], []
    cursor = connection.execute(
        "SELECT request_id, logged_at, model, inputs, outputs FROM predictions "
        "WHERE logged_at > ? AND logged_at <= ? AND status < 400 AND substr(model, 1, ?) = ? ORDER BY logged_at",
        (since, until, len(model_name) + 1, model_name + "/"),
    )
    loads = orjson.loads
    for request_id, logged_at, model, inputs, outputs in cursor:
        rows, answers = loads(inputs)["rows"], loads(outputs)
        version = model_version(model)
        records.extend(rows)
        meta.extend((request_id, index, logged_at, model, version, answer["label"])
                    for index, answer in enumerate(answers[:len(rows)]))
    return LoggedRows(pd.DataFrame.from_records(records),
                      pd.DataFrame(meta, columns=["request_id", "row", "logged_at", "model", "version", "predicted"]))


def whole_numbers_as_integers(column: pd.Series) -> pd.Series:
    """Numeric ids (a client's X-Request-Id: 12345) in a column with a gap read as floats, 12345.0,
    which joined no logged id: written back as the integers they are."""
    if pd.api.types.is_float_dtype(column) and (column.dropna() % 1 == 0).all():
        return column.astype("Int64")
    return column


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """Labels that arrived for logged requests: columns request_id, label, and row (default 0), as
    the file holds them (a row labelled twice too: `labelled_rows` keeps the last)."""
    frame = read_table_file(local_path(str(path)))
    missing = [name for name in ("request_id", "label") if name not in frame.columns]
    if missing:
        raise MaasInputError(f"{path}: ground-truth file lacks column(s) {', '.join(missing)} "
                             "(expected request_id, label, and row for multi-row requests)")
    labels = pd.DataFrame({
        "request_id": whole_numbers_as_integers(frame["request_id"]).astype(str),
        "row": pd.to_numeric(frame["row"], errors="coerce").fillna(0).astype(int) if "row" in frame else 0,
        "label": frame["label"].astype(str),
    })
    return labels


def _as_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return None if number != number else number


def in_model_spelling(values: pd.Series, labels: list[str]) -> pd.Series:
    """Arriving labels spelt as the model spells them ('yes ' as 'Yes'), as training merged a label's
    spellings (data.merge_label_spellings), and a number as the model's number ('30.0' as '30': pandas
    reads a labels column with a gap as floats, where training wrote whole classes as integers); one of
    the model's own labels is kept as it is."""
    own = set(labels)
    by_key = {label.strip().casefold(): label for label in labels}
    by_number: dict[float, str] = {}
    for label in labels:
        if (number := _as_number(label)) is not None:
            by_number.setdefault(number, label)

    def spelt(value: Any) -> Any:
        if value in own:
            return value
        key = str(value).strip()
        found = by_key.get(key.casefold())
        if found is None and (number := _as_number(key)) is not None:
            found = by_number.get(number)
        return value if found is None else found

    return values.map(spelt)


def with_ground_truth(logged: LoggedRows, labels: pd.DataFrame) -> pd.DataFrame:
    """The logged rows that have a label: meta columns plus 'label' and the row's position."""
    meta = logged.meta.reset_index(names="position")
    return meta.merge(labels, on=["request_id", "row"], how="inner")


def labelled_rows(recent: LoggedRows, truth: pd.DataFrame, labels: list[str], source: str
                  ) -> tuple[pd.DataFrame, list[str]]:
    """The recent rows with their ground truth, spelt as the model spells its labels, and notes on
    what was left out and why. A label the model does not know ('maybe') would count as a wrong
    answer and fire a quality alert on the model's behalf: it is left out. A row labelled twice
    keeps its last label. Labels none of whose ids were logged are said so: live quality is then
    silent, and the usual cause is ids the service never gave (it returns each in X-Request-Id)."""
    notes = []
    named = Path(source).name
    unlabelled = blank(truth["label"])
    if unlabelled.any():  # a row whose label has not come yet: nothing to judge, and no class the model lacks
        notes.append(f"{named}: {int(unlabelled.sum())} row(s) without a label: left out of live quality")
        truth = truth[~unlabelled]
    repeated = truth.duplicated(["request_id", "row"], keep=False)
    if repeated.any():
        conflicting = truth[repeated].groupby(["request_id", "row"])["label"].nunique().gt(1).sum()
        notes.append(f"{named}: {int(repeated.sum())} label(s) for rows labelled more than once"
                     f"{f' ({conflicting} with different labels)' if conflicting else ''}: the last one kept")
        truth = truth.drop_duplicates(["request_id", "row"], keep="last")
    truth = truth.assign(label=in_model_spelling(truth["label"], labels))
    unknown = ~truth["label"].isin(labels)
    if unknown.any():
        seen = ", ".join(repr(label) for label in truth.loc[unknown, "label"].value_counts().index[:3])
        notes.append(f"{named}: {int(unknown.sum())} label(s) not among the model's classes ({', '.join(labels)}), "
                     f"e.g. {seen}: left out of live quality")
        truth = truth[~unknown]
    labelled = with_ground_truth(recent, truth)
    if labelled.empty and len(truth) and len(recent.meta):
        ids, logged = truth["request_id"], recent.meta["request_id"]
        notes.append(f"{named}: none of its {ids.nunique()} request id(s) (e.g. {ids.iloc[0]!r}) is among the "
                     f"{logged.nunique()} logged in the quality window (e.g. {logged.iloc[0]!r}); the service returns "
                     "each request's id in X-Request-Id, and takes the caller's")
    return labelled, notes
