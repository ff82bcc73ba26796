"""The service gate in-process, as an ASGI app (no server, no subprocess): request parsing, column
checks, the adaptive batcher, keys and tier limits, metering. The real `bentoml serve` is tested in
tests/integration/test_service.py."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from deployments.batcher import Batcher
from deployments.gate import ServedModel, ServedModels, ServiceGate
from deployments.request_reader import BadRequest, RequestReader, rows_from_csv
from maas.bundle import ModelBundle
from maas.config import ServingConfig, TierConfig
from maas.api_keys import create_key
from maas.service_store import connect, usage_report
from tasks.data import prepare_data
from tasks.export import write_bundle
from tasks.train import TrainingSettings, train_on_data
from tests.conftest import quick_config
from tests.tables import write_messy


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """A quickly trained wine model as a bundle, and a few raw rows as JSON-ready dicts."""
    config = quick_config("wine", "train.max_epochs=5")
    prepared = prepare_data(config.data, config.seed)
    trained = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
    folder = write_bundle(tmp_path_factory.mktemp("bundle"), trained.network, trained.spec, prepared)
    rows = json.loads(prepared.splits.x_test.head(8).to_json(orient="records"))
    return ModelBundle.load(folder, 1), rows


@pytest.fixture(scope="module")
def loans(tmp_path_factory):
    """A quickly trained model of the loans table (a True/False column with gaps, categories) as a
    bundle, and a few raw rows as JSON-ready dicts."""
    folder = tmp_path_factory.mktemp("loans")
    path, target = write_messy("loans", folder)
    config = quick_config(str(path), f"data.target={target}", "train.max_epochs=3")
    prepared = prepare_data(config.data, config.seed)
    trained = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
    bundle = write_bundle(folder / "bundle", trained.network, trained.spec, prepared)
    rows = json.loads(prepared.splits.x_test.head(6).to_json(orient="records", date_format="iso"))
    return ModelBundle.load(bundle, 1), rows


async def not_found(scope, receive, send):
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"passed through"})


def gate_for(bundle, **settings) -> ServiceGate:
    serving = ServingConfig(**{"tiers": {"free": TierConfig(requests_per_minute=2, monthly_rows=10),
                                         "pro": TierConfig(requests_per_minute=10_000, monthly_rows=1_000_000)},
                               **settings})
    return ServiceGate(not_found, ServedModels(ServedModel(bundle, "maas-wine/1@champion")), serving, CollectorRegistry())


def call(gate, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """(method, path, keyword arguments) each, sent concurrently to the gate as an ASGI app."""
    async def send_all():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            return await asyncio.gather(*(client.request(method, path, **kwargs) for method, path, kwargs in requests))

    return asyncio.run(send_all())


def test_a_request_gets_the_bundles_own_predictions(wine, maas_home):
    bundle, rows = wine
    gate = gate_for(bundle, auth=False)
    (response,) = call(gate, [("POST", "/predict", {"json": {"rows": rows}})])
    assert response.status_code == 200 and response.headers["x-request-id"]
    import pandas as pd

    expected = bundle.predict(pd.DataFrame(rows))
    assert [item["label"] for item in response.json()] == list(expected["label"])
    served = np.array([[item["probabilities"][label] for label in bundle.labels] for item in response.json()])
    np.testing.assert_allclose(served, expected[[f"proba_{label}" for label in bundle.labels]].to_numpy(), atol=1e-6)


def test_the_bundles_decision_rule_makes_the_label_at_predict_and_invocations_and_metadata_gives_it(wine, maas_home):
    """A bundle with class weights (tasks/decision.py) answers the weighted argmax; the probabilities stay."""
    import copy

    import pandas as pd

    bundle, rows = wine
    weighted = copy.copy(bundle)
    weighted.decision = {"class_weights": [1.0, 1.0, 1e6]}  # the third class wherever it has any probability
    weighted.metadata = {**bundle.metadata, "decision": weighted.decision}
    gate = gate_for(weighted, auth=False)
    answer, invocations, metadata = call(gate, [("POST", "/predict", {"json": {"rows": rows}}),
                                                ("POST", "/invocations", {"json": {"dataframe_records": rows}}),
                                                ("GET", "/metadata", {})])
    probabilities = bundle.predict_proba(pd.DataFrame(rows))
    expected = [bundle.labels[index] for index in (probabilities * [1.0, 1.0, 1e6]).argmax(1)]
    assert [item["label"] for item in answer.json()] == expected == list(weighted.predict(pd.DataFrame(rows))["label"])
    assert expected != [bundle.labels[index] for index in probabilities.argmax(1)]  # the rule changed some answers
    assert [item["label"] for item in invocations.json()["predictions"]] == expected
    served = np.array([[item["probabilities"][label] for label in bundle.labels] for item in answer.json()])
    np.testing.assert_allclose(served, probabilities, atol=1e-6)
    assert metadata.json()["decision"] == {"class_weights": [1.0, 1.0, 1e6]}


def test_mlflow_scoring_requests_at_invocations_get_the_same_answers_in_mlflows_form(wine, maas_home):
    """A client of `mlflow models serve` (dataframe_split, dataframe_records, instances, inputs as
    columns, a CSV body) gets what /predict gives, as pyfunc's columns under "predictions"; with
    the same key check, metering and prediction log."""
    import pandas as pd

    bundle, rows = wine
    gate = gate_for(bundle)
    _, key = create_key(connect(), "mlflow client", tier="pro")
    headers = {"x-api-key": key}
    frame = pd.DataFrame(rows)
    split = json.loads(frame.to_json(orient="split", index=False))
    bodies = [{"json": {"dataframe_split": split}}, {"json": {"dataframe_records": rows}},
              {"json": {"instances": rows}}, {"json": {"inputs": {column: frame[column].tolist() for column in frame}}},
              {"content": frame.to_csv(index=False).encode(), "headers": {"content-type": "text/csv; charset=utf-8"}}]
    plain, *answers = call(gate, [("POST", "/predict", {"json": {"rows": rows}, "headers": headers})] + [
        ("POST", "/invocations", {**body, "headers": {**headers, **body.get("headers", {})}}) for body in bodies])
    expected = [{"label": item["label"], **{f"proba_{label}": p for label, p in item["probabilities"].items()}}
                for item in plain.json()]
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, (body, answer.text)
        predicted = answer.json()["predictions"]
        assert [item["label"] for item in predicted] == [item["label"] for item in expected]
        np.testing.assert_allclose([[item[f"proba_{label}"] for label in bundle.labels] for item in predicted],
                                   [[item[f"proba_{label}"] for label in bundle.labels] for item in expected], atol=1e-6)
    (unkeyed,) = call(gate, [("POST", "/invocations", {"json": {"dataframe_records": rows}})])
    assert unkeyed.status_code == 401
    (ping,) = call(gate, [("GET", "/ping", {})])
    assert ping.status_code == 200
    gate.meter.flush()
    assert usage_report(connect(), month=None)[0]["rows"] == len(rows) * (1 + len(bodies))


@pytest.mark.parametrize("body, words", [
    ({"rows": [{}]}, "expected an object with one of dataframe_split, dataframe_records, instances, inputs"),
    ({"dataframe_split": {"columns": ["a"]}}, "dataframe_split: expected"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3]]}}, "dataframe_split.data[1]: expected a list of 2"),
    ({"inputs": {"a": [1, 2], "b": [1]}}, "inputs: expected records, or {column: [values]} with lists of one length"),
    ({"dataframe_records": [{"alcohol": 1.0}]}, "row 0, column"),
    ([1, 2], "expected an object with one of"),
])
def test_bad_mlflow_scoring_requests_are_400_naming_the_problem(wine, maas_home, body, words):
    gate = gate_for(wine[0], auth=False)
    (response,) = call(gate, [("POST", "/invocations", {"json": body})])
    assert response.status_code == 400 and words in response.json()["error"], response.text
    (csv,) = call(gate, [("POST", "/invocations", {"content": b"\x81\x8d\x00", "headers": {"content-type": "text/csv"}})])
    assert csv.status_code == 400 and "body: not a CSV table" in csv.json()["error"], csv.text


def test_columns_the_model_does_not_read_are_named_in_a_header_whatever_their_names(wine, maas_home):
    bundle, rows = wine
    gate = gate_for(bundle, auth=False)
    extra = {"customer id": "C1", "Ā": None, "a,b": 2, "50%": True, " ": 1}
    plain, with_extra = call(gate, [("POST", "/predict", {"json": {"rows": rows[:2]}}),
                                    ("POST", "/predict", {"json": {"rows": [{**row, **extra} for row in rows[:2]]}})])
    assert with_extra.status_code == 200 and with_extra.json() == plain.json()
    assert "x-maas-ignored-columns" not in plain.headers
    assert [unquote(name) for name in with_extra.headers["x-maas-ignored-columns"].split(", ")] == sorted(extra)


def test_a_true_false_column_takes_every_spelling_and_values_without_a_category_are_named(loans, maas_home, caplog):
    bundle, rows = loans
    # with gaps, pandas read the column as objects, which were numbers (0/1) before: "TRUE" was a 400
    assert {column["name"]: column["type"] for column in bundle.metadata["input_schema"]}["homeowner"] == "boolean"
    known = [{**row, "homeowner": True, "employment": "employed", "purpose": "car"} for row in rows]
    spelled = [{**row, "homeowner": spelling} for row, spelling in zip(known, ["true", "TRUE", " yes", 1, 1.0, "on"])]
    new_values = [{**known[0], "employment": "Employed", "purpose": "boat"}, known[1]]
    plain, other, unknown = call(gate_for(bundle, auth=False), [("POST", "/predict", {"json": {"rows": rows}})
                                                                 for rows in (known, spelled, new_values)])
    assert plain.status_code == other.status_code == unknown.status_code == 200
    assert other.json() == plain.json()  # "TRUE" and 1 were categories the model never saw
    assert "x-maas-unknown-categories" not in plain.headers and "x-maas-unknown-categories" not in other.headers
    assert unknown.headers["x-maas-unknown-categories"] == "employment, purpose"
    np.testing.assert_allclose(bundle.predict_proba(pd.DataFrame(spelled)), bundle.predict_proba(pd.DataFrame(known)))
    with caplog.at_level("WARNING", logger="maas"):
        bundle.predict(pd.DataFrame(known))
        assert caplog.text == ""
        bundle.predict(pd.DataFrame(new_values))
    assert "column 'employment' (e.g. 'Employed'), column 'purpose' (e.g. 'boat')" in caplog.text


def test_a_0_1_targets_labels_are_integers_for_pyfunc_and_invocations_and_names_at_predict(loans, maas_home):
    """The loans target is 0/1: pyfunc and /invocations answer 0 and 1 as MLflow's flavors do (so
    `predicted == y` holds on the training file), /predict the class names /metadata lists."""
    bundle, rows = loans
    assert bundle.metadata["label_type"] == "integer" and bundle.labels == ["0", "1"]
    named, typed = bundle.predict(pd.DataFrame(rows)), bundle.predict_typed(pd.DataFrame(rows))
    assert typed["label"].dtype.kind == "i" and list(typed["label"]) == [int(label) for label in named["label"]]
    assert typed.drop(columns="label").equals(named.drop(columns="label"))
    answer, invocations = call(gate_for(bundle, auth=False), [("POST", "/predict", {"json": {"rows": rows}}),
                                                               ("POST", "/invocations", {"json": {"dataframe_records": rows}})])
    assert [item["label"] for item in answer.json()] == list(named["label"])
    assert [item["label"] for item in invocations.json()["predictions"]] == list(typed["label"])


def test_labels_take_the_target_columns_type_bundles_without_one_answer_names():
    from maas.bundle import typed_labels
    from tasks.data import label_type_of

    gappy_flags = pd.Series([True, None, False], dtype=object).dropna()  # a True/False column with gaps
    parquet_codes = pd.Series([0, 2, None], dtype="Int64").dropna()  # a warehouse's nullable integers
    assert [label_type_of(column) for column in (pd.Series([0, 1]), pd.Series([0.0, 1.0, np.nan]), gappy_flags,
                                                  parquet_codes, pd.Series([0.5, 1.5]), pd.Series(["no", "yes"]))] == \
        ["integer", "integer", "boolean", "integer", "number", "string"]
    for label_type, expected in (("boolean", [False, True]), (None, ["False", "True"])):  # None: an older bundle
        metadata = {"labels": ["False", "True"], **({"label_type": label_type} if label_type else {})}
        assert list(typed_labels(metadata).values()) == expected
    assert typed_labels({"labels": ["1", "1.0"], "label_type": "integer"}) == {"1": "1", "1.0": "1.0"}  # not read: names


def test_a_lone_surrogate_escape_in_a_string_is_a_400_not_a_failure(loans, maas_home):
    bundle, rows = loans
    row = json.dumps({**rows[0], "employment": "PLACEHOLDER"}).replace("PLACEHOLDER", "em\\ud800ployed")
    answers = call(gate_for(bundle, auth=False), [
        ("POST", "/predict", {"content": f'{{"rows": [{row}]}}', "headers": {"content-type": "application/json"}}),
        ("POST", "/predict", {"content": f"[{row}]", "headers": {"content-type": "application/json"}}),
        ("POST", "/invocations", {"content": f'{{"dataframe_records": [{row}]}}',
                                  "headers": {"content-type": "application/json"}})])
    assert [answer.status_code for answer in answers] == [400] * 3
    assert all("lone UTF-16 surrogate" in answer.json()["error"] for answer in answers)


@pytest.mark.parametrize("body, status, words", [
    ({"rows": []}, 400, "at least 1"),
    ({"rows": [{"alcohol": 1.0}]}, 400, "row 0, column"),
    ({"nope": 1}, 400, "rows"),
    ({"rows": [{"Alcohol ": 1.0}]}, 400, "row 0, column 'alcohol': Field required (the row has 'Alcohol ': column names "
                                          "match exactly)"),
])
def test_bad_bodies_are_4xx_naming_the_problem(wine, maas_home, body, status, words):
    gate = gate_for(wine[0], auth=False)
    (response,) = call(gate, [("POST", "/predict", {"json": body})])
    assert response.status_code == status and words in response.json()["error"], response.text


def test_bodies_as_clients_send_them_compressed_in_another_charset_as_csv_or_a_bare_list(wine, maas_home):
    """gzip / deflate bodies, a declared charset, a CSV, pandas' records list: each the same answer as
    plain JSON; what cannot be read is a 4xx naming the header or the shape to send."""
    import gzip
    import zlib

    bundle, rows = wine
    plain = json.dumps({"rows": rows}).encode()
    as_csv = pd.DataFrame(rows).to_csv(index=False).encode()
    bomb = gzip.compress(b'{"rows": [' + b" " * 2_000_000 + b"]}")
    sent = [
        ({"content": gzip.compress(plain), "headers": {"content-encoding": "gzip"}}, 200, ""),
        ({"content": zlib.compress(plain), "headers": {"content-encoding": "deflate"}}, 200, ""),
        ({"content": zlib.compress(plain, wbits=-15), "headers": {"content-encoding": "deflate"}}, 200, ""),  # raw
        ({"content": plain.decode().encode("utf-16"), "headers": {"content-type": "application/json; charset=utf-16"}}, 200, ""),
        ({"content": as_csv, "headers": {"content-type": "text/csv"}}, 200, ""),
        ({"content": json.dumps(rows).encode()}, 200, ""),  # df.to_json(orient="records")
        ({"content": plain.decode().encode("utf-8-sig")}, 200, ""),  # a byte order mark, as Windows tools write
        ({"content": plain.decode().encode("utf-16")}, 200, ""),  # its mark names the charset
        ({"content": plain.decode().encode("utf-16-le")}, 400, "body: not UTF-8"),  # no mark, no charset
        ({"content": plain, "headers": {"content-encoding": "br"}}, 415, "Content-Encoding 'br' is not supported"),
        ({"content": bomb, "headers": {"content-encoding": "gzip"}}, 413, "once decompressed"),
        ({"content": gzip.compress(plain)[:-9], "headers": {"content-encoding": "gzip"}}, 400, "truncated gzip"),
        ({"content": b"not gzip", "headers": {"content-encoding": "gzip"}}, 400, "not gzip data"),
        ({"content": b"a=1", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "send rows as JSON"),
        ({"content": plain, "headers": {"content-type": "application/json; charset=klingon"}}, 415, "charset 'klingon'"),
        ({"json": rows[0]}, 400, 'expected {"rows": [row, ...]}; this body looks like one row'),
        ({"json": {"dataframe_records": rows}}, 400, "dataframe_records is MLflow's scoring format, which this "
                                                     "service reads at POST /invocations"),
    ]
    responses = call(gate_for(bundle, auth=False, max_request_bytes=1_000_000),
                     [("POST", "/predict", kwargs) for kwargs, _, _ in sent])
    expected = call(gate_for(bundle, auth=False), [("POST", "/predict", {"content": plain})])[0].json()
    for (kwargs, status, words), response in zip(sent, responses):
        assert response.status_code == status, (kwargs.get("headers"), response.text)
        if status == 200:
            assert [item["label"] for item in response.json()] == [item["label"] for item in expected]
            np.testing.assert_allclose([list(item["probabilities"].values()) for item in response.json()],
                                       [list(item["probabilities"].values()) for item in expected], atol=1e-6)
        else:
            assert words in response.json()["error"] and "\n" not in response.json()["error"], response.text
    assert responses[9].headers["accept-encoding"] == "gzip, deflate"


def test_a_csv_body_is_read_as_a_training_file_is_read():
    """Training reads a CSV as UTF-8, else Windows-1252 (Excel's CSV on Windows), split by the
    delimiter its header shows: the same file posted as text/csv was a 400 or one column."""
    for encoding in ("utf-8", "cp1252"):
        body = "city,amount\nMünchen,1.5\nZürich,\n".encode(encoding)
        assert json.loads(rows_from_csv(body, [])) == {"rows": [{"city": "München", "amount": 1.5},
                                                                {"city": "Zürich", "amount": None}]}
    for written in ("city;amount\nMünchen;1,5\nZürich;\n", "city, amount\nMünchen, 1.5\nZürich, \n"):
        # Excel's ';' with decimal commas, and UCI's space after each comma: read as training reads them
        assert json.loads(rows_from_csv(written.encode(), [])) == {"rows": [{"city": "München", "amount": 1.5},
                                                                           {"city": "Zürich", "amount": None}]}
    with pytest.raises(BadRequest, match="neither UTF-8 nor Windows-1252"):
        rows_from_csv(b"city\n\x81\x8d\n", [])


def test_reader_takes_exact_rows_fast_and_lax_rows_through_pydantic(wine):
    bundle, rows = wine
    reader = RequestReader(bundle.preprocessing)
    body = json.dumps({"rows": rows}).encode()
    logged, columns, ignored = reader.read(body, 100)
    assert logged is body and columns.n_rows == len(rows) and columns.numeric.shape == (len(rows), 13) and not ignored
    as_text = [{name: str(value) for name, value in row.items()} for row in rows]
    logged, lax, _ = reader.read(json.dumps({"rows": as_text}).encode(), 100)
    np.testing.assert_allclose(lax.numeric, columns.numeric)
    assert json.loads(logged)["rows"][0]["alcohol"] == rows[0]["alcohol"]  # logged as validated numbers
    with pytest.raises(BadRequest, match="9 rows in one request; the limit is 8"):
        reader.read(json.dumps({"rows": rows + rows[:1]}).encode(), 8)
    _, _, ignored = reader.read(json.dumps({"rows": [{**rows[0], "surprise": 1, "id": "a"}]}).encode(), 8)
    assert ignored == ["id", "surprise"]
    with pytest.raises(BadRequest) as extra:
        RequestReader(bundle.preprocessing, strict=True).read(json.dumps({"rows": [{**rows[0], "surprise": 1}]}).encode(), 8)
    assert extra.value.status == 400 and "surprise" in extra.value.message
    with pytest.raises(BadRequest, match="row 0, column 'alcohol': Field required"):
        reader.read(json.dumps({"rows": [{name: value for name, value in rows[0].items() if name != "alcohol"}]}).encode(), 8)


def test_booleans_and_nulls_in_categories_take_the_fast_path_and_read_as_pydantic_reads_them():
    reader = RequestReader({"numeric": [{"name": "x", "fill": 0.0, "mean": 0.0, "scale": 1.0, "coerce": False}],
                            "categorical": [{"name": "owner", "fill": "True", "categories": ["False", "True"]},
                                            {"name": "plan", "fill": "basic", "categories": ["basic", "pro"]}]})
    rows = [{"x": 1.5, "owner": True, "plan": "pro"}, {"x": 2.0, "owner": False, "plan": None},
            {"x": 3.0, "owner": None, "plan": "basic"}]
    body = json.dumps({"rows": rows}).encode()
    logged, fast, _ = reader.read(body, 10)
    assert logged is body  # the exact path: logged as received
    _, through_pydantic, _ = reader.read(json.dumps({"rows": [{**row, "x": str(row["x"])} for row in rows]}).encode(), 10)
    for ours, theirs in zip(fast.categorical, through_pydantic.categorical):
        assert ours.tolist() == theirs.tolist()
    assert fast.categorical[0].tolist() == ["True", "False", None] and fast.categorical[1].tolist() == ["pro", None, "basic"]


def test_dates_come_as_iso_strings_and_a_bad_one_is_a_400_unless_training_had_such_values_too():
    number = {"fill": 20000.0, "mean": 20000.0, "scale": 10.0}
    reader = RequestReader({"numeric": [{"name": "x", **number, "coerce": False},
                                        {"name": "seen", **number, "coerce": False, "date": True},
                                        {"name": "opened", **number, "coerce": True, "date": True}], "categorical": []})
    rows = [{"x": 1.5, "seen": "2025-01-02T12:00:00Z", "opened": "2025-01-01"},
            {"x": 2, "seen": "2025-01-02T14:00:00+02:00", "opened": "someday"},
            {"x": 3, "seen": None, "opened": None}]
    logged, columns, _ = reader.read(json.dumps({"rows": rows}).encode(), 10)
    np.testing.assert_allclose(columns.numeric[:2], [[1.5, 20090.5, 20089.0], [2.0, 20090.5, np.nan]])
    assert np.isnan(columns.numeric[2, 1:]).all()  # null: missing, imputed downstream
    assert json.loads(logged)["rows"][0]["seen"] == "2025-01-02T12:00:00Z"  # the log keeps what was sent
    with pytest.raises(BadRequest, match=r"row 1, column 'seen': not an ISO 8601 date or time \('03/12/2025'\)"):
        reader.read(json.dumps({"rows": [rows[0], {**rows[1], "seen": "03/12/2025"}]}).encode(), 10)
    # a number is Unix time: seconds, or milliseconds (pandas' to_json) past 2e10, as pydantic reads them
    for unix_time in (1735732800, 1735732800000, 1735732800.0):
        _, columns, _ = reader.read(json.dumps({"rows": [{**rows[0], "seen": unix_time}]}).encode(), 10)
        assert columns.numeric[0, 1] == 20089.5
    for unreadable in (45000, 1e30):  # a count (an Excel serial day), out of range
        with pytest.raises(BadRequest, match=r"row 0, column 'seen': not an ISO 8601 date or time .*nor Unix time"):
            reader.read(json.dumps({"rows": [{**rows[0], "seen": unreadable}]}).encode(), 10)
    with pytest.raises(BadRequest, match="row 0, column 'seen': .*expected an ISO 8601 date or time .* or a Unix time"):
        reader.read(json.dumps({"rows": [{**rows[0], "seen": True}]}).encode(), 10)


def test_nan_as_pythons_json_writes_a_pandas_gap_is_a_missing_value_and_dates_may_come_as_unix_time(loans, maas_home):
    bundle, rows = loans
    gaps = {"income": None, "employment": None, "homeowner": None}
    with_null = [{**row, **gaps} for row in rows]
    with_nan = json.dumps({"rows": [{**row, **dict.fromkeys(gaps, float("nan"))} for row in rows]})
    assert "NaN" in with_nan  # what requests.post(json=...) sends for df.to_dict("records") with gaps
    split = pd.DataFrame(with_null).astype(object).fillna(float("nan")).to_dict(orient="split", index=False)
    as_unix = [{**row, "applied_on": int(pd.Timestamp(row["applied_on"]).timestamp() * 1000)} for row in rows]
    as_json = {"headers": {"content-type": "application/json"}}
    null, nan, nan_list, nan_mlflow, null_mlflow, iso, unix, infinite = call(gate_for(bundle, auth=False), [
        ("POST", "/predict", {"json": {"rows": with_null}}),
        ("POST", "/predict", {"content": with_nan, **as_json}),
        ("POST", "/predict", {"content": json.dumps(json.loads(with_nan)["rows"]), **as_json}),
        ("POST", "/invocations", {"content": json.dumps({"dataframe_split": split}), **as_json}),
        ("POST", "/invocations", {"json": {"dataframe_records": with_null}}),
        ("POST", "/predict", {"json": {"rows": rows}}), ("POST", "/predict", {"json": {"rows": as_unix}}),
        ("POST", "/invocations", {"content": json.dumps({"dataframe_records": [{**rows[0], "income": float("inf")}]}),
                                  **as_json})])
    assert {null.status_code, nan.status_code, nan_list.status_code, nan_mlflow.status_code, iso.status_code,
            unix.status_code} == {200}, nan.text
    assert nan.json() == nan_list.json() == null.json() and nan_mlflow.json() == null_mlflow.json()
    assert unix.json() == iso.json()
    assert infinite.status_code == 400 and "row 0, column 'income': Input should be a finite number" in infinite.text
    # the pyfunc's reading: a date column of Unix milliseconds, as pd.read_json leaves an unnamed one
    frame = pd.DataFrame(rows)
    np.testing.assert_allclose(bundle.predict_proba(frame.assign(applied_on=[row["applied_on"] for row in as_unix])),
                               bundle.predict_proba(frame), atol=1e-6)


def test_other_paths_pass_through_and_metadata_names_the_model(wine, maas_home):
    gate = gate_for(wine[0])
    passed, metadata = call(gate, [("GET", "/docs", {}), ("GET", "/metadata", {})])
    assert passed.status_code == 404 and passed.text == "passed through"
    assert metadata.json()["model"] == "maas-wine/1@champion"
    assert set(metadata.json()["tiers"]) == {"free", "pro"} and metadata.json()["auth"] is True


def test_keys_tiers_quota_and_metering(wine, maas_home):
    bundle, rows = wine
    connection = connect()
    _, free = create_key(connection, "f", "free")
    _, pro = create_key(connection, "p", "pro")
    gate = gate_for(bundle)
    missing, wrong = call(gate, [("POST", "/predict", {"json": {"rows": rows[:1]}}),
                                 ("POST", "/predict", {"json": {"rows": rows[:1]}, "headers": {"X-API-Key": "maas_nope"}})])
    assert missing.status_code == wrong.status_code == 401
    first, second, third = (call(gate, [("POST", "/predict", {"json": {"rows": rows[:1]}, "headers": {"X-API-Key": free}})])[0]
                            for _ in range(3))
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]  # 2 requests a minute
    assert int(third.headers["retry-after"]) >= 1
    (big,) = call(gate, [("POST", "/predict", {"json": {"rows": rows}, "headers": {"Authorization": f"Bearer {pro}"}})])
    assert big.status_code == 200
    gate.meter.flush()
    usage = {row["name"]: row for row in usage_report(connection)}
    assert usage["f"]["requests"] == 3 and usage["f"]["rows"] == 2 and usage["f"]["errors"] == 1
    assert usage["p"]["rows"] == len(rows)


def test_the_batcher_merges_waiting_requests_and_splits_the_answers(wine):
    bundle, rows = wine
    reader = RequestReader(bundle.preprocessing)
    calls = []

    class Rows:
        def observe(self, value):
            calls.append(value)

    batcher = Batcher(bundle, max_batch_rows=512, batch_rows=Rows())
    requests = [reader.exact_columns(rows[index:index + 1 + index % 3]) for index in range(6)]

    async def all_at_once():
        return await asyncio.gather(*(batcher.answers(columns) for columns in requests))

    answers = asyncio.run(all_at_once())
    for columns, answer in zip(requests, answers):
        assert len(answer) == columns.n_rows
    alone = [bundle.predict_features(bundle_features(bundle, columns)) for columns in requests]
    for together, single in zip(answers, alone):
        np.testing.assert_allclose([[row["probabilities"][label] for label in bundle.labels] for row in together],
                                   single, atol=1e-6)
        assert [row["label"] for row in together] == [bundle.labels[index] for index in single.argmax(1)]
    assert len(calls) < len(requests) and sum(calls) == sum(columns.n_rows for columns in requests)


def bundle_features(bundle, columns):
    from maas.bundle import transform_arrays

    return transform_arrays(columns.numeric, columns.categorical, columns.n_rows, bundle.preprocessing)


# deployments/predict_first.py: /predict ahead of BentoML's middleware stack, with what it gave /predict


def front_of(gate, timeout_s: float = 30, max_concurrency: int = 128):
    from deployments.predict_first import PredictFirst

    return PredictFirst(not_found, lambda: gate, timeout_s, max_concurrency, "maas")


def answered(front, status: int) -> float:
    """Requests counted under BentoML's request_total for /predict with `status`."""
    (family,) = front.metrics.total.collect()
    return sum(sample.value for sample in family.samples if sample.name.endswith("_total")
               and sample.labels["endpoint"] == "/predict" and sample.labels["http_response_code"] == str(status))


def test_predict_is_answered_first_with_bentomls_metrics_and_access_log_and_the_rest_passes_through(wine, maas_home, caplog):
    import logging

    bundle, rows = wine
    front = front_of(gate_for(bundle, auth=False))
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        predicted, wrong_method, metadata = call(front, [("POST", "/predict", {"json": {"rows": rows[:2]}}),
                                                         ("GET", "/predict", {}), ("GET", "/metadata", {})])
    assert predicted.status_code == 200 and len(predicted.json()) == 2
    assert predicted.headers["x-content-type-options"] == "nosniff"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert metadata.status_code == 404 and metadata.text == "passed through"  # BentoML's stack, then the gate
    assert answered(front, 200) == 1 and answered(front, 405) == 1
    lines = [record.getMessage() for record in caplog.records if record.name == "bentoml.access"]
    assert any("method=POST,path=/predict" in line and "status=200" in line for line in lines), lines


def test_metric_writes_of_one_loop_turn_fold_into_one_per_child_and_equal_writing_each():
    """turn_writes.TurnWrites: counters, a gauge going up and down and a histogram written at the
    end of the turn, once per child and bucket, to the values writing each would give; outside a
    running loop, at once."""
    import asyncio
    import random

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from deployments.turn_writes import TurnWrites

    def metrics():
        registry = CollectorRegistry()
        return registry, (Counter("c", "c", ["s"], registry=registry).labels("200"),
                          Gauge("g", "g", registry=registry),
                          Histogram("h", "h", ["s"], registry=registry, buckets=(0.01, 0.1, 1.0)).labels("200"))

    def values(registry):
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in registry.collect() for sample in family.samples if not sample.name.endswith("_created")}

    pick = random.Random(7)
    seconds = [pick.choice([0.001, 0.01, 0.05, 0.1, 0.7, 3.0]) for _ in range(50)]
    assert len(set(seconds)) == 6  # every bucket, and both sides of a bound (0.01, 0.1)
    each, (counter, gauge, histogram) = metrics()
    for value in seconds:
        gauge.inc()
        counter.inc()
        histogram.observe(value)
        gauge.dec()
    gauge.inc()

    folded, (counter, gauge, histogram) = metrics()
    writes = TurnWrites()
    written = []

    async def one_turn():
        for value in seconds:
            writes.inc(gauge)
            writes.inc(counter)
            writes.observe(histogram, value)
            writes.inc(gauge, -1)
        writes.inc(gauge)
        written.append(values(folded))  # nothing yet: the turn has not ended
        await asyncio.sleep(0)

    asyncio.run(one_turn())
    assert written[0][("c_total", (("s", "200"),))] == 0
    assert values(folded) == values(each)
    assert values(folded)[("h_bucket", (("le", "0.1"), ("s", "200")))] == sum(value <= 0.1 for value in seconds)
    writes.inc(counter, 2)  # no loop running: written at once
    assert values(folded)[("c_total", (("s", "200"),))] == len(seconds) + 2

    stopped = asyncio.new_event_loop()  # a loop stopped in the turn of a write, its flush never run
    stopped.call_soon(lambda: (writes.inc(counter), stopped.stop()))
    stopped.run_forever()
    stopped.close()
    assert values(folded)[("c_total", (("s", "200"),))] == len(seconds) + 2

    async def another_loops_turn():
        writes.inc(counter)
        await asyncio.sleep(0)

    asyncio.run(another_loops_turn())  # that write goes out with this loop's
    assert values(folded)[("c_total", (("s", "200"),))] == len(seconds) + 4


