"""Text as data, side by side on the built-in `sentiment` set (23.6k sentences, 3 classes), one split
(the pipeline's, seed from the default config) for every row:

- TF-IDF (1-2 grams) + logistic regression, the classic baseline;
- the frozen all-MiniLM-L6-v2 encoder (fp32, then int8) + logistic regression;
- MiniLM fine-tuned (the teacher) and students distilled from it, each in ONNX fp32 and int8;
- what `maas run --dataset sentiment` registers at the default budget (the families compared on the
  int8 encoder's embeddings and the source column), run as a user runs it.

Every row reads the text and the source column; C of each logistic regression is chosen on the
validation split. Latency: in-process, one thread, from raw rows to probabilities (p50 / p99 at
batch 1 and 32); rows/s at batch 32. Sizes: what serving loads (for maas: the graph + the encoder).

Run: .venv/bin/python benchmarks/text.py [STUDENT_LAYERS ...]   (default 3; writes results/text.*;
about 30 minutes with AVX-512, 50 on an AVX2-only CPU)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401 - ours, before onnxruntime.quantization puts its own `models` on sys.path

from benchmarks.common import machine, measured_on, now, write_results  # noqa: E402

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def latencies(predict, rows, batch: int, calls: int) -> dict:
    """p50 / p99 ms of predict over `calls` consecutive batches of raw rows, and rows/s at the p50."""
    import numpy as np

    times = []
    for index in range(calls):
        start = (index * batch) % max(1, len(rows) - batch)
        chunk = rows.iloc[start:start + batch]
        started = time.perf_counter()
        predict(chunk)
        times.append(time.perf_counter() - started)
    p50, p99 = float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 99)) * 1000
    return {f"p50_ms_b{batch}": p50, f"p99_ms_b{batch}": p99, f"rows_per_s_b{batch}": batch / (p50 / 1000)}


def speed(predict, rows) -> dict:
    predict(rows.iloc[:8])  # warm
    return {**latencies(predict, rows, 1, 300), **latencies(predict, rows, 32, 40)}


def best_logistic(x_train, y_train, x_val, y_val):
    """The logistic regression whose C scores best on validation, refitted on train + validation."""
    import numpy as np
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    scores = {C: f1_score(y_val, LogisticRegression(C=C, max_iter=3000).fit(x_train, y_train).predict(x_val),
                          average="macro") for C in C_GRID}
    best = max(scores, key=scores.get)
    stack = sparse.vstack if sparse.issparse(x_train) else np.vstack
    return LogisticRegression(C=best, max_iter=3000).fit(stack([x_train, x_val]), np.concatenate([y_train, y_val])), best


def tfidf_row(splits) -> dict:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import OneHotEncoder

    started = time.perf_counter()
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(splits.x_train.text.fillna(""))
    source = OneHotEncoder(handle_unknown="ignore").fit(splits.x_train[["source"]])

    def features(rows):
        return sparse.hstack([words.transform(rows.text.fillna("")), source.transform(rows[["source"]])]).tocsr()

    model, C = best_logistic(features(splits.x_train), splits.y_train, features(splits.x_val), splits.y_val)
    seconds = time.perf_counter() - started
    predict = lambda rows: model.predict_proba(features(rows))  # noqa: E731
    f1 = f1_score(splits.y_test, predict(splits.x_test).argmax(1), average="macro")
    size = (model.coef_.size + model.intercept_.size) * 8 + sum(len(term) + 8 for term in words.vocabulary_)
    return {"name": "TF-IDF (1-2 grams) + LR", "f1_macro": f1, "size_bytes": size, "train_s": seconds,
            "note": f"C={C}, {len(words.vocabulary_)} terms", **speed(predict, splits.x_test)}


def logistic_on(served, source, splits) -> tuple[dict, int, float]:
    """A logistic regression on [served.embed(text), source one-hot] (C chosen on validation): its
    test macro F1 and speed, its C and its seconds to embed and fit."""
    import numpy as np
    from sklearn.metrics import f1_score

    def features(rows):
        return np.hstack([served.embed(rows.text.fillna("").tolist()), source.transform(rows[["source"]])])

    started = time.perf_counter()
    model, C = best_logistic(features(splits.x_train), splits.y_train, features(splits.x_val), splits.y_val)
    seconds = time.perf_counter() - started
    predict = lambda rows: model.predict_proba(features(rows))  # noqa: E731
    f1 = f1_score(splits.y_test, predict(splits.x_test).argmax(1), average="macro")
    return {"f1_macro": f1, **speed(predict, splits.x_test)}, C, seconds


def frozen_row(splits, precision: str) -> dict:
    from sklearn.preprocessing import OneHotEncoder

    from maas.bundle import TextEncoder
    from models.text_encoder import cached_encoder

    with tempfile.TemporaryDirectory() as scratch:
        folder = cached_encoder(Path(scratch), precision)
        source = OneHotEncoder(handle_unknown="ignore", sparse_output=False).fit(splits.x_train[["source"]])
        measured, C, seconds = logistic_on(TextEncoder(folder, 128, threads=1), source, splits)
        return {"name": f"frozen MiniLM {precision} + LR", "size_bytes": (folder / "encoder.onnx").stat().st_size,
                "train_s": seconds, "note": f"C={C}; train_s embeds train + validation (one thread)", **measured}


def maas_row(splits, scratch: Path) -> dict:
    """`maas run --dataset sentiment` with the default config, then its champion's bundle on the test rows."""
    from sklearn.metrics import f1_score

    env = dict(os.environ, MAAS_HOME=str(scratch / "home"), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    summary_path = scratch / "summary.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "maas", "run", "--dataset", "sentiment", "--summary", str(summary_path)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    summary = json.loads(summary_path.read_text())
    os.environ.update(MAAS_HOME=env["MAAS_HOME"])
    from maas.bundle import ModelBundle
    from maas.registered import ModelRef, download_bundle
    from maas.tracking import mlflow_client

    mlflow_client()  # MLflow pointed at the run's store

    bundle = ModelBundle.load(download_bundle(ModelRef(summary["model_name"], version=str(summary["model_version"])), scratch / "bundle"),
                              threads=1)
    folder = Path(bundle.preprocessing["text"][0]["_encoder_dir"]).parent
    size = sum(path.stat().st_size for path in folder.rglob("*.onnx"))
    f1 = f1_score(splits.y_test, bundle.predict_proba(splits.x_test).argmax(1), average="macro")
    return {"name": f"maas run (selected: {summary.get('family', '?')})", "f1_macro": f1, "size_bytes": size,
            "train_s": seconds, "note": f"summary test F1 {summary['test_metrics']['f1_macro']:.4f}; train_s: the "
                                        "whole run, encoder export and registration included",
            "stages_s": summary["stage_seconds"], **speed(bundle.predict_proba, splits.x_test)}


def finetuning_inputs(splits) -> tuple:
    """(the source column's one-hot encoder, fitted on the training rows; the training and validation
    texts; their one-hot sources as float32 extra features), by split name."""
    import numpy as np
    from sklearn.preprocessing import OneHotEncoder

    source = OneHotEncoder(handle_unknown="ignore", sparse_output=False).fit(splits.x_train[["source"]])
    texts = {name: rows.text.fillna("").tolist() for name, rows in (("train", splits.x_train), ("val", splits.x_val))}
    extra = {name: source.transform(rows[["source"]]).astype(np.float32)
             for name, rows in (("train", splits.x_train), ("val", splits.x_val))}
    return source, texts, extra


def finetuned_rows(splits, student_layers: tuple[int, ...] = (3,), epochs: int = 2) -> list[dict]:
    """The teacher: MiniLM fine-tuned with a linear head on [embedding, source one-hot]
    (models.text_encoder.fine_tune: AdamW, encoder lr 3e-5, head 1e-3, linear decay, the epoch best
    on validation kept). The students: distilled from it (models.text_encoder.distil) keeping
    `student_layers` layers, served with the teacher's head. Each exported to ONNX fp32 and dynamic
    int8, the head in numpy; the pipeline builds the same with --set data.text_finetune_epochs=2."""
    import numpy as np
    import torch
    from sklearn.metrics import f1_score

    from maas.bundle import TextEncoder
    from models.text_encoder import Distillation, FineTuning, distil, export_encoder, fine_tune

    torch.set_num_threads(2)
    source, texts, extra = finetuning_inputs(splits)
    teacher = fine_tune(texts["train"], splits.y_train, texts["val"], splits.y_val, FineTuning(epochs=epochs),
                        extra["train"], extra["val"])
    print(f"teacher: validation F1 {teacher.val_f1:.4f}, {teacher.seconds:.0f} s", flush=True)
    models = {"fine-tuned MiniLM (teacher, 6 layers)": (teacher, f"{epochs} epochs fine-tuned")}
    for layers in student_layers:
        student = distil(teacher, texts["train"], texts["val"], splits.y_val, Distillation(layers=layers, epochs=epochs),
                         extra["train"], extra["val"])
        print(f"student {layers}: validation F1 {student.val_f1:.4f}, {student.seconds:.0f} s", flush=True)
        models[f"distilled student, {layers} layers"] = (student, f"{epochs} epochs distilled from the teacher")
    rows = []
    for name, (model, how) in models.items():
        with torch.no_grad():
            weight, bias = (model.head.weight.cpu().numpy().T.astype(np.float64),
                            model.head.bias.cpu().numpy().astype(np.float64))
        for precision in ("fp32", "int8"):
            with tempfile.TemporaryDirectory() as scratch:
                folder = export_encoder(Path(scratch), precision, model.encoder)
                served = TextEncoder(folder, 128, threads=1)
                size = (folder / "encoder.onnx").stat().st_size

                def predict_served(rows, served=served, weight=weight, bias=bias):
                    features = np.hstack([served.embed(rows.text.fillna("").tolist()), source.transform(rows[["source"]])])
                    return features @ weight + bias

                f1 = f1_score(splits.y_test, predict_served(splits.x_test).argmax(1), average="macro")
                rows.append({"name": f"{name} {precision} (ONNX)", "f1_macro": f1, "size_bytes": size,
                             "train_s": model.seconds, "note": f"{how}, validation F1 {model.val_f1:.4f} (torch fp32)",
                             **speed(predict_served, splits.x_test)})
                print(rows[-1]["name"], flush=True)
                if precision == "int8":
                    rows.append(refitted_row(rows[-1], served, source, splits))
                    print(rows[-1]["name"], flush=True)
    return rows


def refitted_row(row: dict, served, source, splits) -> dict:
    """`row`'s int8 encoder with its head refitted: a logistic regression on the encoder's own int8
    embeddings of the training texts, as the pipeline fits its families on the served encoder's
    embeddings rather than reusing the torch head."""
    measured, C, seconds = logistic_on(served, source, splits)
    return {"name": row["name"].replace("(ONNX)", "(ONNX), head refitted"), "size_bytes": row["size_bytes"],
            "train_s": row["train_s"] + seconds, "note": f"LR C={C} on its int8 embeddings; train_s adds the "
                                                         "embedding and the fit", **measured}


def ratios(rows: list[dict]) -> list[str]:
    """Each ONNX row against the teacher in fp32: speed at batch 32, size, and test F1 in points."""
    teacher = next(row for row in rows if row["name"].startswith("fine-tuned") and "fp32" in row["name"])
    lines = ["", "Against the fine-tuned teacher in fp32:", ""]
    for row in rows:
        if "(ONNX)" in row["name"] and row is not teacher:
            lines.append(f"- {row['name']}: {row['rows_per_s_b32'] / teacher['rows_per_s_b32']:.2f}x rows/s at batch 32, "
                         f"{teacher['size_bytes'] / row['size_bytes']:.1f}x smaller, "
                         f"{100 * (row['f1_macro'] - teacher['f1_macro']):+.2f} points of test macro F1")
    return lines


def render(report: dict) -> str:
    lines = ["# Text: the built-in sentiment set", "", measured_on(report), "",
             f"{report['rows']} sentences, 3 classes; train {report['n_train']} / validation {report['n_val']} / "
             f"test {report['n_test']} (the pipeline's split). One thread for every row's predictions.", "",
             "| model | test macro F1 | size | p50 / p99 ms b1 | p50 / p99 ms b32 | rows/s b32 | training s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows_measured"]:
        lines.append(f"| {row['name']} | {row['f1_macro']:.4f} | {row['size_bytes'] / 1e6:.1f} MB | "
                     f"{row['p50_ms_b1']:.2f} / {row['p99_ms_b1']:.2f} | {row['p50_ms_b32']:.1f} / {row['p99_ms_b32']:.1f} | "
                     f"{row['rows_per_s_b32']:.0f} | {row['train_s']:.0f} | {row['note']} |")
    stages = next(row["stages_s"] for row in report["rows_measured"] if "stages_s" in row)
    lines += ["", "maas run's stages (seconds of compute): " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in stages.items())]
    lines += ratios(report["rows_measured"])
    return "\n".join(lines) + "\n"


