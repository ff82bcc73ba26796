"""What trained must serve: every row of the training table, as pandas reads it (NaN as null, the
target removed, every other column kept, the ones training dropped too), gets the same answer from
the service's gate and from the registered model through mlflow.pyfunc."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from deployments.gate import ServiceGate, load_models
from maas.bundle import METADATA_FILE
from maas.config import ServingConfig
from maas.registered import ModelRef, download_bundle
from maas.tracking import mlflow_client
from tests.conftest import module_home, quick_config
from tests.tables import write_builtin, write_messy, written_as_a_bank_exports_it

pytestmark = pytest.mark.slow

TABLES = ["breast_cancer", "digits", "wine", "churn", "loans", "churn-hgb", "loans-linear", "loans.xlsx", "loans.written"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with module_home(tmp_path_factory) as folder:
        yield folder


def registered(table: str, folder, home) -> tuple[pd.DataFrame, str]:
    """Train on the table (the built-in by name, a messy one from its CSV); return the table as pandas
    reads the file, without the target, and the registered model's name."""
    from flows.train_pipeline import train_pipeline

    table, _, family = table.partition("-")  # churn-hgb: the churn table, gradient boosting alone
    # loans.xlsx: the loans table as a workbook, its dates as date cells; loans.written: with money,
    # decimal commas and US dates as a spreadsheet exports them
    table, _, form = table.partition(".")
    excel = form == "xlsx"
    families = [f"model.family={family}", f"registry.model_name=maas-{table}-{family}"] if family else []
    if table in ("churn", "loans"):
        path, target = write_messy(table, folder)
        if excel:
            frame = pd.read_csv(path)
            frame["applied_on"] = pd.to_datetime(frame["applied_on"], errors="coerce", format="mixed")
            path = path.with_suffix(".xlsx")
            frame.to_excel(path, index=False)
        elif form == "written":
            written_as_a_bank_exports_it(pd.read_csv(path)).to_csv(path, index=False)
        if form:
            families.append(f"registry.model_name=maas-{table}-{form}")
        config = quick_config(str(path), f"data.target={target}", "serving.build_bento=false", *families)
    else:
        path, target = write_builtin(table, folder)
        config = quick_config(table, "serving.build_bento=false")
    summary = train_pipeline(config).to_dict()
    return (pd.read_excel(path) if excel else pd.read_csv(path)).drop(columns=[target]), summary["model_name"]


def champion_bundle(name: str) -> tuple[str, str]:
    """The registered champion's bundle folder, downloaded, and its label."""
    ref, _ = ModelRef(name, "champion").resolve(mlflow_client())
    return download_bundle(ref, tempfile.mkdtemp()), ref.label


def served_answers(name: str, frame: pd.DataFrame) -> tuple[list[dict], set[str]]:
    """Each row posted as JSON to the service's gate, 50 rows a request, all requests at once (so the
    batcher merges them); the answers in row order and the columns the service said it ignored."""
    gate = ServiceGate(None, load_models(champion_bundle(name), {}, 1), ServingConfig(auth=False), CollectorRegistry())
    records = json.loads(frame.to_json(orient="records", date_format="iso"))  # NaN -> null, dates as ISO strings

    async def post_all():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            return await asyncio.gather(*(client.post("/predict", json={"rows": records[start:start + 50]})
                                          for start in range(0, len(records), 50)))

    responses = asyncio.run(post_all())
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses if r.status_code != 200][:1]
    ignored = {column.strip() for response in responses
               for column in response.headers.get("x-maas-ignored-columns", "").split(",") if column.strip()}
    return [answer for response in responses for answer in response.json()], ignored


@pytest.mark.parametrize("table", TABLES)
def test_every_row_of_the_training_table_gets_the_same_answer_served_and_through_pyfunc(table, home, tmp_path,
                                                                                       prefect_server):
    frame, name = registered(table, tmp_path, home)
    served, ignored = served_answers(name, frame)
    from_mlflow = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(frame)
    # /predict names the class as /metadata lists it ('1'); pyfunc answers in the target column's type (1)
    assert [answer["label"] for answer in served] == [str(label) for label in from_mlflow["label"]]
    assert from_mlflow["label"].dtype.kind == ("i" if table.startswith("loans") else "O"), from_mlflow["label"].dtype
    labels = [column.removeprefix("proba_") for column in from_mlflow.columns if column.startswith("proba_")]
    served_probabilities = np.array([[answer["probabilities"][label] for label in labels] for answer in served])
    np.testing.assert_allclose(served_probabilities, from_mlflow[[f"proba_{label}" for label in labels]].to_numpy(),
                               atol=1e-5)
    if table.startswith("churn"):  # the ID and the constant were dropped by training, and ignored here
        assert {"customer_id", "country"} <= ignored
        assert "signup_date" not in ignored  # read as dates, sent as the file's ISO strings
    if table == "loans.written":  # each read in the file's own way, not dropped as text
        assert not {"income", "amount", "applied_on"} & ignored
        metadata = json.loads((Path(champion_bundle(name)[0]) / METADATA_FILE).read_text())
        schema = {column["name"]: column["type"] for column in metadata["input_schema"]}
        assert schema["income"] == schema["amount"] == "number" and schema["applied_on"] == "datetime"
