"""Compression: smaller or faster variants of the trained network, each exported as a model bundle.

fp32 is the trained network as it is, the reference every other variant is measured against.
pruned zeroes the smallest weights (global magnitude) and fine-tunes with the mask: the graph keeps
its shape, so it is smaller only when stored compressed and no faster. structured removes whole
hidden units / channels, giving a narrower dense network that is faster. int8 quantizes the fp32
ONNX graph's weights with ONNX Runtime's dynamic quantization (the fastest CPU int8 route measured
here; torch.ao.quantization is deprecated). distilled trains a narrower student on the teacher's
softened outputs plus the labels.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn
from torch.nn.utils import prune

from maas.bundle import MODEL_FILE
from maas.config import CompressionConfig, TrainConfig
from maas.run_context import RunContext
from models import NetworkSpec, build_network
from models.cnn import SmallCNN
from models.mlp import TabularMLP
from tasks.data import PreparedData
from tasks.export import update_metadata, write_bundle
from tasks.train import Distillation, FineTune, TrainResult, train_network

MIN_WIDTH = 4  # no hidden layer or conv stage is shrunk below this many units / channels


@dataclass
class Variant:
    """One exported variant: where its bundle is and how it was made."""

    name: str
    bundle_dir: Path
    spec: NetworkSpec
    parameters: int  # weights and biases in the graph
    nonzero_parameters: int
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    network: nn.Module | None = None  # the torch network it was exported from (None for int8)
    # fitted on the validation rows too (a scikit-learn family's final fit): its validation figures
    # are in-sample, so they are reported apart and never set beside a network's
    saw_validation: bool = False


@dataclass
class FailedVariant:
    name: str
    error: str


# --- counting --------------------------------------------------------------------------------------


def weight_layers(network: nn.Module) -> list[nn.Module]:
    return [module for module in network.modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def parameter_counts(network: nn.Module) -> tuple[int, int]:
    """(all, non-zero) parameters, reading through pruning masks if any are still attached."""
    tensors = [tensor.detach() for layer in weight_layers(network) for tensor in (layer.weight, layer.bias)
               if tensor is not None]
    return sum(t.numel() for t in tensors), sum(int(torch.count_nonzero(t)) for t in tensors)


# --- unstructured: global magnitude pruning -----------------------------------------------------


def magnitude_prune(network: nn.Module, sparsity: float) -> nn.Module:
    """A copy with the smallest-magnitude weights across all layers masked to zero."""
    pruned = copy.deepcopy(network)
    targets = [(layer, "weight") for layer in weight_layers(pruned)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    return pruned


def make_pruning_permanent(network: nn.Module) -> nn.Module:
    """Fold each mask into its weight so the module is a plain one again (exportable, no hooks)."""
    for layer in weight_layers(network):
        if prune.is_pruned(layer):
            prune.remove(layer, "weight")
    return network


# --- structured: remove whole units / channels --------------------------------------------------


def _keep_count(width: int, keep: float) -> int:
    return min(width, max(MIN_WIDTH, round(width * keep)))


def _strongest(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (sorted) of the output units / channels with the largest L2 weight norm."""
    norms = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
    return torch.sort(torch.topk(norms, count).indices).values


