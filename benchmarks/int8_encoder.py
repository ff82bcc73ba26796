"""Does int8 pay on this CPU? The MiniLM encoder as maas exports it (6 layers, and the 3 a student
keeps), fp32 against int8, run as the service runs it: one text per call, one ONNX Runtime thread.

What int8 buys depends on the CPU's int8 instructions (AVX512-VNNI and AMX, or AVX2 alone) and on
how wide its vector units are, which `benchmarks/text.py` (50 minutes) measures on one machine only.
This takes a few minutes, so it can be run on every machine a model will serve from. Each run
replaces its own CPU's row in results/int8_encoder.* and keeps the rows of other CPUs.

Agreement: the cosine of each text's int8 embedding to its fp32 one, and how often a logistic
regression fitted on fp32 embeddings answers the same label from the int8 ones (ONNX Runtime's
issues report near-random int8 BERTs when the weight type is wrong: this would show it).

Run: .venv/bin/python benchmarks/int8_encoder.py   (writes results/int8_encoder.*)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401 - ours, before onnxruntime.quantization puts its own `models` on sys.path

from benchmarks.common import RESULTS_DIR, machine, now, write_results  # noqa: E402

NAME = "int8_encoder"
FIT_TEXTS, MEASURED_TEXTS = 1000, 400
LAYERS = (6, 3)


def texts_per_s(encoder, texts: list[str]) -> float:
    encoder.embed(texts[:10])  # warm
    started = time.perf_counter()
    encoder.embed(texts)
    return len(texts) / (time.perf_counter() - started)


def measure_layers(layers: int, fit: list[str], labels, measured: list[str], scratch: Path) -> dict:
    """fp32 and int8 of the encoder cut to `layers`: texts/s, size, and int8's agreement with fp32."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from maas.bundle import TextEncoder
    from models.text_encoder import export_encoder, load_encoder, student_of

    pretrained = load_encoder()
    encoder = pretrained if layers == len(pretrained.transformer.encoder.layer) else student_of(pretrained, layers)
    row: dict = {"layers": layers}
    embeddings = {}
    for precision in ("fp32", "int8"):
        folder = export_encoder(scratch / f"{layers}-{precision}", precision, encoder)
        served = TextEncoder(folder, 128, threads=1)
        row[f"{precision}_texts_per_s"] = texts_per_s(served, measured)
        row[f"{precision}_bytes"] = (folder / "encoder.onnx").stat().st_size
        embeddings[precision] = served.embed(measured)
        if precision == "fp32":
            head = LogisticRegression(C=1.0, max_iter=3000).fit(served.embed(fit), labels)
    fp32, int8 = embeddings["fp32"], embeddings["int8"]
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    row.update(speedup=row["int8_texts_per_s"] / row["fp32_texts_per_s"], smaller=row["fp32_bytes"] / row["int8_bytes"],
               cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
               label_agreement=float((head.predict(fp32) == head.predict(int8)).mean()))
    return row


def cpu_key(report: dict) -> str:
    m = report["machine"]
    return f"{m['cpu']}, {m['cpu_generation']}; int8 instructions: {m['int8']}"


def render(report: dict) -> str:
    lines = ["# int8 against fp32 for the MiniLM encoder, by CPU", "",
             "One text per call, one ONNX Runtime thread, as the service embeds; texts of the built-in sentiment "
             f"set ({report['measured_texts']} measured; a logistic regression fitted on {report['fit_texts']} "
             "others' fp32 embeddings gives the label agreement). Each CPU's row is its latest run.", "",
             "| CPU | measured | layers | fp32 texts/s | int8 texts/s | int8 speed | smaller | "
             "cosine mean / min | same label |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, run in sorted(report["cpus"].items()):
        for row in run["rows"]:
            lines.append(f"| {key} | {run['measured_at'][:10]} | {row['layers']} | {row['fp32_texts_per_s']:.0f} | "
                         f"{row['int8_texts_per_s']:.0f} | {row['speedup']:.2f}x | {row['smaller']:.1f}x | "
                         f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f} | {row['label_agreement']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from threadpoolctl import threadpool_limits

    from benchmarks.text import sentiment_splits

    splits, _, _ = sentiment_splits()
    fit = splits.x_train.text.fillna("").astype(str).tolist()[:FIT_TEXTS]
    labels = splits.y_train[:FIT_TEXTS]
    measured = splits.x_test.text.fillna("").astype(str).tolist()[:MEASURED_TEXTS]
    run = {"measured_at": now(), "machine": machine(), "rows": []}
    with tempfile.TemporaryDirectory() as scratch, threadpool_limits(limits=1):
        for layers in LAYERS:
            run["rows"].append(measure_layers(layers, fit, labels, measured, Path(scratch)))
            print(json.dumps(run["rows"][-1]), flush=True)
    previous = RESULTS_DIR / f"{NAME}.json"
    cpus = json.loads(previous.read_text())["cpus"] if previous.exists() else {}
    report = {"fit_texts": FIT_TEXTS, "measured_texts": MEASURED_TEXTS, "cpus": cpus}
    report["cpus"][cpu_key(run)] = run
    write_results(NAME, report, render)


if __name__ == "__main__":
    main()
