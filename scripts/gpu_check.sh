#!/usr/bin/env bash
# The GPU tier in one go on a CUDA machine: environment, `pytest -m gpu`, attention kernels, training benchmark.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (llavakit importable: `pip install -e .`, or run from the repo root)
# Stage time limits (seconds) come from GPU_TESTS_S, ATTENTION_S and TRAIN_S; extra benchmark flags from TRAIN_ARGS.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import importlib.util, torch, transformers
from llavakit.model import attention
print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("varlen_attn", attention._VARLEN_ATTN is not None, "| liger", importlib.util.find_spec("liger_kernel") is not None)
PY

timeout "${GPU_TESTS_S:-240}" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfEs --durations=10 \
  2>&1 | tee "$out/gpu_tests.log" | tail -n 60
timeout "${ATTENTION_S:-90}" python3 benchmarks/gpu_attention.py 2>&1 | tee "$out/attention.log" | tail -n 25
# shellcheck disable=SC2086
timeout "${TRAIN_S:-300}" python3 benchmarks/gpu_train.py --json "$out/gpu_train.json" ${TRAIN_ARGS:-} \
  2>&1 | tee "$out/gpu_train.log" | tail -n 80
echo "== summary"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1
