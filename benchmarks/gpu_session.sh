#!/usr/bin/env bash
# One GPU session for the pool-MoE kernels: tests on CUDA (bf16 included), the graph-replay
# benchmarks side by side with today's kernel, and a quick tune of the 469M shape.
# Sized for about 10 minutes on an H100/H200; each stage has its own time limit, so a slow
# one cannot starve the rest, and every stage writes its log and JSON as soon as it ends.
#
#   benchmarks/gpu_session.sh [OUT_DIR]        # default: docs/results/gpu-session-<date>
#
# Needs a python3 with torch (CUDA) and triton; no vLLM, no install: the repository's
# kernels/ folder is put on the path as unipool_serve.kernels.
# Today's kernel, for the side-by-side columns: BASELINE_DIR=<a kernels/ folder>, or
# BASELINE_REF=<git ref> when this checkout has its .git (default c2025e8, the commit the
# issue-18 measurements were taken at). Without either the baseline columns are left out.
#
# Files written (8, flat except one folder): env.txt, tests.log, kernels.json, kernels.log,
# pool-decode.json, pool-decode.log, tune.log, configs/<tuned file>.json
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/docs/results/gpu-session-$(date -u +%Y%m%d-%H%M)}
PY=${PYTHON:-python3}
mkdir -p "$OUT/configs"
export PYTHONUNBUFFERED=1

# unipool_serve is a namespace package: a folder holding a link to kernels/ is enough.
SITE=$(mktemp -d)
mkdir -p "$SITE/unipool_serve"
ln -s "$REPO/kernels" "$SITE/unipool_serve/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

BASELINE=()
if [ -n "${BASELINE_DIR:-}" ]; then
    BASELINE=(--baseline "$BASELINE_DIR")
elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    ref=${BASELINE_REF:-c2025e8}
    mkdir -p "$SITE/baseline" && git -C "$REPO" archive "$ref" kernels | tar -x -C "$SITE/baseline" \
        && BASELINE=(--baseline "$SITE/baseline/kernels")
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    echo "baseline: ${BASELINE[*]:-none}"
    git -C "$REPO" log -1 --oneline 2>/dev/null || echo "commit: unknown (no .git)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # stage NAME SECONDS LOG COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
    tail -n 25 "$log"
}

cd "$REPO"
# 1. Kernel tests on the GPU: every kernel against its reference, bf16 included (~2-3 min).
stage tests 240 "$OUT/tests.log" "$PY" -m pytest tests/kernels -q -p no:cacheprovider -x
# 2. Kernels, eager and graph replay, fused vs baseline vs torch._grouped_mm, align stages (~2 min).
stage bench_kernels 210 "$OUT/kernels.log" "$PY" benchmarks/bench_kernels.py "${BASELINE[@]}" \
    --tokens 1 2 4 8 16 32 128 512 2048 --out "$OUT/kernels.json"
# 3. A 24-layer 469M decode stack in one graph vs sum_l u_l x expert bytes (~1 min).
stage bench_pool_decode 120 "$OUT/pool-decode.log" "$PY" benchmarks/bench_pool_decode.py "${BASELINE[@]}" \
    --out "$OUT/pool-decode.json"
# 4. Quick tune of the 469M shape at the issue's goal points (~2 min); configs land in $OUT,
#    not kernels/configs: review them, then commit.
stage tune 150 "$OUT/tune.log" "$PY" benchmarks/tune_fused_moe.py --quick --shape 1024,4096,192,1 \
    --tokens 1 8 32 128 --out-dir "$OUT/configs"
echo "results in $OUT"
