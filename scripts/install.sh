#!/usr/bin/env bash
# Create .venv (if needed) and install llavakit with its training, serving, test and quantisation (QLoRA:
# bitsandbytes) extras.
#
# The packages are installed by uv (itself installed into .venv by pip): about 30 s where pip takes about 100 s
# (measured on this project's 2-core CI machine). uv reads none of pip's configuration, so pip's find-links folders
# (where a machine keeps wheels such as a CPU torch build) are handed to it; its own UV_* variables still apply.
# --compile-bytecode because an environment with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every import.
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
# -qq: pip warns about every configured local index folder that lacks uv.
python -m pip install -qq uv

find_links=()
for location in ${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}; do
  find_links+=(--find-links "$location")
done
uv_install() { uv pip install --quiet --compile-bytecode ${find_links[@]+"${find_links[@]}"} "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  uv_install "$TORCH_SPEC"
fi
TORCH_VERSION=$(python -c "from importlib.metadata import version; print(version('torch').split('+')[0])")
uv_install -e ".[train,serve,dev,quant]" "torch==${TORCH_VERSION}"
python - <<'PY'
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed in .venv: it breaks transformers on CPU torch; pip uninstall torchvision")
import llavakit, torch, transformers
print(f"llavakit {llavakit.__version__} | torch {torch.__version__} | transformers {transformers.__version__}")
PY
