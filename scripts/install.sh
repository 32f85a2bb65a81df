#!/usr/bin/env bash
# Create .venv (if needed) and install llavakit with its training, serving, test and quantisation (QLoRA:
# bitsandbytes) extras.
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): a loose spec pulls the newest CUDA
# build and gigabytes of nvidia-* wheels. On a GPU machine, install the torch build you want before running this
# (or set TORCH_SPEC); an installed torch is kept. torchvision and timm are never installed: on CPU-only torch they
# break `import transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
pip install -q -e ".[train,serve,dev,quant]" "torch==${TORCH_VERSION}"
python - <<'PY'
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed in .venv: it breaks transformers on CPU torch; pip uninstall torchvision")
import llavakit, torch, transformers
print(f"llavakit {llavakit.__version__} | torch {torch.__version__} | transformers {transformers.__version__}")
PY
