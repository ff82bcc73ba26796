"""What every benchmark shares: a description of the machine, and where results are written."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")))
    import torch

    return {
        "cpu": cpu, "cpu_generation": cpu_generation(), "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1), "int8": int8_instructions(),
        "cuda": torch.cuda.is_available(), "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "prefect", "mlflow", "onnxruntime")},
    }


def cpu_generation() -> str:
    """'family 23 model 1': what tells one 'AMD EPYC' from another (that one is a Zen 1, whose AVX2
    runs on 128-bit units: int8 gained 1.1x there, 2.5x on a Xeon with AMX)."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("cpu family", "model") and key.strip() not in info:
            info[key.strip()] = value.strip()
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def int8_instructions() -> str:
    """The CPU's int8 dot-product instructions, which decide what int8 inference gains: 'AVX512-VNNI,
    AMX', or 'none (AVX2 only)'. The same model name ('AMD EPYC') has come both with and without."""
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), []))
    found = [name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX"))
             if flag in flags]
    return ", ".join(found) or "none (AVX2 only)"


def cpu_label(m: dict) -> str:
    """The CPU's name, and its family and model where the report kept them."""
    return f"{m['cpu']} ({m['cpu_generation']})" if "cpu_generation" in m else m["cpu"]


def measured_on(report: dict) -> str:
    """One sentence: when and on what the figures were taken."""
    m = report["machine"]
    int8 = f", int8 instructions: {m['int8']}" if "int8" in m else ""
    return (f"Measured {report['measured_at']} on {cpu_label(m)}{int8}, {m['cores']} cores, {m['memory_gib']} GiB, "
            f"CUDA {m['cuda']}; Python {m['python']}, torch {m['torch']}, prefect {m['prefect']}, "
            f"mlflow {m['mlflow']}, onnxruntime {m['onnxruntime']}.")


def write_results(name: str, report: dict, render: Callable[[dict], str]) -> None:
    """results/NAME.json (all figures) and results/NAME.md (the tables), and print the tables."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(report, indent=2))
    markdown = render(report)
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    print(markdown)
