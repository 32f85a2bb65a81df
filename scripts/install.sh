#!/usr/bin/env bash
# Create .venv (if needed) and install llavakit with its training, serving, evaluation (and lmms-eval), test,
# quantisation (QLoRA: bitsandbytes) and video (PyAV) extras.
#
# The packages are installed by uv (itself installed into .venv by pip): about 40 s where pip takes about 100 s
# (measured on this project's 2-core CI machine). uv reads none of pip's configuration, so pip's package sources
# (PIP_* variables or pip's config files: find-links folders, where a machine may keep wheels such as a CPU torch
# build, index URLs, no-index, constraint files) are handed to it, with pip's rule of taking the best version across
# indexes; uv's own UV_* variables apply too. --compile-bytecode because with PYTHONDONTWRITEBYTECODE=1 every import
# would otherwise recompile.
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): a loose spec pulls the newest CUDA
# build and gigabytes of nvidia-* wheels. From PyPI alone, Linux x86_64 gets the CUDA build of any torch version:
# a CPU build must come from the machine's sources (find-links, an index) or from uv's UV_TORCH_BACKEND=cpu. On a
# GPU machine, install the torch build you want into .venv before running this (or set TORCH_SPEC); an installed
# torch is kept. torchvision and timm are never installed: on CPU-only torch they break `import transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# -qq: pip warns about every configured local index folder that lacks uv.
python -m pip install -qq "uv>=0.13.9,<0.14"

# pip's merged configuration, read once (`pip config get` misses keys of some config files).
pip_config=$(python -m pip config list 2>/dev/null || true)
pip_setting() { # $1: a pip option (find-links); its value from PIP_<OPTION>, else pip's [install] or [global] config
  local variable value section
  variable="PIP_$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
  value=${!variable:-}
  for section in install global; do
    [ -n "$value" ] || value=$(printf '%s\n' "$pip_config" | sed -n "s/^$section\.$1='\(.*\)'\$/\1/p" | tail -n 1)
  done
  printf '%s\n' "$value"
}

uv_args=(--python .venv/bin/python --quiet --compile-bytecode)
set -f # the settings are split on whitespace, as pip does, and never glob-expanded
for location in $(pip_setting find-links); do uv_args+=(--find-links "$location"); done
index_url=$(pip_setting index-url)
if [ -n "$index_url" ]; then uv_args+=(--index-url "$index_url"); fi
extra_index_urls=$(pip_setting extra-index-url)
for url in $extra_index_urls; do uv_args+=(--extra-index-url "$url"); done
if [ -n "$extra_index_urls" ]; then uv_args+=(--index-strategy unsafe-best-match); fi
for file in $(pip_setting constraint); do uv_args+=(--constraint "$file"); done
case "$(pip_setting no-index)" in 1 | true | yes | on) uv_args+=(--no-index) ;; esac
set +f
uv_install() { uv pip install "${uv_args[@]}" "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  uv_install "$TORCH_SPEC"
fi
TORCH_VERSION=$(python -c "from importlib.metadata import version; print(version('torch').split('+')[0])")
uv_install -e ".[train,serve,dev,quant,eval,lmms,video]" "torch==${TORCH_VERSION}"
# lmms-eval (for `lmms-eval --model llavakit`) without its requirements: they pull torchvision and timm. The `lmms`
# extra above holds what it needs to import.
uv_install --no-deps "lmms-eval==${LMMS_EVAL_VERSION:-0.7.3}"
python - <<'PY'
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed in .venv: it breaks transformers on CPU torch; pip uninstall torchvision")
import llavakit, torch, transformers
print(f"llavakit {llavakit.__version__} | torch {torch.__version__} | transformers {transformers.__version__}")
PY
