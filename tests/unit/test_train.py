import numpy as np
import pytest

from maas.config import ModelConfig, TrainConfig
from maas.errors import MaasInputError
from models import NetworkSpec
from tasks.data import TrainingArrays
from tasks.train import network_spec_for, train_network


def blobs(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    features = rng.normal(size=(n, 4)).astype(np.float32) + labels[:, None] * 3.0
    return features, labels


def train_blobs(seed: int = 0, **changes):
    features, labels = blobs()
    spec = NetworkSpec("mlp", n_features=4, n_classes=2, hidden_sizes=(16,))
    config = TrainConfig(max_epochs=40, patience=5, **changes)
    return train_network(spec, TrainingArrays(features[:200], labels[:200], features[200:], labels[200:]), config, seed)


def test_training_is_reproducible_for_a_seed():
    first, second = train_blobs(seed=5), train_blobs(seed=5)
    assert [r.val_loss for r in first.history] == [r.val_loss for r in second.history]
    for a, b in zip(first.network.state_dict().values(), second.network.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())


def test_learns_separable_data_and_stops_early_keeping_the_best_epoch():
    result = train_blobs(lr=0.05)
    assert result.best.val_accuracy > 0.95
    assert result.epochs_run < 40
    assert result.best.val_loss == min(r.val_loss for r in result.history)
    assert result.epochs_run - result.best_epoch == 5


def test_diverging_loss_is_an_error_not_a_model():
    features, labels = blobs()
    features[:50] = np.nan  # what a broken upstream step would hand over
    spec = NetworkSpec("mlp", n_features=4, n_classes=2, hidden_sizes=(16,))
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        train_network(spec, TrainingArrays(features[:200], labels[:200], features[200:], labels[200:]),
                      TrainConfig(max_epochs=3, lr=1.0), 0)


def test_auto_family_picks_cnn_only_for_images():
    assert network_spec_for(ModelConfig(), 64, 10, (8, 8)).family == "cnn"
    assert network_spec_for(ModelConfig(), 30, 2, None).family == "mlp"
    with pytest.raises(MaasInputError, match="needs image-like data"):
        network_spec_for(ModelConfig(family="cnn"), 30, 2, None)


def test_cuda_requested_without_a_device_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MaasInputError, match="no CUDA device"):
        train_blobs(device="cuda")
