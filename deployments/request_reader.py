"""Reading a POST /predict body into the model's columns, or a 4xx that names the row and field.

Serving accepts what training accepted: a null where training had missing values is imputed the
same way, columns training dropped or never saw are ignored (unless serving.strict_columns), and a
category may come as a number. A request whose rows have exactly the training columns, finite
numbers, text where text is expected (a category may be a boolean or null) becomes numpy columns
directly (~2 us a row); any other
goes through a pydantic model of one row (~10 us a row), which gives the verdict and names the field,
as every request to a model with a date column does (an ISO 8601 string, read as days).
"""

from __future__ import annotations

import codecs
import itertools
import json
import operator
import zlib
from functools import partial
from typing import Annotated, Any, NamedTuple

import numpy as np
import orjson  # request bodies, answers and the prediction log: ~4x faster than json, on the hot path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError, create_model

from maas.bundle import (PROBABILITY_PREFIX, category_sets, column_numbers, form_refusal, formatted_number,
                         hours_of_day, spelt_alike, unreadable_message)


class Columns(NamedTuple):
    """A request's rows as arrays in the bundle's column order, ready for its preprocessing."""

    numeric: np.ndarray | None
    categorical: list[np.ndarray]
    n_rows: int
    text: list[list[str | None]] = []  # per text column, its values (None: missing, read as the empty text)


class BadRequest(Exception):
    """A request the service refuses: the status and a message naming the row and field (and headers
    the answer carries, e.g. Accept-Encoding with a 415)."""

    def __init__(self, status: int, message: str, detail: list | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.detail, self.headers = status, message, detail, headers or {}


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _missing_if_unreadable(value: Any) -> Any:
    """A numeric column that was text with stray strings in training: such a string is missing here too."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return None
    return value


def _string_reader(column: dict[str, Any], parse, refusal: str):
    """A numeric column whose training file wrote its values in a form of their own: a string is
    parsed as training parsed it (`parse`: str -> float, NaN where it does not read); one that does
    not read is missing where training had such values (`coerce`) or it is blank, else refused with
    `refusal`, naming the form. Numbers pass as they are."""
    missing_if_unreadable = column.get("coerce")

    def read(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        number = parse(value)
        if number != number:
            if missing_if_unreadable or not value.strip():
                return None
            raise ValueError(refusal)
        return number

    return read


def _number_reader(column: dict[str, Any]):
    """Numbers written with currency, percent or digit-group marks, read as training read them ("$1,200.50")."""
    return _string_reader(column, partial(formatted_number, decimal=column["number_format"]["decimal"]),
                          form_refusal(column))


def _time_reader(column: dict[str, Any]):
    """Times of day, "14:30" or "2:30 PM", read as hours since midnight, as training read them."""
    return _string_reader(column, hours_of_day, form_refusal(column))


def _nan_as_missing(value: Any) -> Any:
    """NaN is pandas' missing value, and Python's json writes it as a bare NaN: what a client that
    posts `df.to_dict("records")` with `requests` sends for a gap. It is missing, as null is."""
    return None if isinstance(value, float) and value != value else value


def _scalar_as_text(value: Any) -> Any:
    """A number or true/false in a text column whose training rows held some (a ticket body "404",
    a JSON or Excel cell typed as a number): its text, as training read it (str)."""
    return str(value) if isinstance(value, (int, float)) else value


def _date_value(value: Any) -> Any:
    """A date column's value as sent: an ISO 8601 string or a Unix time (pandas' `to_json` writes
    dates as milliseconds by default); read as days by column_numbers."""
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError("expected an ISO 8601 date or time (a string) or a Unix time (a number)")


def _as_category(value: Any) -> Any:
    """A category as training's pandas read it: true -> "True", 3 -> "3"."""
    return str(value) if isinstance(value, (bool, int, float)) else value


