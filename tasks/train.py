"""Training: AdamW on mini-batches, early stopping on validation loss, seeded, CPU or CUDA."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from maas.bundle import feature_count, transform
from maas.config import ModelConfig, TrainConfig
from maas.errors import MaasInputError
from maas.tracking import MetricBuffer, mlflow_client
from models import NetworkSpec, build_network
from tasks.data import PreparedData


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_f1_macro: float


@dataclass
class TrainResult:
    """The best network seen (on CPU, eval mode) and how training went."""

    network: nn.Module
    spec: NetworkSpec
    best_epoch: int
    epochs_run: int
    device: str
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]


def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise MaasInputError("train.device=cuda but no CUDA device is available; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def network_spec_for(
    model: ModelConfig, n_features: int, n_classes: int, image_shape: tuple[int, int] | None
) -> NetworkSpec:
    """Resolve family 'auto' (cnn for image-like data) and turn the model config into a spec."""
    family = model.family
    if family == "auto":
        family = "cnn" if image_shape is not None else "mlp"
    if family == "cnn" and (image_shape is None or image_shape[0] * image_shape[1] != n_features):
        raise MaasInputError("model.family=cnn needs image-like data (the digits built-in); use mlp or auto")
    return NetworkSpec(
        family=family,
        n_features=n_features,
        n_classes=n_classes,
        hidden_sizes=tuple(model.hidden_sizes),
        dropout=model.dropout,
        cnn_channels=tuple(model.cnn_channels),
        image_shape=image_shape if family == "cnn" else None,
    )


@dataclass(frozen=True)
class TrainingArrays:
    """Preprocessed train and validation splits: transformed once, reused by every trial."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def training_arrays(prepared: PreparedData) -> TrainingArrays:
    pre, splits = prepared.preprocessing, prepared.splits
    return TrainingArrays(transform(splits.x_train, pre), splits.y_train, transform(splits.x_val, pre), splits.y_val)


def spec_for_data(model: ModelConfig, prepared: PreparedData) -> NetworkSpec:
    """The network spec for this data: input width, classes and image shape come from it."""
    return network_spec_for(model, feature_count(prepared.preprocessing), len(prepared.labels), prepared.image_shape)


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Macro-averaged F1 on tensors (cheap enough to compute every epoch)."""
    scores = []
    for cls in range(n_classes):
        true_positive = ((predicted == cls) & (labels == cls)).sum().item()
        predicted_count = (predicted == cls).sum().item()
        actual_count = (labels == cls).sum().item()
        denominator = predicted_count + actual_count
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return float(np.mean(scores))


def _validate(network: nn.Module, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[float, float, float]:
    """(loss, accuracy, macro F1) on the validation split."""
    network.eval()
    with torch.no_grad():
        logits = network(features)
        loss = nn.functional.cross_entropy(logits, labels).item()
        predicted = logits.argmax(1)
        accuracy = (predicted == labels).float().mean().item()
    return loss, accuracy, macro_f1(predicted, labels, n_classes)


@dataclass(frozen=True)
class Distillation:
    """A trained teacher and how much its softened outputs weigh against the labels."""

    network: nn.Module
    temperature: float = 4.0
    alpha: float = 0.7


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 so its gradients match the label loss."""
    log_student = torch.log_softmax(student_logits / temperature, dim=1)
    return nn.functional.kl_div(log_student, soft_targets, reduction="batchmean") * temperature**2


def train_network(
    spec: NetworkSpec,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    train: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    start_from: nn.Module | None = None,
    teacher: Distillation | None = None,
) -> TrainResult:
    """Train from scratch, or fine-tune `start_from` in place; keep the epoch with the lowest
    validation loss. With a teacher, the loss mixes its softened outputs with the labels."""
    started = time.perf_counter()
    device = resolve_device(train.device)
    seed_everything(seed)
    network = (start_from if start_from is not None else build_network(spec)).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    features_train = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    labels_train = torch.as_tensor(y_train, dtype=torch.long, device=device)
    features_val = torch.as_tensor(x_val, dtype=torch.float32, device=device)
    labels_val = torch.as_tensor(y_val, dtype=torch.long, device=device)
    shuffler = torch.Generator().manual_seed(seed)
    soft_targets = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = copy.deepcopy(teacher.network).to(device).eval()(features_train)
        soft_targets = torch.softmax(teacher_logits / teacher.temperature, dim=1)

    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = float("inf"), 0, None
    for epoch in range(1, train.max_epochs + 1):
        network.train()
        order = torch.randperm(len(features_train), generator=shuffler).to(device)
        total_loss = 0.0
        for start in range(0, len(order), train.batch_size):
            batch = order[start : start + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            logits = network(features_train[batch])
            loss = nn.functional.cross_entropy(logits, labels_train[batch])
            if teacher is not None:
                loss = (1 - teacher.alpha) * loss + teacher.alpha * distillation_loss(
                    logits, soft_targets[batch], teacher.temperature)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        train_loss = total_loss / len(order)
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}; lower train.lr")
        val_loss, val_accuracy, val_f1 = _validate(network, features_val, labels_val, spec.n_classes)
        record = EpochRecord(epoch, train_loss, val_loss, val_accuracy, val_f1)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(network.state_dict())
        elif epoch - best_epoch >= train.patience:
            break

    network.load_state_dict(best_state)
    return TrainResult(
        network=network.cpu().eval(),
        spec=spec,
        best_epoch=best_epoch,
        epochs_run=len(history),
        device=device.type,
        seconds=time.perf_counter() - started,
        history=history,
    )


def train_on_data(
    prepared: PreparedData,
    model: ModelConfig,
    train: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    arrays: TrainingArrays | None = None,
) -> TrainResult:
    """Train the configured network on the prepared splits (pass `arrays` to skip transforming)."""
    arrays = arrays or training_arrays(prepared)
    return train_network(
        spec_for_data(model, prepared), arrays.x_train, arrays.y_train, arrays.x_val, arrays.y_val,
        train, seed, on_epoch=on_epoch,
    )


# --- Prefect wrapper -------------------------------------------------------------------------------

PROGRESS_EVERY = 10  # epochs between progress lines


@task(name="train", retries=0, timeout_seconds=3 * 3600, cache_policy=NO_CACHE)
def train_task(
    prepared: PreparedData, model: ModelConfig, train: TrainConfig, seed: int, run_id: str
) -> tuple[TrainResult, float]:
    """No retries: training is seeded, so a rerun would fail the same way."""
    logger = get_run_logger()
    metrics = MetricBuffer(mlflow_client(), run_id)

    def report(record: EpochRecord) -> None:
        metrics.add(
            {"train/loss": record.train_loss, "val/loss": record.val_loss,
             "val/accuracy": record.val_accuracy, "val/f1_macro": record.val_f1_macro},
            step=record.epoch,
        )
        if record.epoch == 1 or record.epoch % PROGRESS_EVERY == 0:
            logger.info(
                "epoch %d/%d  train loss %.4f  val loss %.4f  val accuracy %.4f",
                record.epoch, train.max_epochs, record.train_loss, record.val_loss, record.val_accuracy,
            )

    try:
        result = train_on_data(prepared, model, train, seed, on_epoch=report)
    finally:
        metrics.flush()
    logger.info(
        "%s trained on %s: best epoch %d of %d, val loss %.4f, %.1fs",
        result.spec.family, result.device, result.best_epoch, result.epochs_run, result.best.val_loss, result.seconds,
    )
    return result, result.seconds
