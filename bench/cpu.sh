#!/usr/bin/env bash
# The four CPU benchmarks in one go, each timed, then the total (target: under 15 minutes on the
# project's 2-core machine). Data: $CIFAR_RAY_DATA, else ../shared/data/cifar10-jpeg.tar.gz.
#   bash bench/cpu.sh 2>/dev/null | tee cpu_bench.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
DATA="$(realpath "${CIFAR_RAY_DATA:-../shared/data/cifar10-jpeg.tar.gz}")"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/cifar_ray_bench_ray}"  # Ray's socket paths must stay short
mkdir -p "$RAY_TMPDIR"
start=$SECONDS
run() {  # name, command...: print the command, its table, and its wall time
    local name=$1 t0=$SECONDS
    shift
    echo "== $name: $*"
    "$@" | grep -v -E '^\|| Status ==|^Current time|^Using |^Bracket|^Logical|^Current best|^Result logdir|^Number of trials|^\+--|^$|Checkpoint successfully'
    echo "== $name: $((SECONDS - t0)) s"
}
run pipeline "$PY" bench/pipeline.py --data "$DATA" --seconds 8
run epoch "$PY" bench/epoch.py --data "$DATA"
run sweep_overhead "$PY" bench/sweep_overhead.py --data "$DATA"
run asha "$PY" bench/asha.py --data "$DATA"
echo "== all four: $((SECONDS - start)) s"