def test_the_access_lines_of_one_loop_turn_go_out_in_one_write_in_order_through_the_loggers_filters():
    """predict_first.AccessLog: a stream handler gets the turn's lines in one write, after its filters
    (one sets a field the format reads, as BentoML's does, and one line is dropped); a handler of
    another kind, up the logger's tree, gets each record; a logger not at INFO gets nothing."""
    import io
    import logging

    from deployments.predict_first import AccessLog

    class CountedWrites(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            return super().write(text)

    class Component(logging.Filter):
        def filter(self, record):
            record.component = "[worker:1]"
            return not record.getMessage().startswith("dropped")

    class Collected(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    parent, logger = logging.getLogger("access-test"), logging.getLogger("access-test.lines")
    stream, collected = CountedWrites(), Collected()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(component)s %(message)s"))
    handler.addFilter(Component())
    logger.addHandler(handler)
    parent.addHandler(collected)
    parent.propagate = False
    try:
        async def one_turn(level: int):
            logger.setLevel(level)
            access, written = AccessLog(logger), stream.getvalue()
            for client, status in (("10.0.0.1:1", 200), ("dropped", 200), ("10.0.0.2:2", 429)):
                access.add(client, "scheme=http,method=POST,path=/predict", f"status={status}", 1.25)
            assert stream.getvalue() == written  # nothing before the turn ends
            await asyncio.sleep(0)

        asyncio.run(one_turn(logging.INFO))
        assert stream.getvalue() == ("[worker:1] 10.0.0.1:1 (scheme=http,method=POST,path=/predict) (status=200) 1.250ms\n"
                                     "[worker:1] 10.0.0.2:2 (scheme=http,method=POST,path=/predict) (status=429) 1.250ms\n")
        assert stream.writes == 1
        assert [message.split(" ")[0] for message in collected.messages] == ["10.0.0.1:1", "dropped", "10.0.0.2:2"]
        asyncio.run(one_turn(logging.WARNING))
        assert stream.writes == 1 and len(collected.messages) == 3
    finally:
        logger.removeHandler(handler)
        parent.removeHandler(collected)


def test_a_turns_access_lines_under_bentomls_filter_and_a_plain_formatter_are_one_record_formatted_once():
    """predict_first.handle_together: where no filter or formatter can read the message (BentoML's
    own set-up), one record is made and formatted for the turn, and each line is it with its message;
    the lines equal what logging makes of a record per line. A handler with a filter of its own on
    the same logger still gets each line's record (its filter drops one)."""
    import io
    import logging

    from bentoml._internal.log import TraceRecordFilter

    from deployments.predict_first import ACCESS_FORMAT, AccessLog

    class DropsDenied(logging.Filter):
        def filter(self, record):
            return "status=429" not in record.getMessage()

    logger = logging.getLogger("access-test-shared")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    blind, reading = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(blind), logging.StreamHandler(reading)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(levelname_bracketed)s %(component)s %(message)s%(trace_msg)s"))
        handler.addFilter(TraceRecordFilter())
        logger.addHandler(handler)
    handlers[1].addFilter(DropsDenied())
    lines = [(f"10.0.0.{index}:1", "scheme=http,method=POST,path=/predict", f"status={status}", 1.25 * index)
             for index, status in enumerate((200, 429, 200), start=1)]
    made = []
    factory = logging.getLogRecordFactory()

    def counted(*args, **kwargs):
        made.append(args[0])
        return factory(*args, **kwargs)

    async def one_turn(access):
        for args in lines:
            access.add(*args)
        await asyncio.sleep(0)

    try:
        expected = []
        for args in lines:
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, ACCESS_FORMAT, args, None)
            TraceRecordFilter().filter(record)
            expected.append(handlers[0].format(record) + "\n")
        logging.setLogRecordFactory(counted)
        asyncio.run(one_turn(AccessLog(logger)))
        assert blind.getvalue() == "".join(expected)
        assert reading.getvalue() == expected[0] + expected[2]
        assert len(made) == 1 + len(lines)  # the turn's one, and a record per line for the filter that reads them
        logger.removeHandler(handlers[1])
        made.clear()
        asyncio.run(one_turn(AccessLog(logger)))
        assert blind.getvalue() == "".join(expected) * 2 and len(made) == 1
    finally:
        logging.setLogRecordFactory(factory)
        for handler in handlers:
            logger.removeHandler(handler)


def test_pages_of_the_allowed_origins_may_call_predict_with_a_key_and_read_the_gates_headers(wine, maas_home):
    """serving.cors: a browser's preflight is answered in front of the gate, and the answer to an
    allowed page says so and lets its script read the request id and the rate limit; a page of
    another origin gets no such answer (its browser keeps the answer from it). Off by default."""
    from deployments.predict_first import with_cors
    from maas.config import CorsConfig

    bundle, rows = wine
    _, key = create_key(connect(), "web app", "pro")
    plain = front_of(gate_for(bundle))
    assert with_cors(plain, CorsConfig()) is plain
    front = with_cors(plain, CorsConfig(allow_origins=["https://app.example.com"]))
    page, other = {"origin": "https://app.example.com"}, {"origin": "https://elsewhere.example"}
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "x-api-key, content-type"}
    allowed, refused, predicted, from_elsewhere, no_key = call(front, [
        ("OPTIONS", "/predict", {"headers": {**page, **preflight}}),
        ("OPTIONS", "/predict", {"headers": {**other, **preflight}}),
        ("POST", "/predict", {"json": {"rows": rows[:2]}, "headers": {**page, "x-api-key": key}}),
        ("POST", "/predict", {"json": {"rows": rows[:2]}, "headers": {**other, "x-api-key": key}}),
        ("POST", "/predict", {"json": {"rows": rows[:2]}, "headers": page})])
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert {"x-api-key", "content-type"} <= set(allowed.headers["access-control-allow-headers"].lower().split(", "))
    assert "POST" in allowed.headers["access-control-allow-methods"] and allowed.headers["access-control-max-age"] == "600"
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert predicted.status_code == 200 and len(predicted.json()) == 2
    assert predicted.headers["access-control-allow-origin"] == "https://app.example.com"
    exposed = set(predicted.headers["access-control-expose-headers"].split(", "))
    assert {"x-request-id", "x-ratelimit-remaining", "x-maas-model"} <= exposed
    assert "origin" in predicted.headers["vary"].lower()
    assert from_elsewhere.status_code == 200 and "access-control-allow-origin" not in from_elsewhere.headers
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == "https://app.example.com"


