#!/usr/bin/env bash
# Two Ray nodes on this one machine, as separate Ray nodes on two loopback addresses
# (on Linux all of 127.0.0.0/8 is loopback): a head on 127.0.0.2 and a worker on 127.0.0.3
# (not 127.0.0.1: Ray replaces that one with the machine's own address),
# each offering ONE logical CPU, so a two-worker vLLM placement group ([{"CPU": 1}] x 2)
# must put one worker on each node (docs/deploy.md, "Ray").
#
#   scripts/ray-two-nodes.sh start    start both nodes (fails if a Ray cluster already runs here)
#   scripts/ray-two-nodes.sh status   `ray status` of the cluster
#   scripts/ray-two-nodes.sh stop     stop both nodes (`ray stop --force`: every Ray process of this user)
#
# Needs `ray` on PATH (or RAY=/path/to/ray) in an environment holding this project and
# vLLM; Ray is not in the project's locks (docs/deploy.md shows how to make one).
# Environment: RAY_TEMP_DIR (default /tmp/ray-two-nodes), RAY_HEAD_PORT (default 6379),
# RAY_OBJECT_STORE_BYTES per node (default 256 MiB), RAY_PORT_BASE (default 52360: the
# dashboard, client-server and agent ports are RAY_PORT_BASE+0..7, fixed so that the two
# nodes on one machine do not collide). The nodes' workers inherit this
# script's environment, so set VLLM_* / OMP_NUM_THREADS before `start` if they matter.
set -euo pipefail

RAY=${RAY:-ray}
TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray-two-nodes}
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3
PORT=${RAY_HEAD_PORT:-6379}
STORE=${RAY_OBJECT_STORE_BYTES:-268435456}
BASE=${RAY_PORT_BASE:-52360}
export RAY_USAGE_STATS_ENABLED=0

common=(--num-cpus 1 --num-gpus 0 --object-store-memory "$STORE" --disable-usage-stats)

case "${1:-}" in
start)
    mkdir -p "$TEMP_DIR"
    "$RAY" start --head --node-ip-address "$HEAD_IP" --port "$PORT" --temp-dir "$TEMP_DIR" \
        --include-dashboard false --dashboard-port "$BASE" --ray-client-server-port $((BASE + 1)) \
        --dashboard-agent-listen-port $((BASE + 2)) --dashboard-agent-grpc-port $((BASE + 3)) \
        --runtime-env-agent-port $((BASE + 4)) \
        "${common[@]}"
    "$RAY" start --address "$HEAD_IP:$PORT" --node-ip-address "$WORKER_IP" \
        --dashboard-agent-listen-port $((BASE + 5)) --dashboard-agent-grpc-port $((BASE + 6)) \
        --runtime-env-agent-port $((BASE + 7)) \
        "${common[@]}"
    ;;
status)
    "$RAY" status --address "$HEAD_IP:$PORT"
    ;;
stop)
    "$RAY" stop --force
    ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
