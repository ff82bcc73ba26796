"""The exported bundle serves exactly what was trained: same preprocessing, same network."""

import json

import numpy as np
import pytest
import torch

from maas import bundle as bundle_module
from maas.bundle import InputSchemaError, ModelBundle, array_of, numeric_arrays, transform
from maas.config import DataConfig, ModelConfig, TrainConfig
from tasks.data import prepare_data
from tasks.export import update_metadata, write_bundle
from tasks.train import TrainingSettings, train_on_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    prepared = prepare_data(DataConfig(dataset="wine"), seed=0)
    result = train_on_data(prepared, TrainingSettings(ModelConfig(hidden_sizes=[16]), TrainConfig(max_epochs=10)), 0)
    folder = write_bundle(tmp_path_factory.mktemp("bundle"), result.network, result.spec, prepared)
    return prepared, result.network, folder


def test_bundle_on_raw_rows_equals_network_on_training_preprocessing(exported):
    prepared, network, folder = exported
    raw = prepared.splits.x_test
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(transform(raw, prepared.preprocessing))), 1).numpy()
    served = ModelBundle.load(folder).predict_proba(raw)
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_arrays_made_once_are_each_lists_own_read_only_and_survive_eviction(monkeypatch):
    means, scales = [0.5, 1.5], [2.0, 4.0]
    assert array_of(means) is array_of(means)
    assert array_of(means).tolist() == means and array_of(scales).tolist() == scales
    assert array_of(["a", "b"], object).dtype == object
    with pytest.raises(ValueError):
        array_of(means)[0] = 9.0
    spec = [{"fill": 1.0, "mean": 2.0, "scale": 3.0}, {"fill": 4.0, "mean": 5.0, "scale": 6.0}]
    assert [array.tolist() for array in numeric_arrays(spec)] == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    monkeypatch.setattr(bundle_module, "MAX_MADE", 2)
    lists = [[float(index)] for index in range(10)]  # past the bound: the cache starts again, still right
    assert [array_of(values).tolist() for values in lists] == lists
    assert array_of(means).tolist() == means


def test_predict_returns_labels_and_probabilities(exported):
    prepared, _, folder = exported
    bundle = ModelBundle.load(folder)
    result = bundle.predict(prepared.splits.x_test.head(4))
    assert list(result.columns) == ["label", "proba_class_0", "proba_class_1", "proba_class_2"]
    assert set(result["label"]) <= set(prepared.labels)
    np.testing.assert_allclose(result.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)


def test_bundle_is_plain_files_without_pickle(exported):
    _, _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.onnx", "preprocessing.json"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["labels"] == ["class_0", "class_1", "class_2"]


def test_missing_input_column_is_named(exported):
    prepared, _, folder = exported
    rows = prepared.splits.x_test.drop(columns=["alcohol", "hue"])
    with pytest.raises(InputSchemaError, match="missing input column.*alcohol, hue"):
        ModelBundle.load(folder).predict(rows)


def test_numbers_at_the_float_limit_get_the_answer_of_far_numbers(exported):
    """1e308 is finite: standardized, it passed float32's range and reached the network as inf, whose
    inf - inf made NaN probabilities. Clipped at a million standard deviations, it answers as a far value."""
    import warnings

    prepared, _, folder = exported
    bundle = ModelBundle.load(folder)
    extreme, far = prepared.splits.x_test.head(4).copy(), prepared.splits.x_test.head(4).copy()
    extreme.loc[:, ["alcohol", "hue"]], far.loc[:, ["alcohol", "hue"]] = [1e308, -1e308], [1e9, -1e9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answered = bundle.predict_proba(extreme)
    assert np.isfinite(answered).all()
    np.testing.assert_allclose(answered, bundle.predict_proba(far), atol=1e-6)


def test_empty_input_gives_empty_output(exported):
    prepared, _, folder = exported
    assert len(ModelBundle.load(folder).predict(prepared.splits.x_test.head(0))) == 0


def test_metadata_update_keeps_existing_fields(exported, tmp_path):
    _, _, folder = exported
    updated = update_metadata(folder, metrics={"f1_macro": 0.5})
    assert updated["metrics"] == {"f1_macro": 0.5} and updated["labels"]


def test_text_numbers_at_serving_time_are_read_as_numbers(exported):
    prepared, _, folder = exported
    rows = prepared.splits.x_test.head(3)
    as_text = rows.astype(str)
    bundle = ModelBundle.load(folder)
    np.testing.assert_allclose(bundle.predict_proba(as_text), bundle.predict_proba(rows), atol=1e-6)
