"""Behaviour of trained models at the default budget, through the served bundle on raw rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maas.bundle import ModelBundle
from maas.config import RunConfig, load_config
from tasks.data import PreparedData, prepare_data
from tasks.export import write_bundle
from tasks.train import TrainingSettings, train_on_data

pytestmark = pytest.mark.slow  # each dataset trains at the full default budget


def train_bundle(config: RunConfig, folder) -> tuple[PreparedData, ModelBundle]:
    prepared = prepare_data(config.data, config.seed)
    result = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
    write_bundle(folder, result.network, result.spec, prepared)
    return prepared, ModelBundle.load(folder)


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """dataset -> (prepared, bundle), each trained once for the whole module."""
    cache: dict[str, tuple[PreparedData, ModelBundle]] = {}

    def get(dataset: str) -> tuple[PreparedData, ModelBundle]:
        if dataset not in cache:
            cache[dataset] = train_bundle(load_config(dataset=dataset), tmp_path_factory.mktemp(dataset))
        return cache[dataset]

    return get


@pytest.fixture(params=["breast_cancer", "wine", "digits"])
def model(request, trained_models):
    return trained_models(request.param)


def labels_of(bundle: ModelBundle, rows: pd.DataFrame) -> np.ndarray:
    return bundle.predict(rows)["label"].to_numpy()


def test_default_budget_reaches_the_quality_bar(model):
    prepared, bundle = model
    predicted = labels_of(bundle, prepared.splits.x_test)
    truth = np.asarray(prepared.labels, dtype=object)[prepared.splits.y_test]
    assert (predicted == truth).mean() >= 0.95


def test_class_centroids_are_classified_as_their_class(model):
    """An obviously typical sample: the mean training row of each class."""
    prepared, bundle = model
    x_train, y_train = prepared.splits.x_train, prepared.splits.y_train
    centroids = pd.DataFrame([x_train[y_train == code].mean() for code in range(len(prepared.labels))])
    assert list(labels_of(bundle, centroids)) == prepared.labels


def test_tiny_perturbations_do_not_change_labels(model):
    prepared, bundle = model
    rows = prepared.splits.x_test
    noise = np.random.default_rng(0).normal(scale=1e-3, size=rows.shape) * rows.std().to_numpy()
    agreement = (labels_of(bundle, rows) == labels_of(bundle, rows + noise)).mean()
    assert agreement >= 0.99


def test_column_order_and_batching_do_not_matter(model):
    prepared, bundle = model
    rows = prepared.splits.x_test.head(16)
    shuffled = rows[rows.columns[::-1]]
    np.testing.assert_allclose(bundle.predict_proba(shuffled), bundle.predict_proba(rows), atol=1e-6)
    one_by_one = np.vstack([bundle.predict_proba(rows.iloc[[i]]) for i in range(len(rows))])
    np.testing.assert_allclose(one_by_one, bundle.predict_proba(rows), atol=1e-5)


def test_moving_towards_malignant_raises_malignant_probability(trained_models):
    """Directional: walking from the benign to the malignant centroid, P(malignant) goes up."""
    prepared, bundle = trained_models("breast_cancer")
    x_train, y_train = prepared.splits.x_train, prepared.splits.y_train
    benign = x_train[y_train == prepared.labels.index("benign")].mean()
    malignant = x_train[y_train == prepared.labels.index("malignant")].mean()
    path = pd.DataFrame([benign + t * (malignant - benign) for t in np.linspace(0, 1, 5)])
    p_malignant = bundle.predict(path)["proba_malignant"].to_numpy()
    assert p_malignant[0] < 0.5 < p_malignant[-1]
    assert np.all(np.diff(p_malignant) > -1e-3)
