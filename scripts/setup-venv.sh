#!/usr/bin/env bash
# Creates .venv inside the repository holding exactly locks/cpu.txt (vLLM's CPU build, the
# dev tools) plus this project, editable. Quick when nothing changed: a stamp records the
# hash of the install inputs. Dependencies change only through `make lock` (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv-env.sh

VENV=.venv
STAMP="$VENV/.unipool-installed"
inputs_hash=$(cat locks/cpu.txt locks/tools.txt pyproject.toml scripts/setup-venv.sh scripts/uv-env.sh \
              | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ]; then
    exit 0
fi

check_python
echo "[setup] installing locks/cpu.txt into $VENV (first run: a few minutes)"
ensure_uv
[ -x "$VENV/bin/python" ] || "$UV" venv --quiet --python "$PYTHON" "$VENV"
torch_version=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' locks/cpu.txt)
wheels=$(torch_wheels "$torch_version")
# sync = exactly the lock: anything else in the venv is removed, every file is hash-checked.
# --compile-bytecode, as pip does by default: without .pyc files every process compiles vLLM,
# torch and transformers from source at import (16 s instead of 7 s for vLLM's engine on 2 cores),
# three times per server start, and where PYTHONDONTWRITEBYTECODE is set, at every start.
"$UV" pip sync --quiet --python "$VENV/bin/python" --require-hashes --compile-bytecode --find-links "$wheels" \
    locks/cpu.txt
# The project itself, editable; its dependencies are the lock's (none resolved here).
"$UV" pip install --quiet --python "$VENV/bin/python" --no-deps --no-build-isolation --editable .

"$VENV/bin/python" - <<'PY'
import torch, vllm, triton, transformers
import unipool_serve.model_executor  # noqa: F401
assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"[setup] ok: torch {torch.__version__}, vllm {vllm.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$inputs_hash" > "$STAMP"