def row_model(preprocessing: dict[str, Any], strict: bool) -> type[BaseModel]:
    """A pydantic model of one raw row from the bundle's preprocessing. Every training column must be
    there; null is a missing value, imputed as in training; numbers must be finite. Other columns
    are ignored, or refused when `strict`. Errors name the row and column."""
    fields: dict[str, Any] = {}
    for index, column in enumerate(preprocessing["numeric"]):
        if column.get("date"):  # an ISO 8601 string or Unix time, kept as sent; read as days as in training
            kind = Annotated[Any, BeforeValidator(_date_value)]
        elif column.get("number_format"):
            kind = Annotated[FiniteFloat | None, BeforeValidator(_number_reader(column))]
        elif column.get("time_of_day"):
            kind = Annotated[FiniteFloat | None, BeforeValidator(_time_reader(column))]
        elif column.get("coerce"):
            kind = Annotated[FiniteFloat | None, BeforeValidator(_missing_if_unreadable)]
        else:
            kind = FiniteFloat | None
        fields[f"n{index}"] = (Annotated[kind, BeforeValidator(_nan_as_missing)], Field(..., alias=column["name"]))
    for index, column in enumerate(preprocessing["categorical"]):
        fields[f"c{index}"] = (Annotated[str | None, BeforeValidator(_as_category), BeforeValidator(_nan_as_missing)],
                               Field(..., alias=column["name"]))
    for index, column in enumerate(preprocessing.get("text", [])):  # a text must be a string (or null), unless
        read = [BeforeValidator(_scalar_as_text)] if column.get("scalars_as_text") else []  # training's had numbers
        fields[f"t{index}"] = (Annotated[StrictStr | None, *read, BeforeValidator(_nan_as_missing)],
                               Field(..., alias=column["name"]))
    return create_model("Row", __config__=ConfigDict(extra="forbid" if strict else "ignore", populate_by_name=False),
                        **fields)


def _string_columns(values_by_row: list[tuple] | None) -> list[tuple] | None:
    """Per-row value tuples as per-column tuples when every value is a string; None otherwise."""
    if values_by_row is None:
        return []
    columns = list(zip(*values_by_row))
    return None if any(type(value) is not str for values in columns for value in values) else columns


def _category_columns(values_by_row: list[tuple] | None) -> list[tuple] | None:
    """Per-column tuples of categories when every value is a string, a boolean (read as training's
    pandas wrote it: true -> "True") or null (missing); None otherwise. A JSON true, or a gap, sent
    the whole request through pydantic: 5 and 3.3 us a row against 0.6."""
    if values_by_row is None:
        return []
    columns = []
    for values in zip(*values_by_row):
        if any(type(value) is not str for value in values):
            if any(value is not None and type(value) is not str and type(value) is not bool for value in values):
                return None
            values = tuple(str(value) if type(value) is bool else value for value in values)
        columns.append(values)
    return columns


def _tuple_getter(names: list[str]):
    """row -> tuple of its values for these columns (operator.itemgetter, always a tuple)."""
    if len(names) == 1:
        return lambda row: (row[names[0]],)
    return operator.itemgetter(*names) if names else None


class Read(NamedTuple):
    """A request as read: the body the prediction log keeps, the columns, and the keys it ignored."""

    logged: bytes
    columns: Columns
    ignored: list[str]


