"""Compression variants: each exported bundle predicts like the model it came from, on raw rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from maas.bundle import MODEL_FILE, ModelBundle, transform
from models import NetworkSpec, build_network
from tasks.compress import (
    build_variants,
    magnitude_prune,
    make_pruning_permanent,
    parameter_counts,
    structured_shrink,
    student_spec,
)
from tasks.data import prepare_data
from tasks.train import TrainingSettings, distillation_loss, train_on_data
from tests.conftest import quick_config

TRAINS = pytest.mark.slow  # trains and compresses real networks


@pytest.fixture(scope="module", params=["breast_cancer", "digits"])
def built(request, tmp_path_factory):
    """Every variant of a quickly trained network: an MLP (breast_cancer) and a CNN (digits)."""
    config = quick_config(request.param)
    prepared = prepare_data(config.data, config.seed)
    trained = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
    variants = build_variants(trained, prepared, config.compression, config.train, config.seed,
                              tmp_path_factory.mktemp("variants"))
    assert variants.failed == []
    return prepared, trained, {variant.name: variant for variant in variants.built}


def raw_test_predictions(variant, prepared) -> np.ndarray:
    return ModelBundle.load(variant.bundle_dir).predict_proba(prepared.splits.x_test)


def torch_predictions(network, prepared) -> np.ndarray:
    features = torch.as_tensor(transform(prepared.splits.x_test, prepared.preprocessing))
    with torch.no_grad():
        return torch.softmax(network.eval()(features), 1).numpy()


@TRAINS
def test_every_variant_is_built_and_exported_as_a_bundle(built):
    _, _, variants = built
    assert list(variants) == ["fp32", "pruned", "structured", "int8", "distilled"]
    for variant in variants.values():
        assert ModelBundle.load(variant.bundle_dir).metadata["variant"] == variant.name


@TRAINS
@pytest.mark.parametrize("name", ["fp32", "pruned", "structured", "distilled"])
def test_exported_bundle_predicts_like_its_torch_network_on_raw_rows(built, name):
    prepared, _, variants = built
    variant = variants[name]
    np.testing.assert_allclose(raw_test_predictions(variant, prepared),
                               torch_predictions(variant.network, prepared), atol=1e-5)


@TRAINS
def test_int8_and_pruned_agree_with_fp32_on_at_least_99_percent_of_labels(built):
    prepared, _, variants = built
    reference = raw_test_predictions(variants["fp32"], prepared).argmax(1)
    int8 = raw_test_predictions(variants["int8"], prepared).argmax(1)
    assert (int8 == reference).mean() >= 0.99
    # pruned is fine-tuned after masking, so it is its own model; its export must match it exactly
    # (above) and its labels stay close to the reference it was pruned from.
    pruned = raw_test_predictions(variants["pruned"], prepared).argmax(1)
    assert (pruned == reference).mean() >= 0.95


@TRAINS
def test_int8_graph_stores_int8_weights_and_is_smaller(built):
    _, _, variants = built
    graph = onnx.load(str(variants["int8"].bundle_dir / MODEL_FILE))
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.graph.initializer)
    assert (variants["int8"].bundle_dir / MODEL_FILE).stat().st_size < (variants["fp32"].bundle_dir / MODEL_FILE).stat().st_size


@TRAINS
def test_pruned_export_keeps_the_zeros(built):
    _, _, variants = built
    pruned = variants["pruned"]
    assert 1 - pruned.nonzero_parameters / pruned.parameters >= 0.7
    weights = [onnx.numpy_helper.to_array(init) for init in onnx.load(str(pruned.bundle_dir / MODEL_FILE)).graph.initializer]
    zeros = sum(int((w == 0).sum()) for w in weights if w.ndim >= 2)
    assert zeros >= 0.7 * sum(w.size for w in weights if w.ndim >= 2)


@TRAINS
def test_structured_and_distilled_have_fewer_parameters(built):
    _, trained, variants = built
    fp32 = variants["fp32"].parameters
    assert variants["structured"].parameters < 0.6 * fp32
    assert variants["distilled"].parameters < variants["structured"].parameters
    assert variants["structured"].nonzero_parameters == variants["structured"].parameters  # dense, not masked


@pytest.mark.parametrize("spec", [
    NetworkSpec("mlp", 10, 3, hidden_sizes=(16, 8)),
    NetworkSpec("cnn", 64, 4, hidden_sizes=(12,), cnn_channels=(6, 8), image_shape=(8, 8)),
])
def test_structured_shrink_copies_the_kept_units_exactly(spec):
    """Keeping every unit must reproduce the network; keeping half must halve the hidden widths."""
    torch.manual_seed(0)
    network = build_network(spec).eval()
    features = torch.randn(7, spec.n_features)
    same, same_spec = structured_shrink(network, spec, keep=1.0)
    assert same_spec == spec
    torch.testing.assert_close(same.eval()(features), network(features))
    half, half_spec = structured_shrink(network, spec, keep=0.5)
    assert half_spec.hidden_sizes[0] == spec.hidden_sizes[0] // 2
    assert parameter_counts(half)[0] < parameter_counts(network)[0]
    assert half.eval()(features).shape == (7, spec.n_classes)


def test_structured_shrink_keeps_the_strongest_units():
    spec = NetworkSpec("mlp", 4, 2, hidden_sizes=(8,))
    network = build_network(spec)
    strengths = [0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.05, 6.0]
    with torch.no_grad():
        network.layers[0].weight.copy_(torch.tensor([[value] * 4 for value in strengths]))
    smaller, _ = structured_shrink(network, spec, keep=0.5)
    kept = torch.tensor([[value] * 4 for value in (5.0, 3.0, 4.0, 6.0)])  # the strongest, in their order
    torch.testing.assert_close(smaller.layers[0].weight, kept)
    torch.testing.assert_close(smaller.layers[3].weight, network.layers[3].weight[:, [1, 3, 5, 7]])


def test_magnitude_pruning_hits_the_target_sparsity_and_becomes_permanent():
    torch.manual_seed(0)
    network = build_network(NetworkSpec("mlp", 20, 3, hidden_sizes=(32, 16)))
    pruned = make_pruning_permanent(magnitude_prune(network, 0.6))
    weights = [layer.weight for layer in (pruned.layers[0], pruned.layers[3], pruned.layers[6])]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))
    assert not any(name.endswith("_mask") for name, _ in pruned.named_buffers())
    assert parameter_counts(network)[1] == parameter_counts(network)[0]  # the original is untouched


def test_student_is_narrower_with_the_same_inputs_and_outputs():
    spec = NetworkSpec("cnn", 64, 10, hidden_sizes=(64,), cnn_channels=(16, 32), image_shape=(8, 8))
    student = student_spec(spec, 0.25, 0.0)
    assert student.hidden_sizes == (16,) and student.cnn_channels == (4, 8) and student.dropout == 0.0
    assert (student.n_features, student.n_classes, student.image_shape) == (64, 10, (8, 8))


def test_distillation_loss_is_zero_when_the_student_matches_the_teacher():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    soft = torch.softmax(logits / 4.0, 1)
    assert distillation_loss(logits, soft, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-logits, soft, 4.0).item() > 0.1


@TRAINS
def test_a_variant_that_fails_to_build_is_reported_and_skipped(tmp_path, monkeypatch, caplog):
    import tasks.compress as compress
    from maas.run_context import RunContext

    def broken(*args, **kwargs):
        raise RuntimeError("cannot shrink this network")

    monkeypatch.setattr(compress, "structured_shrink", broken)
    config = quick_config("wine", "compression.variants=[fp32, structured, int8]")
    prepared = prepare_data(config.data, config.seed)
    trained = train_on_data(prepared, TrainingSettings(config.model, config.train), config.seed)
    variants = build_variants(trained, prepared, config.compression, config.train, config.seed, tmp_path)
    failures = variants.failed
    compress.record_compression(RunContext(None, "run", "0", tmp_path), variants)
    reported = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [variant.name for variant in variants.built] == ["fp32", "int8"]
    assert len(reported) == len(failures) == 1 and failures[0].name == "structured" and "structured" in reported[0]
    assert "cannot shrink this network" in failures[0].error


@TRAINS
def test_int8_answers_a_row_the_same_alone_and_in_any_batch(built):
    """The service batches whatever requests arrive together: a row's answer must not depend on its
    neighbours (dynamic int8 took each activation's range from the whole batch, and it did)."""
    prepared, _, variants = built
    bundle = ModelBundle.load(variants["int8"].bundle_dir)
    features = transform(prepared.splits.x_test, prepared.preprocessing)
    together = bundle.predict_features(features)
    alone = np.vstack([bundle.predict_features(features[index:index + 1]) for index in range(len(features))])
    reversed_batch = bundle.predict_features(features[::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, reversed_batch, atol=1e-6)


def test_variants_that_train_are_left_out_where_the_budget_leaves_them_less_than_an_epoch():
    from maas.config import CompressionConfig
    from tasks.compress import variants_in_time
    from tasks.train import TrainResult

    config = CompressionConfig()
    trained = TrainResult(network=None, spec=None, best_epoch=8, epochs_run=10, device="cpu", seconds=70.0)  # 7 s/epoch
    assert variants_in_time(config, trained, None) == (config, None, "")  # no budget
    kept, seconds_each, note = variants_in_time(config, trained, 30.0)
    assert kept.variants == config.variants and seconds_each == pytest.approx(10.0) and note == ""
    kept, seconds_each, note = variants_in_time(config, trained, 6.0)
    assert kept.variants == ["fp32", "int8"] and seconds_each is None
    assert note == "pruned, structured, distilled left out: an epoch of training takes ~7.0 s, ~2.0 s each was left"
    only_int8 = CompressionConfig(variants=["fp32", "int8"])
    assert variants_in_time(only_int8, trained, 1.0) == (only_int8, None, "")
