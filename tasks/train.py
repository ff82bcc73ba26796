"""Training: AdamW on mini-batches, early stopping on validation loss, seeded, CPU or CUDA."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from maas.budget import Budget
from maas.bundle import feature_count
from maas.config import ModelConfig, TrainConfig
from maas.errors import MaasInputError
from maas.run_context import RunContext
from models import NetworkSpec, build_network
from tasks.data import PreparedData, TrainingArrays


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
    out_of_time: bool = False  # stopped by train.max_seconds (the run's budget), not by patience

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


# Below this many multiply-adds per mini-batch, torch's ops are too small to split: a second
# intra-op thread only spins. Tuning breast_cancer's MLP took the same wall time on 1 thread as on 2
# here, at half the CPU (9.5 vs 19-22 s), which leaves the other core to MLflow's recording; the
# digits CNN (~20M per batch) ran 7% faster on 2.
SMALL_BATCH_MACS = 4_000_000


def multiply_adds_per_row(network: nn.Module, n_features: int) -> int:
    """Multiply-adds of one forward pass on one row: Linear and Conv2d layers, found by a dry run."""
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups

    hooks = [module.register_forward_hook(count) for module in network.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, n_features, device=next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


@contextmanager
def cpu_threads(network: nn.Module, spec: NetworkSpec, train: TrainConfig, device: torch.device) -> Iterator[None]:
    """torch's intra-op threads while this network trains: train.threads, or one for a small network.
    Nothing to set on a GPU (the dry run there once met CPU zeros: every CUDA training failed)."""
    if device.type != "cpu":
        yield
        return
    wanted = train.threads or (1 if multiply_adds_per_row(network, spec.n_features) * train.batch_size < SMALL_BATCH_MACS
                               else None)
    if not wanted:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(min(wanted, previous) if not train.threads else wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def network_spec_for(
    model: ModelConfig, n_features: int, n_classes: int, image_shape: tuple[int, int] | None
) -> NetworkSpec:
    """Resolve the network family (mlp or cnn named in family or families, else cnn for image-like
    data) and turn the model config into a spec."""
    family = model.family
    if family not in ("mlp", "cnn"):
        named = [name for name in model.families if name in ("mlp", "cnn")]
        family = named[0] if named else "cnn" if image_shape is not None else "mlp"
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


def spec_for_data(model: ModelConfig, prepared: PreparedData) -> NetworkSpec:
    """The network spec for this data: input width, classes and image shape come from it."""
    return network_spec_for(model, feature_count(prepared.preprocessing), len(prepared.labels), prepared.image_shape)


class TrainingSettings(NamedTuple):
    """What one training uses: the network's shape and the optimisation, configured or tuning's pick."""

    model: ModelConfig
    train: TrainConfig


def within_budget(settings: TrainingSettings, budget: Budget) -> TrainingSettings:
    """The settings with train.max_seconds cut to the training stage's allotment of the run's budget."""
    return settings._replace(train=settings.train.model_copy(
        update={"max_seconds": budget.limit("train", settings.train.max_seconds)}))


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
    """Train a fresh student on a trained teacher's softened outputs mixed with the labels."""

    network: nn.Module
    temperature: float = 4.0
    alpha: float = 0.7


