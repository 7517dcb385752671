#!/usr/bin/env bash
# A local autoscaling Ray cluster, the twin of cluster.yaml on this one machine (clusters/local.yaml,
# Ray's fake multi-node provider: worker types start as real raylets here when a trial asks for their
# tags, and stop when idle).
#   scripts/local-cluster.sh up       start the head; prints the line to run a sweep on it
#   scripts/local-cluster.sh status   ray status of this cluster
#   scripts/local-cluster.sh down     stop it: every process of this cluster, and only those
# Settings: PY (default .venv/bin/python), CIFAR_RAY_LOCAL_TMPDIR (Ray's temporary root for this
# cluster, default /tmp/cifar_ray-local-<uid>). The head listens on Ray's default port 6379: Ray's fake
# provider starts the worker raylets with --address <this machine>:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RAY="$(dirname "$PY")/ray"
PORT=6379
export RAY_TMPDIR="${CIFAR_RAY_LOCAL_TMPDIR:-/tmp/cifar_ray-local-$(id -u)}"
CONFIG=clusters/local.yaml
# Trials at this script's priority, as the sweep's own local Ray runs them (WORKER_NICENESS in
# cifar_ray/ray_process.py): Ray's default starts workers at nice +15, starved by any other busy process.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

cluster_pids() {
  # The processes whose command line names this cluster's temporary root, every process descended
  # from them, and Ray's agents of this cluster that outlived their raylet: they rename themselves
  # (ray::DashboardAgent, ray::RuntimeEnvAgent), no longer name the folder, and are re-parented to 1,
  # but keep RAY_TMPDIR in their environment.
  local roots orphans pid
  roots="$(pgrep -u "$(id -u)" -f -- "$RAY_TMPDIR/" || true)"
  orphans=""
  for pid in $(pgrep -u "$(id -u)" -f -- '^ray::' || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "RAY_TMPDIR=$RAY_TMPDIR"; then
      orphans="$orphans $pid"
    fi
  done
  ps -u "$(id -u)" -o pid=,ppid=,stat= | awk -v roots="$roots $orphans" -v self="$$" '
    BEGIN { n = split(roots, r, /[ \n]+/); for (i = 1; i <= n; i++) if (r[i] != "") keep[r[i]] = 1 }
    { parent[$1] = $2; if ($3 ~ /^Z/) zombie[$1] = 1 }  # an exited process not yet reaped is gone
    END {
      grown = 1
      while (grown) { grown = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grown = 1 } }
      for (p in keep) if (p != self && (p in parent) && !(p in zombie)) print p
    }'
}

case "${1:-}" in
  up)
    if [ -n "$(cluster_pids)" ]; then
      echo "error: a local cluster is already running under $RAY_TMPDIR; scripts/local-cluster.sh down first" >&2
      exit 2
    fi
    if "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
      echo "error: port $PORT is in use (another Ray head?); the local cluster needs it" >&2
      exit 2
    fi
    "$PY" -m cifar_ray.cluster validate "$CONFIG" --no-sweeps >/dev/null
    mkdir -p -m 700 "$RAY_TMPDIR"
    # `ray up` needs the wheel's fake_multi_node/example.yaml to merge defaults; Ray 2.60's wheel lacks it,
    # so the head is started directly with the same autoscaling config (what `ray up` would run).
    if "$PY" -c 'import os, ray.autoscaler as a; raise SystemExit(not os.path.exists(os.path.join(
        os.path.dirname(a.__file__), "_private", "fake_multi_node", "example.yaml")))' 2>/dev/null; then
      RAY_FAKE_CLUSTER=1 "$RAY" up -y "$CONFIG" >"$RAY_TMPDIR/start.log" 2>&1 || { cat "$RAY_TMPDIR/start.log" >&2; exit 1; }
    else
      if ! RAY_FAKE_CLUSTER=1 "$RAY" start --head --port="$PORT" --num-cpus=0 --include-dashboard=false \
          --autoscaling-config="$CONFIG" >"$RAY_TMPDIR/start.log" 2>&1; then
        cat "$RAY_TMPDIR/start.log" >&2
        exit 1
      fi
    fi
    echo "local cluster up (head on port $PORT; worker types start on demand, stop after 15 s idle)"
    echo "run a sweep on it:"
    echo "  RAY_TMPDIR=$RAY_TMPDIR python -m cifar_ray.sweep sweeps/quickstart.yaml --address auto --cluster-config $CONFIG"
    ;;
  status)
    # the CLI does not find the token mode of a cluster it did not start itself; it is on (Ray 2.60's default)
    RAY_AUTH_MODE=token "$RAY" status --address auto
    ;;
  down)
    pids="$(cluster_pids)"
    if [ -z "$pids" ]; then
      echo "no local cluster running under $RAY_TMPDIR"
      exit 0
    fi
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 100); do  # up to 20 s for a clean exit, then SIGKILL what is left
      [ -z "$(cluster_pids)" ] && break
      sleep 0.2
    done
    # then until every one is gone, the agents the raylets leave behind included
    while left="$(cluster_pids)"; [ -n "$left" ]; do
      kill -KILL $left 2>/dev/null || true
      sleep 0.2
    done
    echo "local cluster down"
    ;;
  *)
    echo "usage: scripts/local-cluster.sh up|status|down" >&2
    exit 2
    ;;
esac
