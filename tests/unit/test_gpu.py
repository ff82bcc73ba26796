"""The CUDA paths: networks and the text encoder train on the GPU when there is one, and what they
hand on (to compression, export and the bundle) is on the CPU and serves as the GPU left it.
Skipped without a CUDA device (CI has none); run where one is lent: `pytest -m gpu`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from maas.config import ModelConfig, TrainConfig
from tasks.data import SENTIMENT_FILE, TrainingArrays
from tasks.train import Distillation, FineTune, network_spec_for, train_network

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")]


@pytest.fixture(scope="module")
def arrays() -> TrainingArrays:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return TrainingArrays(scaler.transform(x_train), y_train, scaler.transform(x_val), y_val)


def spec_of(arrays: TrainingArrays):
    return network_spec_for(ModelConfig(family="mlp", hidden_sizes=[64, 32]), arrays.x_train.shape[1], 2, None)


def test_a_network_trains_on_cuda_and_comes_back_on_the_cpu_as_good_as_one_trained_there(arrays):
    spec = spec_of(arrays)
    on_gpu = train_network(spec, arrays, TrainConfig(device="cuda", max_epochs=40), seed=0)
    on_cpu = train_network(spec, arrays, TrainConfig(device="cpu", max_epochs=40), seed=0)
    assert on_gpu.device == "cuda" and next(on_gpu.network.parameters()).device.type == "cpu"
    assert on_gpu.best.val_f1_macro >= on_cpu.best.val_f1_macro - 0.03, (on_gpu.best, on_cpu.best)
    with torch.no_grad():
        assert on_gpu.network(torch.as_tensor(arrays.x_val, dtype=torch.float32)).shape == (len(arrays.y_val), 2)


def test_a_student_distilled_and_a_network_fine_tuned_on_cuda_start_from_cpu_networks(arrays):
    spec = spec_of(arrays)
    teacher = train_network(spec, arrays, TrainConfig(device="cuda", max_epochs=20), seed=0)
    student = train_network(spec, arrays, TrainConfig(device="cuda", max_epochs=20), seed=1,
                            start=Distillation(teacher.network))
    tuned = train_network(spec, arrays, TrainConfig(device="cuda", max_epochs=5), seed=2, start=FineTune(student.network))
    for result in (teacher, student, tuned):
        assert next(result.network.parameters()).device.type == "cpu" and result.best.val_f1_macro > 0.85


@pytest.fixture(scope="module")
def labelled():
    from models.text_encoder import LabelledTexts

    frame = pd.read_csv(SENTIMENT_FILE).sample(300, random_state=7)
    codes = frame["sentiment"].astype("category").cat.codes.to_numpy()
    texts = frame["text"].fillna("").tolist()
    return LabelledTexts(texts[:200], codes[:200], texts[200:], codes[200:])


def test_the_text_search_scores_a_frozen_and_a_fine_tuned_trial_on_cuda(labelled, tmp_path):
    """The frozen trial's pretrained encoder loads on the CPU: it is moved to the GPU its tokens go to."""
    from models.text_search import FINE_TUNED, FROZEN, TextSearch, search_text_settings, searched_trials

    search_text_settings(labelled, TextSearch(trials=2, max_seconds=120, max_lengths=(64,)), tmp_path / "search.journal")
    trials = searched_trials(tmp_path / "search.journal")
    assert [trial.params["mode"] for trial in trials] == [FROZEN, FINE_TUNED]
    assert all(0 < trial.value <= 1 for trial in trials)


def test_a_teacher_and_student_trained_on_cuda_export_to_bundles_that_embed_as_they_do(labelled, tmp_path):
    """Export copies a GPU model to the CPU and leaves the model where it trains; the ONNX encoder
    (fp32) gives the torch model's embeddings on raw text (1e-4), and int8 stays close to it."""
    from maas.bundle import TextEncoder
    from models.text_encoder import (Distillation, FineTuning, device_of, distil, embeddings, export_encoder, fine_tune,
                                     served_variant, text_tokenizer)

    teacher = fine_tune(labelled.train, labelled.y_train, labelled.val, labelled.y_val, FineTuning(epochs=1, max_length=64))
    student = distil(teacher, labelled.train, labelled.val, labelled.y_val, Distillation(layers=2, epochs=1, max_length=64))
    assert device_of(teacher.encoder).type == device_of(student.encoder).type == "cuda"
    texts = labelled.val[:40]
    for name, model in (("teacher", teacher), ("student", student)):
        expected = embeddings(model.encoder, text_tokenizer(64), texts).cpu().numpy()
        fp32 = TextEncoder(export_encoder(tmp_path / name / "fp32", "fp32", model.encoder), 64).embed(texts)
        int8 = TextEncoder(export_encoder(tmp_path / name / "int8", "int8", model.encoder), 64).embed(texts)
        assert device_of(model.encoder).type == "cuda"
        np.testing.assert_allclose(fp32, expected, atol=1e-4)
        cosine = (int8 * expected).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosine.min() > 0.95, cosine.min()
    chosen, folder, scores = served_variant({"teacher": teacher, "student": student}, labelled, "int8", 1.0, 64,
                                            tmp_path / "variants")
    assert chosen == "student" and set(scores) == {"teacher", "student"}  # within a tolerance of 1.0 the smaller wins