class RequestReader:
    """Reads request bodies for one bundle's preprocessing (its columns, in its order)."""

    def __init__(self, preprocessing: dict[str, Any], strict: bool = False):
        self.preprocessing = preprocessing
        self.row = row_model(preprocessing, strict)
        self.request = create_model("PredictRequest", rows=(Annotated[list[self.row], Field(min_length=1)], ...))
        self.numeric = [column["name"] for column in preprocessing["numeric"]]
        self.has_dates = any(column.get("date") for column in preprocessing["numeric"])
        self.categorical = [column["name"] for column in preprocessing["categorical"]]
        self.text = [column["name"] for column in preprocessing.get("text", [])]
        self.category_sets = category_sets(preprocessing)  # once, not per request (unknown_categories)
        self.columns = frozenset(self.numeric + self.categorical + self.text)
        self._numeric_of, self._categorical_of = _tuple_getter(self.numeric), _tuple_getter(self.categorical)
        self._text_of = _tuple_getter(self.text)

    def exact_columns(self, rows: Any) -> Columns | None:
        """Columns straight from parsed JSON when every row has exactly the training columns, finite
        numbers and text where expected; None otherwise (pydantic then gives the verdict)."""
        if type(rows) is not list or not rows or self.has_dates:
            return None  # dates are read by pydantic and validated_columns
        try:
            numeric_values = list(map(self._numeric_of, rows)) if self.numeric else None
            categorical_values = list(map(self._categorical_of, rows)) if self.categorical else None
            text_values = list(map(self._text_of, rows)) if self.text else None
        except (KeyError, TypeError, IndexError):
            return None  # a row that is not an object, or lacks a column
        if set(map(len, rows)) != {len(self.columns)}:
            return None  # every column is there, so a longer row has others too
        numeric = None
        if numeric_values is not None:
            try:
                numeric = np.array(list(itertools.chain.from_iterable(numeric_values)))
            except (ValueError, TypeError, OverflowError):
                return None
            if numeric.dtype.kind not in "fi":
                return None  # text ("1.5") or null among the numbers: pydantic reads them, the log keeps its numbers
            numeric = numeric.astype(np.float64, copy=False)
            if not np.isfinite(numeric).all():
                return None
            numeric = numeric.reshape(len(rows), len(self.numeric))
        categorical = _category_columns(categorical_values)
        text = _string_columns(text_values)
        if categorical is None or text is None:
            return None  # a number, null or list where text is expected: pydantic gives the verdict
        return Columns(numeric, [np.array(values, dtype=object) for values in categorical], len(rows),
                       [list(values) for values in text])

    def validated_columns(self, rows: list[dict[str, Any]]) -> Columns:
        """Columns of rows the row model accepted (None: a missing value, imputed downstream)."""
        if self.has_dates:
            numeric = np.column_stack([column_numbers([row[column["name"]] for row in rows], column)
                                       for column in self.preprocessing["numeric"]])
            refuse_unreadable_dates(rows, numeric, self.preprocessing["numeric"])
        else:
            numeric = (np.array([[row[name] for name in self.numeric] for row in rows], dtype=np.float64)
                       if self.numeric else None)
        categorical = [np.array([row[name] for row in rows], dtype=object) for name in self.categorical]
        text = [[row[name] for row in rows] for name in self.text]
        return Columns(numeric, categorical, len(rows), text)

    def read(self, body: bytes, max_rows: int) -> Read:
        """The request as the prediction log keeps it ({"rows": [...]}), its columns, and the columns it
        sent that the model does not read; BadRequest (400/413) names what is wrong. A request that
        passes the exact check is logged as received. A bare list of rows (what pandas'
        `to_json(orient="records")` writes) is read as {"rows": that list}."""
        payload, _ = loads_json(body)
        if type(payload) is list:
            rows, body = payload, b'{"rows":' + body + b"}"
        else:
            rows = payload.get("rows") if type(payload) is dict else None
            if rows is None and type(payload) is dict and self.columns & payload.keys():
                keys = ", ".join(repr(key) for key in list(payload)[:3]) + (", ..." if len(payload) > 3 else "")
                raise BadRequest(400, f'body: expected {{"rows": [row, ...]}}; this body looks like one row (it has '
                                      f'{keys}): send {{"rows": [that row]}}')
            scoring = [key for key in MLFLOW_KEYS if rows is None and type(payload) is dict and key in payload]
            if scoring:
                raise BadRequest(400, f'body: expected {{"rows": [row, ...]}}; {scoring[0]} is MLflow\'s scoring '
                                      f'format, which this service reads at POST {INVOCATIONS_PATH}')
        if isinstance(rows, list):
            refuse_too_many(rows, max_rows)
        columns = self.exact_columns(rows)
        if columns is not None:
            return Read(body, columns, [])
        try:
            request = self.request.model_validate_json(body)
        except ValidationError as error:
            raise bad_rows(error, rows) from None
        validated = [row.model_dump(by_alias=True) for row in request.rows]
        refuse_too_many(validated, max_rows)  # a body orjson could not read (e.g. a 100-digit integer) is counted here
        sent = set().union(*(row.keys() for row in rows)) if isinstance(rows, list) and all(
            isinstance(row, dict) for row in rows) else set()
        # as validated: "1.5" logged as 1.5, the ignored columns left out
        return Read(orjson.dumps({"rows": validated}), self.validated_columns(validated), sorted(sent - self.columns))


