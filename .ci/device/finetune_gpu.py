"""Device side: MiniLM fine-tuned (the teacher, 2 epochs) and a 3-layer student distilled from it on
the built-in sentiment set's pipeline split, on the device training_device() picks (CUDA there);
validation F1 in torch, test F1 through the exported ONNX fp32 and int8 encoders, as
benchmarks/results/text.md reports them for the CPU. Writes $OUT/finetune_gpu.json."""

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

from benchmarks.text import finetuning_inputs, sentiment_splits  # noqa: E402
from maas.bundle import TextEncoder  # noqa: E402
from models.text_encoder import (Distillation, FineTuning, distil, export_encoder, fine_tune,  # noqa: E402
                                 training_device)


def test_f1(model, precision: str, source, splits) -> float:
    """The model's head on its exported encoder's embeddings of the test texts (and the source column)."""
    with torch.no_grad():
        weight, bias = model.head.weight.cpu().numpy().T, model.head.bias.cpu().numpy()
    with tempfile.TemporaryDirectory() as scratch:
        served = TextEncoder(export_encoder(Path(scratch), precision, model.encoder), 128)
        features = np.hstack([served.embed(splits.x_test.text.fillna("").tolist()),
                              source.transform(splits.x_test[["source"]])])
    return float(f1_score(splits.y_test, (features @ weight + bias).argmax(1), average="macro"))


def main() -> None:
    splits, _, _ = sentiment_splits()
    source, texts, extra = finetuning_inputs(splits)
    teacher = fine_tune(texts["train"], splits.y_train, texts["val"], splits.y_val, FineTuning(epochs=2),
                        extra["train"], extra["val"])
    student = distil(teacher, texts["train"], texts["val"], splits.y_val, Distillation(layers=3, epochs=2),
                     extra["train"], extra["val"])
    report = {"device": str(training_device()), "torch": torch.__version__, "train_texts": len(texts["train"]),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name, model in (("teacher", teacher), ("student", student)):
        report[name] = {"seconds": round(model.seconds, 1), "validation_f1_torch": round(model.val_f1, 4),
                        **{f"test_f1_onnx_{precision}": round(test_f1(model, precision, source, splits), 4)
                           for precision in ("fp32", "int8")}}
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "finetune_gpu.json").write_text(text)


if __name__ == "__main__":
    main()