def sentiment_splits():
    """The built-in sentiment set split as `maas run --dataset sentiment` splits it: (splits, the
    default config, the number of rows)."""
    from maas.config import load_config
    from tasks.data import encode_target, load_builtin, split_rows

    config = load_config(ROOT / "configs" / "default.yaml", dataset="sentiment")
    table = load_builtin("sentiment")
    codes, _ = encode_target(table.frame[table.target], table.target, config.data)
    return split_rows(table.frame.drop(columns=[table.target]), codes, config.data, config.seed), config, len(table.frame)


def main() -> None:
    from threadpoolctl import threadpool_limits

    splits, _, n_rows = sentiment_splits()
    report = {"measured_at": now(), "machine": machine(), "rows": n_rows, "n_train": len(splits.y_train),
              "n_val": len(splits.y_val), "n_test": len(splits.y_test), "rows_measured": []}
    with tempfile.TemporaryDirectory() as scratch:
        report["rows_measured"].append(maas_row(splits, Path(scratch)))
        print(report["rows_measured"][-1]["name"], flush=True)
        with threadpool_limits(limits=1):
            for measure in (tfidf_row, lambda s: frozen_row(s, "fp32"), lambda s: frozen_row(s, "int8")):
                report["rows_measured"].append(measure(splits))
                print(report["rows_measured"][-1]["name"], flush=True)
        report["rows_measured"].extend(finetuned_rows(splits, tuple(int(layers) for layers in sys.argv[1:]) or (3,)))
    report["rows_measured"] = report["rows_measured"][1:] + report["rows_measured"][:1]
    write_results("text", report, render)


if __name__ == "__main__":
    main()
