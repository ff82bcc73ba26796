import numpy as np
import pytest

from maas.figures import plot_confusion_matrix
from tasks.evaluate import classification_metrics


def test_binary_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])
    metrics = classification_metrics(y_true, probabilities)
    # predicted 0,0,1,1,1: class 0 P=1 R=2/3, class 1 P=2/3 R=1
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["precision_macro"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["recall_macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["f1_macro"] == pytest.approx(0.8)
    assert metrics["roc_auc"] == pytest.approx(5 / 6)  # 5 of 6 (positive, negative) pairs ordered


def test_multiclass_auc_tolerates_float32_rows_not_summing_to_one():
    y_true = np.array([0, 1, 2, 2])
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]], dtype=np.float32
    ) * np.float32(1.0000001)
    metrics = classification_metrics(y_true, probabilities)
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == pytest.approx(1.0)


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(np.array([[5, 1], [0, 4]]), ["a", "b"], tmp_path / "cm.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
