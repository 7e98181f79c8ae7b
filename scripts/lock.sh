#!/usr/bin/env bash
# `make lock`: resolve every dependency anew (newest versions the specs allow) and pin it,
# with hashes, in locks/. The only way dependencies change: edit pyproject.toml (or
# locks/overrides.txt), run this, commit locks/.
#
#   locks/cpu.txt          cpu + dev extras, Python 3.11, Linux x86_64: .venv, the tests, CI
#   locks/cpu-serve.txt    cpu extra only (a subset of cpu.txt's pins): the CPU image
#   locks/cuda.txt         cuda extra, Python 3.12 (vLLM's image), Linux x86_64: the GPU image
#   locks/tools.txt        uv itself
#   locks/inputs.sha256    hash of the inputs above; tests/unit/test_lock.py compares it
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv-env.sh

check_python
ensure_uv  # the pinned uv resolves the next pin of itself
"$UV" pip compile --quiet locks/tools.in --upgrade --generate-hashes \
    --python-version "$LOCK_PYTHON" --custom-compile-command "make lock" -o locks/tools.txt
ensure_uv

torch_version=$(sed -n 's/.*"torch==\([^"]*+cpu\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$torch_version" ] || die "pyproject.toml's cpu extra must pin torch==<version>+cpu"
wheels=$(torch_wheels "$torch_version")

common=(--upgrade --generate-hashes --overrides locks/overrides.txt --custom-compile-command "make lock"
        --python-platform x86_64-manylinux_2_28)
"$UV" pip compile --quiet pyproject.toml --extra cpu --extra dev --find-links "$wheels" \
    --python-version "$LOCK_PYTHON" "${common[@]}" -o locks/cpu.txt
"$UV" pip compile --quiet pyproject.toml --extra cpu --find-links "$wheels" --constraints locks/cpu.txt \
    --python-version "$LOCK_PYTHON" "${common[@]}" -o locks/cpu-serve.txt
# The GPU image starts from vLLM's own image (Python 3.12, CUDA torch from the public index).
"$UV" pip compile --quiet pyproject.toml --extra cuda --python-version 3.12 \
    --upgrade --generate-hashes --custom-compile-command "make lock" --python-platform x86_64-manylinux_2_28 \
    -o locks/cuda.txt

"$PYTHON" scripts/lock_inputs.py > locks/inputs.sha256
echo "[lock] $(grep -c '^[a-z0-9]' locks/cpu.txt) packages in locks/cpu.txt, $(grep -c '^[a-z0-9]' locks/cuda.txt) in locks/cuda.txt"