def _copy_linear(target: nn.Linear, source: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    weight, bias = source.weight.detach(), source.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    target.weight.data.copy_(weight)
    target.bias.data.copy_(bias)


def shrink_mlp(network: TabularMLP, spec: NetworkSpec, keep: float) -> tuple[nn.Module, NetworkSpec]:
    linears = [layer for layer in network.layers if isinstance(layer, nn.Linear)]
    kept = [_strongest(layer.weight, _keep_count(layer.out_features, keep)) for layer in linears[:-1]]
    new_spec = NetworkSpec(**{**spec.to_dict(), "hidden_sizes": tuple(len(rows) for rows in kept)})
    smaller = build_network(new_spec)
    new_linears = [layer for layer in smaller.layers if isinstance(layer, nn.Linear)]
    for index, (target, source) in enumerate(zip(new_linears, linears)):
        rows = kept[index] if index < len(kept) else None
        cols = kept[index - 1] if index > 0 else None
        _copy_linear(target, source, rows, cols)
    return smaller, new_spec


def shrink_cnn(network: SmallCNN, spec: NetworkSpec, keep: float) -> tuple[nn.Module, NetworkSpec]:
    convs = [layer for layer in network.features if isinstance(layer, nn.Conv2d)]
    hidden, output = [layer for layer in network.head if isinstance(layer, nn.Linear)]
    kept = [_strongest(conv.weight, _keep_count(conv.out_channels, keep)) for conv in convs]
    kept_hidden = _strongest(hidden.weight, _keep_count(hidden.out_features, keep))
    new_spec = NetworkSpec(**{**spec.to_dict(), "cnn_channels": tuple(len(c) for c in kept),
                              "hidden_sizes": (len(kept_hidden), *spec.hidden_sizes[1:])})
    smaller = build_network(new_spec)
    for index, (target, source) in enumerate(zip([m for m in smaller.features if isinstance(m, nn.Conv2d)], convs)):
        weight = source.weight.detach()[kept[index]]
        if index > 0:
            weight = weight[:, kept[index - 1]]
        target.weight.data.copy_(weight)
        target.bias.data.copy_(source.bias.detach()[kept[index]])
    # The flattened conv output is channel-major: channel c owns positions c*hw ... (c+1)*hw - 1.
    positions = hidden.in_features // convs[-1].out_channels
    columns = (kept[-1][:, None] * positions + torch.arange(positions)[None, :]).reshape(-1)
    new_hidden, new_output = [layer for layer in smaller.head if isinstance(layer, nn.Linear)]
    _copy_linear(new_hidden, hidden, kept_hidden, columns)
    _copy_linear(new_output, output, None, kept_hidden)
    return smaller, new_spec


def structured_shrink(network: nn.Module, spec: NetworkSpec, keep: float) -> tuple[nn.Module, NetworkSpec]:
    """A narrower dense network holding the strongest units / channels of each hidden layer."""
    if isinstance(network, TabularMLP):
        return shrink_mlp(network, spec, keep)
    if isinstance(network, SmallCNN):
        return shrink_cnn(network, spec, keep)
    raise TypeError(f"no structured pruning for {type(network).__name__}")


# --- distillation ---------------------------------------------------------------------------------


def student_spec(spec: NetworkSpec, scale: float, dropout: float) -> NetworkSpec:
    """The teacher's architecture at a fraction of its width (same depth, same input and output).

    Dropout is the student's own: the teacher's soft targets regularize it already, and on digits
    a distilled student with dropout 0 beat the same student trained from scratch on 5 of 5 seeds
    where with the teacher's dropout it did not (benchmarks/compression.py)."""
    narrower = tuple(max(MIN_WIDTH, round(width * scale)) for width in spec.hidden_sizes)
    channels = tuple(max(MIN_WIDTH, round(width * scale)) for width in spec.cnn_channels)
    return NetworkSpec(**{**spec.to_dict(), "hidden_sizes": narrower, "cnn_channels": channels, "dropout": dropout})


# --- int8: ONNX Runtime dynamic quantization ------------------------------------------------------


class _CalibrationRows:
    """ONNX Runtime's calibration reader over preprocessed training rows, 64 at a time."""

    def __init__(self, features: np.ndarray, input_name: str = "features"):
        self.batches = iter([{input_name: features[start:start + 64]} for start in range(0, len(features), 64)])

    def get_next(self):
        return next(self.batches, None)


def quantize_bundle(source_dir: Path, target_dir: Path, op_types: list[str], calibration: np.ndarray) -> Path:
    """Copy an fp32 bundle and replace its graph with a static int8 one: weights per channel, and each
    activation's range calibrated once on `calibration` (preprocessed training rows).

    Static, not dynamic: dynamic quantization takes an activation's range from the whole batch, so a
    row's answer changed with the rows it was batched with (by up to 0.34 in probability, and one label,
    on breast_cancer's test split here); the service batches whatever requests arrive together. Static
    int8 answered each row the same alone and in any batch, agreed with fp32 on 100% of test labels on
    breast_cancer and digits, at the same speed as dynamic. The QOperator form (QLinearMatMul): QDQ's
    separate quantize/dequantize nodes made a small network's graph larger than its fp32 one."""
    import models  # noqa: F401 - before onnxruntime.quantization, which puts its own `models` package on sys.path
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if target_dir.exists():
        shutil.rmtree(target_dir)
    shutil.copytree(source_dir, target_dir)
    prepared = target_dir / "prepared.onnx"  # shape inference + graph fusion, as ORT recommends
    quant_pre_process(source_dir / MODEL_FILE, prepared)
    quantize_static(prepared, target_dir / MODEL_FILE, _CalibrationRows(calibration.astype(np.float32)),
                    quant_format=QuantFormat.QOperator, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(op_types))
    prepared.unlink()
    for leftover in target_dir.glob("*.onnx.data"):  # calibration's augmented-model files, if any
        leftover.unlink()
    return target_dir


# --- building every configured variant ------------------------------------------------------------


def finetune_config(train: TrainConfig, config: CompressionConfig) -> TrainConfig:
    return train.model_copy(update={
        "lr": train.lr * config.finetune_lr_scale,
        "max_epochs": config.finetune_epochs,
        "patience": max(3, min(train.patience, config.finetune_epochs // 3)),
    })


@dataclass
class Variants:
    """The compression stage's result: the variants built (fp32 first) and those that failed."""

    built: list[Variant]
    failed: list[FailedVariant]


def build_variants(
    trained: TrainResult, prepared: PreparedData, config: CompressionConfig, train: TrainConfig, seed: int,
    folder: Path,
) -> Variants:
    """Build and export each configured variant; one that fails is kept as a failure and skipped."""
    arrays = prepared.arrays

    def export(name: str, network: nn.Module, spec: NetworkSpec, **details: Any) -> Variant:
        bundle = write_bundle(folder / name, network, spec, prepared)
        update_metadata(bundle, variant=name)
        total, nonzero = parameter_counts(network)
        return Variant(name, bundle, spec, total, nonzero, details, network=network)

    def fp32() -> Variant:
        return export("fp32", trained.network, trained.spec)

    def pruned() -> Variant:
        masked = magnitude_prune(trained.network, config.sparsity)
        tuned = train_network(trained.spec, arrays, finetune_config(train, config), seed, start=FineTune(masked))
        network = make_pruning_permanent(tuned.network)
        total, nonzero = parameter_counts(network)
        return export("pruned", network, trained.spec, sparsity=round(1 - nonzero / total, 4),
                      finetune_epochs=tuned.epochs_run, out_of_time=tuned.out_of_time)

    def structured() -> Variant:
        smaller, spec = structured_shrink(trained.network, trained.spec, config.keep_units)
        tuned = train_network(spec, arrays, finetune_config(train, config), seed, start=FineTune(smaller))
        return export("structured", tuned.network, spec, keep_units=config.keep_units,
                      hidden_sizes=list(spec.hidden_sizes), cnn_channels=list(spec.cnn_channels),
                      finetune_epochs=tuned.epochs_run, out_of_time=tuned.out_of_time)

    def int8() -> Variant:
        calibration = arrays.x_train[:config.int8_calibration_rows]
        bundle = quantize_bundle(folder / "fp32", folder / "int8", config.int8_ops, calibration)
        update_metadata(bundle, variant="int8")
        total, nonzero = parameter_counts(trained.network)
        return Variant("int8", bundle, trained.spec, total, nonzero,
                       {"route": "onnxruntime.quantize_static", "ops": list(config.int8_ops),
                        "calibration_rows": len(calibration)})

    def distilled() -> Variant:
        spec = student_spec(trained.spec, config.student_scale, config.student_dropout)
        teacher = Distillation(trained.network, config.temperature, config.alpha)
        student = train_network(spec, arrays, train, seed, start=teacher)
        return export("distilled", student.network, spec, hidden_sizes=list(spec.hidden_sizes),
                      cnn_channels=list(spec.cnn_channels), temperature=config.temperature,
                      alpha=config.alpha, epochs=student.epochs_run, out_of_time=student.out_of_time)

    builders = {"fp32": fp32, "pruned": pruned, "structured": structured, "int8": int8, "distilled": distilled}
    variants = Variants([], [])
    for name in config.variants:
        started = time.perf_counter()
        try:
            variant = builders[name]()
        except Exception as error:
            if name == "fp32":
                raise  # the reference is the trained model itself: without it there is nothing to compare
            variants.failed.append(FailedVariant(name, f"{error.__class__.__name__}: {error}"))
            continue
        variant.seconds = time.perf_counter() - started
        variants.built.append(variant)
    return variants


def record_compression(ctx: RunContext, variants: Variants) -> None:
    """A line per variant for the log; the failures are recorded as FAILED child runs with the scores."""
    for failure in variants.failed:
        ctx.logger.warning("variant %s could not be built and is skipped: %s", failure.name, failure.error)
    for variant in variants.built:
        ctx.logger.info("variant %s: %d parameters (%d non-zero), built in %.1f s",
                        variant.name, variant.parameters, variant.nonzero_parameters, variant.seconds)
    cut = [variant.name for variant in variants.built if variant.details.get("out_of_time")]
    if cut:
        ctx.budget.cut("compress", f"training of {', '.join(cut)} stopped by the run's budget")
        ctx.logger.warning("budget: %s", ctx.budget.cuts["compress"])


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="compress", retries=0, timeout_seconds=3 * 3600, cache_policy=NO_CACHE)
def compress_task(ctx: RunContext, trained: TrainResult, prepared: PreparedData, config: CompressionConfig,
                  train: TrainConfig, seed: int) -> Variants:
    folder = ctx.scratch_dir("variants")
    config, seconds_each, left_out = variants_in_time(config, trained, ctx.budget.allot("compress"))
    if left_out:
        ctx.budget.cut("compress", left_out)
        ctx.logger.warning("budget: %s", left_out)
    if seconds_each is not None:  # each variant that trains gets an equal part of the stage's time
        train = train.model_copy(update={"max_seconds": seconds_each})
    return ctx.run_stage("compress", partial(build_variants, trained, prepared, config, train, seed, folder),
                         record_compression)


RETRAINED = ("pruned", "structured", "distilled")  # the variants that train, as the network did


def variants_in_time(config: CompressionConfig, trained: TrainResult, allotted: float | None
                     ) -> tuple[CompressionConfig, float | None, str]:
    """The variants to build in the stage's allotment of the run's budget, the seconds each one that
    trains may take, and a note of those left out. A variant trains one epoch at least, so where an
    epoch of the network's training takes longer than a variant's share they are left out: on
    195,000 rows (7 s an epoch) with 2 s left, their single epochs took the run 23 s past its budget."""
    retrained = [name for name in config.variants if name in RETRAINED]
    if allotted is None or not retrained:
        return config, None, ""
    seconds_each = allotted / len(retrained)
    epoch_s = trained.seconds / max(1, trained.epochs_run)
    if seconds_each >= epoch_s:
        return config, seconds_each, ""
    kept = config.model_copy(update={"variants": [name for name in config.variants if name not in retrained]})
    return kept, None, (f"{', '.join(retrained)} left out: an epoch of training takes ~{epoch_s:.1f} s, "
                        f"~{seconds_each:.1f} s each was left")