def test_predict_goes_through_bentoml_before_the_instance_exists_and_while_spans_are_asked_for(wine, maas_home):
    from deployments.predict_first import PredictFirst

    bundle, rows = wine
    for front in (PredictFirst(not_found, lambda: None, 30, 128, "maas"),
                  front_of(gate_for(bundle, auth=False, trace_predictions=True))):
        (response,) = call(front, [("POST", "/predict", {"json": {"rows": rows[:1]}})])
        assert response.status_code == 404 and response.text == "passed through"


def test_predict_first_keeps_bentomls_timeout_concurrency_limit_and_500_on_an_error(wine, maas_home, caplog):
    bundle, rows = wine
    gate = gate_for(bundle, auth=False)
    answer = gate.predict

    async def slow(scope, receive, send):
        await asyncio.sleep(0.3)
        await answer(scope, receive, send)

    gate.predict = slow
    body = {"json": {"rows": rows[:1]}}
    statuses = sorted(response.status_code for response in call(front_of(gate, max_concurrency=1),
                                                                [("POST", "/predict", body)] * 3))
    assert statuses == [200, 429, 429]
    (timed_out,) = call(front_of(gate, timeout_s=0.05), [("POST", "/predict", body)])
    assert timed_out.status_code == 504 and "0.05 seconds" in timed_out.json()["error"]

    async def failing(scope, receive, send):
        raise RuntimeError("a bug in the gate")

    gate.predict = failing
    front = front_of(gate)
    (failed,) = call(front, [("POST", "/predict", body)])
    assert failed.status_code == 500 and failed.json() == {"error": "internal server error"}
    assert answered(front, 500) == 1 and "a bug in the gate" in caplog.text
