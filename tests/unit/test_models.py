import torch

from models import NetworkSpec, build_network, load_network, save_network


def test_mlp_and_cnn_map_flat_features_to_class_logits():
    mlp = build_network(NetworkSpec("mlp", n_features=30, n_classes=2, hidden_sizes=(16, 8)))
    cnn = build_network(NetworkSpec("cnn", n_features=64, n_classes=10, image_shape=(8, 8)))
    assert mlp(torch.zeros(5, 30)).shape == (5, 2)
    assert cnn(torch.zeros(5, 64)).shape == (5, 10)
    assert any(isinstance(layer, torch.nn.Conv2d) for layer in cnn.modules())


def test_save_and_load_keep_the_spec_next_to_the_weights(tmp_path):
    spec = NetworkSpec("mlp", n_features=4, n_classes=3, hidden_sizes=(6,), dropout=0.2)
    network = build_network(spec).eval()
    save_network(network, spec, tmp_path)
    loaded, loaded_spec = load_network(tmp_path)
    assert loaded_spec == spec
    features = torch.randn(3, 4)
    assert torch.equal(network(features), loaded(features))