def refuse_unreadable_dates(rows: list[dict[str, Any]], numbers: np.ndarray, spec: list[dict[str, Any]]) -> None:
    """400 for a date that does not read as ISO 8601 (nor in the training file's own format), unless
    training had such values too (`coerce`: then it is missing, as it was there): the same rule as for numbers."""
    for index, column in enumerate(spec):
        if not column.get("date") or column.get("coerce"):
            continue
        for row_index, (row, days) in enumerate(zip(rows, numbers[:, index])):
            value = row[column["name"]]
            if np.isnan(days) and value is not None and str(value).strip():
                raise BadRequest(400, f"row {row_index}, column '{column['name']}': {unreadable_message(column, value)}")


INVOCATIONS_PATH = "/invocations"  # MLflow's scoring protocol, for clients of `mlflow models serve`
MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def is_csv(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "text/csv"


def rows_from_csv(body: bytes, text_columns: list[str]) -> bytes:
    """A CSV body with its header as {"rows": [...]}, read as maas read the training file (its
    encoding, delimiter and spacing; empty: null), except that a text column stays text where its
    values look like numbers."""
    import io

    import pandas as pd

    from maas.tables import ENCODINGS, decimal_mark, fields_follow_spaces, header_delimiter

    for encoding in ENCODINGS:  # as training read its file: UTF-8, else Windows-1252 (Excel's CSV on Windows)
        try:  # (a charset named in Content-Type was decoded already)
            text = body.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise BadRequest(400, "body: not a CSV table: neither UTF-8 nor Windows-1252 text")
    header = text.split("\n", 1)[0].rstrip("\r")
    delimiter = header_delimiter(header)  # and the rest as training read its file: ';' with decimal commas
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, decimal=decimal_mark(delimiter),
                            skipinitialspace=fields_follow_spaces(header, delimiter),
                            dtype={name: str for name in text_columns})
    except (ValueError, pd.errors.ParserError) as error:
        raise BadRequest(400, f"body: not a CSV table with a header ({str(error).splitlines()[0][:120]})") from None
    return orjson.dumps({"rows": frame.astype(object).where(frame.notna(), None).to_dict("records")},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def rows_from_mlflow_request(body: bytes, content_type: str, text_columns: list[str]) -> bytes:
    """A request in MLflow's scoring format (what `mlflow models serve` takes at /invocations) as this
    service's {"rows": [...]}: JSON with dataframe_split ({"columns", "data"}), dataframe_records,
    or instances / inputs (records, or {column: [values]}); or a CSV body (Content-Type text/csv)
    with its header. The rows are then read as /predict reads them."""
    if is_csv(content_type):
        return rows_from_csv(body, text_columns)
    payload, strict = loads_json(body)
    if payload is None:
        raise BadRequest(400, "body: not JSON (MLflow's scoring format, or a CSV with Content-Type: text/csv)")
    keys = [key for key in MLFLOW_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1:
        raise BadRequest(400, f"body: expected an object with one of {', '.join(MLFLOW_KEYS)} (MLflow's scoring "
                              f"format){'; it has ' + ', '.join(map(str, payload)) if isinstance(payload, dict) else ''}")
    key, value = keys[0], payload[keys[0]]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list) or not isinstance(value.get("data"), list):
            raise BadRequest(400, "dataframe_split: expected {\"columns\": [names], \"data\": [[values], ...]}")
        columns = value["columns"]
        for index, row in enumerate(value["data"]):
            if not isinstance(row, list) or len(row) != len(columns):
                raise BadRequest(400, f"dataframe_split.data[{index}]: expected a list of {len(columns)} values, "
                                      "one per column")
        rows: Any = [dict(zip(columns, row)) for row in value["data"]]
    elif key != "dataframe_records" and isinstance(value, dict):  # columnar: {column: [values]}
        lengths = {len(values) if isinstance(values, list) else -1 for values in value.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise BadRequest(400, f"{key}: expected records, or {{column: [values]}} with lists of one length")
        rows = [dict(zip(value, values)) for values in zip(*value.values())]
    else:
        rows = value
    # orjson writes NaN and Infinity as null; json keeps them for the row model (NaN missing, Infinity a 400)
    return orjson.dumps({"rows": rows}) if strict else json.dumps({"rows": rows}).encode()


def loads_json(body: bytes) -> tuple[Any, bool]:
    """The parsed body (None: not JSON) and whether it was strict JSON. orjson refuses the bare NaN
    and Infinity that Python's json writes, as `requests.post(json=...)` does for a pandas gap:
    such a body is read by json, and the row model takes NaN as missing and refuses Infinity."""
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass
    # json.loads(bytes) would also take UTF-16 and UTF-32, which the log and the readers do not
    not_utf8 = "body: not UTF-8 ({}): JSON is sent in UTF-8, or in a charset that Content-Type names"
    if b"\x00" in body:  # no JSON text holds a NUL byte; ASCII in UTF-16 or UTF-32 is all of them
        raise BadRequest(400, not_utf8.format("it holds NUL bytes, as UTF-16 and UTF-32 do"))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(400, not_utf8.format(f"{error.reason} at byte {error.start}")) from None
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return None, False
    try:  # json takes a lone surrogate escape ("\ud800"), which is no text: the tokenizer and the log failed on it
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest(400, "body: a string holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff), "
                              "which is not text") from None
    return payload, False


def mlflow_predictions(answers: list[dict], typed_labels: dict[str, object]) -> bytes:
    """The answers as `mlflow models serve` gives the model's pyfunc output: {"predictions": records}
    with 'label' (in the target column's type: bundle.typed_labels) and 'proba_<label>' per row."""
    return orjson.dumps({"predictions": [
        {"label": typed_labels[answer["label"]], **{f"{PROBABILITY_PREFIX}{label}": value for label, value in answer["probabilities"].items()}}
        for answer in answers]})


def refuse_too_many(rows: list, max_rows: int) -> None:
    if len(rows) > max_rows:
        raise BadRequest(413, f"{len(rows)} rows in one request; the limit is {max_rows}")


def bad_rows(error: ValidationError, rows: Any = None) -> BadRequest:
    """400 naming the first problem in one line ("row 2, column 'x': ..."), every problem in detail.
    A missing column the row has under another case or spacing ('Mean Radius ') is named too."""
    detail = [{"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
              for item in error.errors(include_url=False, include_input=False)]
    first = detail[0]
    loc = first["loc"]
    if len(loc) >= 3 and loc[0] == "rows":
        where = f"row {loc[1]}, column '{loc[2]}'"
        near = near_key(rows, loc[1], loc[2]) if first["type"] == "missing" else None
        if near is not None:
            first = {**first, "msg": f"{first['msg']} (the row has '{near}': column names match exactly)"}
    else:
        where = ".".join(map(str, loc)) or "body"
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return BadRequest(400, f"{where}: {first['msg']}{more}", detail)


def near_key(rows: Any, index: Any, column: Any) -> str | None:
    """A key of rows[index] that is `column` but for case and surrounding spaces, if any."""
    try:
        row = rows[index]
    except (TypeError, IndexError, KeyError):
        return None
    if not isinstance(row, dict) or not isinstance(column, str):
        return None
    return spelt_alike(column, row)


async def read_body(receive, headers: dict[str, str], max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be larger than max_bytes
    (BentoML 1.4 has no request-size limit of its own), decompressed and in UTF-8 (`decoded`)."""
    return decoded(await received_body(receive, headers, max_bytes), headers, max_bytes)


CONTENT_CODINGS = {"gzip": 16 + 15, "x-gzip": 16 + 15, "deflate": 15}  # zlib's wbits: gzip header, zlib header
UTF8_NAMES = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
# UTF-32's marks first: UTF-16 LE's is the start of UTF-32 LE's. Decoding as "utf-16"/"utf-32" drops the mark.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
DRAIN_BYTES = 64 * 1024 * 1024  # a refused body this large is still read, so its client gets the 413
NOT_ROWS_TYPES = ("application/x-www-form-urlencoded", "multipart/", "application/xml", "text/xml")


def decoded(body: bytes, headers: dict[str, str], max_bytes: int) -> bytes:
    """The body as the readers take it: a gzip or deflate Content-Encoding undone (at most max_bytes
    once decompressed: 413 past that), text in a declared charset other than UTF-8 re-encoded.
    A coding or charset not known here is a 415, as is a form or XML body; a body that does not
    decode, a 400. Both name the header."""
    coding = headers.get("content-encoding", "").strip().lower()
    if coding and coding != "identity":
        wbits = CONTENT_CODINGS.get(coding)
        if wbits is None:
            raise BadRequest(415, f"Content-Encoding '{coding[:40]}' is not supported: send the body as is, "
                                  "gzip or deflate", headers={"accept-encoding": "gzip, deflate"})
        inflater = zlib.decompressobj(wbits)
        try:
            try:
                body = inflater.decompress(body, max_bytes + 1)
            except zlib.error:
                if coding != "deflate":
                    raise
                inflater = zlib.decompressobj(-15)  # a raw deflate stream, as some clients send for 'deflate'
                body = inflater.decompress(body, max_bytes + 1)
        except zlib.error as error:
            raise BadRequest(400, f"body: not {coding} data, as Content-Encoding says ({error})") from None
        if len(body) > max_bytes:
            raise BadRequest(413, f"request body exceeds {max_bytes} bytes once decompressed{FEWER_ROWS}")
        if not inflater.eof:
            raise BadRequest(400, f"body: truncated {coding} data (Content-Encoding: {coding})")
    content_type = headers.get("content-type", "").lower()
    if content_type.startswith(NOT_ROWS_TYPES):
        raise BadRequest(415, f"Content-Type '{content_type.split(';')[0][:60]}': send rows as JSON "
                              "(application/json) or CSV (text/csv)")
    charset = content_type.partition("charset=")[2].split(";")[0].strip().strip('"')
    if body.startswith(codecs.BOM_UTF8):  # Windows tools write one; the readers and the log take UTF-8 without it
        body = body[len(codecs.BOM_UTF8):]
    elif not charset:  # a UTF-16 or UTF-32 byte order mark names its encoding
        charset = next((name for mark, name in BYTE_ORDER_MARKS if body.startswith(mark)), "")
    if charset and charset not in UTF8_NAMES:
        try:
            body = body.decode(charset).encode()
        except LookupError:
            raise BadRequest(415, f"Content-Type charset '{charset[:40]}' is not known: send UTF-8") from None
        except UnicodeDecodeError as error:
            raise BadRequest(400, f"body: not {charset} text, as Content-Type says ({error.reason} at byte "
                                  f"{error.start})") from None
    return body


# what a client whose body is too large can do, and what the operator can raise
FEWER_ROWS = ": send fewer rows per request (the service's limit is serving.max_request_bytes)"


async def received_body(receive, headers: dict[str, str], max_bytes: int) -> bytes:
    """The body's bytes as they came, refused with 413 once they pass max_bytes."""
    declared = headers.get("content-length") or "0"
    if not declared.isdigit():
        raise BadRequest(400, f"Content-Length '{declared[:40]}' is not a number of bytes")
    declared = int(declared)
    if declared > max_bytes:
        await drained(receive, declared)
        raise BadRequest(413, f"request body of {declared} bytes exceeds {max_bytes}{FEWER_ROWS}")
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > max_bytes:
            if message.get("more_body"):
                await drained(receive)
            raise BadRequest(413, f"request body exceeds {max_bytes} bytes{FEWER_ROWS}")
        if not message.get("more_body"):
            return bytes(body)


async def unread_body_dropped(receive, headers: dict[str, str]) -> None:
    """Before a refusal sent without reading the body (401, 403, 429): read and drop it, as for a 413."""
    declared = headers.get("content-length", "")
    await drained(receive, int(declared) if declared.isdigit() else 0)


async def drained(receive, declared: int = 0) -> None:
    """Read and drop the rest of a refused body, up to DRAIN_BYTES: a client that sends its whole body
    before reading (requests, urllib) otherwise finds the connection closed under it (a broken pipe
    or a reset) and never sees the 413. A larger body is cut off, as nginx does past its lingering time."""
    if declared > DRAIN_BYTES:
        return
    read = 0
    while read <= DRAIN_BYTES:
        message = await receive()
        read += len(message.get("body", b""))
        if not message.get("more_body"):
            return
