"""The text search (models/text_search.py) on the built-in sentiment set, as `maas run --set
data.text_search_trials=8` runs it: the pipeline's split, a sample of 2,000 training and 1,000
validation texts, 8 trials within 600 s. Every trial's settings, validation macro F1 (a logistic
regression refitted on its embeddings) and seconds, and the choice against the two configured
settings it tried first (frozen, and fine-tuned at lr 3e-5 for 2 epochs at 128 tokens).

Run: .venv/bin/python benchmarks/text_search.py   (writes results/text_search.*; about 12 minutes)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401 - ours, before onnxruntime.quantization puts its own `models` on sys.path

from benchmarks.common import machine, measured_on, now, write_results  # noqa: E402


def render(report: dict) -> str:
    lines = ["# Text search: the encoder's settings searched on the sentiment set", "", measured_on(report), "",
             f"{report['n_train']} training and {report['n_val']} validation rows in the split; each trial reads "
             f"{report['train_texts']} and {report['val_texts']} of them; {report['trials']} trials within "
             f"{report['max_seconds']:.0f} s. Validation macro F1 through a logistic regression refitted on each "
             "trial's embeddings (torch fp32).", "",
             "| trial | mode | max length | encoder lr | epochs (run) | val macro F1 | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in report["trials_run"]:
        lr = f"{row['encoder_lr']:.1e}" if row.get("encoder_lr") else ""
        epochs = f"{row['epochs']} ({row['epochs_run']:.2f})" if row.get("epochs") else ""
        lines.append(f"| {row['number']} | {row['mode']} | {row['max_length']} | {lr} | {epochs} | "
                     f"{row['value']:.4f} | {row['seconds']:.0f} |")
    choice, defaults = report["choice"], report["trials_run"][:2]
    lines += ["", f"**Chose:** {choice['described']}.", ""]
    lines += [f"- against the configured {row['mode']} settings (trial {row['number']}): "
              f"{(choice['val_f1'] - row['value']) * 100:+.2f} points" for row in defaults]
    lines.append(f"- the whole search: {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks.text import sentiment_splits
    from models.text_search import TextSearch, search_text_settings, searched_trials
    from tasks.data import labelled_texts

    splits, config, _ = sentiment_splits()
    search = TextSearch(seed=config.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        journal = Path(scratch) / "search.journal"
        choice = search_text_settings(labelled_texts(splits, "text"), search, journal)
        trials = searched_trials(journal)
    report = {"measured_at": now(), "machine": machine(), "n_train": len(splits.y_train), "n_val": len(splits.y_val),
              "train_texts": search.train_texts, "val_texts": search.val_texts, "trials": search.trials,
              "max_seconds": search.max_seconds, "seconds": time.perf_counter() - started,
              "choice": {**choice.__dict__, "described": choice.describe()},
              "trials_run": [{"number": trial.number, **trial.params, "value": trial.value,
                              "epochs_run": trial.user_attrs.get("epochs_run", 0.0),
                              "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()}
                             for trial in trials]}
    write_results("text_search", report, render)


if __name__ == "__main__":
    main()