@dataclass(frozen=True)
class FineTune:
    """Continue training this network in place (the pruned and structured variants)."""

    network: nn.Module


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 so its gradients match the label loss."""
    log_student = torch.log_softmax(student_logits / temperature, dim=1)
    return nn.functional.kl_div(log_student, soft_targets, reduction="batchmean") * temperature**2


def train_network(
    spec: NetworkSpec,
    arrays: TrainingArrays,
    train: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    start: FineTune | Distillation | None = None,
) -> TrainResult:
    """Train a fresh network for the spec (start None), fine-tune one (FineTune) or distil a student
    (Distillation); keep the epoch with the lowest validation loss."""
    started = time.perf_counter()
    device = resolve_device(train.device)
    seed_everything(seed)
    network = (start.network if isinstance(start, FineTune) else build_network(spec)).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    features_train = torch.as_tensor(arrays.x_train, dtype=torch.float32, device=device)
    labels_train = torch.as_tensor(arrays.y_train, dtype=torch.long, device=device)
    features_val = torch.as_tensor(arrays.x_val, dtype=torch.float32, device=device)
    labels_val = torch.as_tensor(arrays.y_val, dtype=torch.long, device=device)
    shuffler = torch.Generator().manual_seed(seed)
    teacher = start if isinstance(start, Distillation) else None
    soft_targets = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = copy.deepcopy(teacher.network).to(device).eval()(features_train)
        soft_targets = torch.softmax(teacher_logits / teacher.temperature, dim=1)

    history: list[EpochRecord] = []
    best_loss, best_epoch, best_state = float("inf"), 0, None
    out_of_time = False
    with cpu_threads(network, spec, train, device):
        for epoch in range(1, train.max_epochs + 1):
            network.train()
            order = torch.randperm(len(features_train), generator=shuffler).to(device)
            total_loss = 0.0
            for begin in range(0, len(order), train.batch_size):
                batch = order[begin : begin + train.batch_size]
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
            if train.max_seconds is not None and time.perf_counter() - started > train.max_seconds:
                out_of_time = epoch < train.max_epochs
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
        out_of_time=out_of_time,
    )


def train_on_data(
    prepared: PreparedData,
    settings: TrainingSettings,
    seed: int,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train the network the settings describe on the prepared splits."""
    return train_network(spec_for_data(settings.model, prepared), prepared.arrays, settings.train, seed, on_epoch)


def progress_logger(logger, max_epochs: int, every: int = 10) -> Callable[[EpochRecord], None]:
    """An on_epoch callback printing a progress line on the first and every `every`-th epoch."""

    def report(record: EpochRecord) -> None:
        if record.epoch == 1 or record.epoch % every == 0:
            logger.info("epoch %d/%d  train loss %.4f  val loss %.4f  val accuracy %.4f",
                        record.epoch, max_epochs, record.train_loss, record.val_loss, record.val_accuracy)

    return report


def epoch_series(history: list[EpochRecord]) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch metrics as (step, {name: value}) for one batched MLflow write."""
    return [(record.epoch, {"train/loss": record.train_loss, "val/loss": record.val_loss,
                            "val/accuracy": record.val_accuracy, "val/f1_macro": record.val_f1_macro})
            for record in history]


def record_training(ctx: RunContext, trained: TrainResult) -> None:
    """The final training's curves and where it stopped, in one write; a line for the log."""
    ctx.record(metrics={"train/best_epoch": trained.best_epoch, "train/epochs_run": trained.epochs_run},
               series=epoch_series(trained.history))
    ctx.logger.info("%s trained on %s: best epoch %d of %d, val loss %.4f, %.1fs", trained.spec.family,
                    trained.device, trained.best_epoch, trained.epochs_run, trained.best.val_loss, trained.seconds)
    if trained.out_of_time:
        ctx.budget.cut("train", f"stopped after epoch {trained.epochs_run} "
                                f"by the run's budget ({trained.seconds:.0f} s), keeping epoch {trained.best_epoch}")
        ctx.logger.warning("budget: %s", ctx.budget.cuts["train"])


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="train", retries=0, timeout_seconds=3 * 3600, cache_policy=NO_CACHE)
def train_task(ctx: RunContext, prepared: PreparedData, settings: TrainingSettings, seed: int) -> TrainResult:
    """No retries: training is seeded, so a rerun would fail the same way."""
    settings = within_budget(settings, ctx.budget)
    report = progress_logger(ctx.logger, settings.train.max_epochs)
    return ctx.run_stage("train", partial(train_on_data, prepared, settings, seed, report), record_training)
