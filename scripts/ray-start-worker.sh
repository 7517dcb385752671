#!/usr/bin/env bash
# Start this host as a Ray worker with its own resources from clusters/hosts/<hostname>.json: "GPU"
# (if present) is the host's GPU count, every other key a tag, e.g. {"GPU": 1, "cuda": 1, "t4": 1}.
#   scripts/ray-start-worker.sh HEAD_IP:6379 [HOST_FILE]
set -euo pipefail
if [ "${1:-}" = "--supervise" ]; then
  # The detached job below: `ray start ... --block` in a process group of its own (setsid), then, once it
  # ends, the end of every process left in that group. `ray start --block` stops the node's processes
  # it started when one of them ends (the raylet after it lost the head, or killed), but not Ray's
  # agents, which the raylet starts: after the head is gone they wait out a fixed 60 s trying to report
  # the raylet's death to it, so a worker host kept Ray processes for a minute after `ray down`.
  # SIGTERM (the next start ending this one, or systemd) ends `ray start` the same way.
  shift
  ending=""
  trap 'ending=1' TERM INT HUP
  ray start "$@" &
  ray_start=$!
  while kill -0 "$ray_start" 2>/dev/null && [ -z "$ending" ]; do
    wait "$ray_start" || true  # returns early when a trapped signal arrives
  done
  trap '' TERM INT HUP
  if [ "$(ps -o pgid= -p $$ | tr -d ' ')" = "$$" ]; then  # only a group of our own (setsid), never a login's
    left="$(pgrep -g $$ || true)"  # (this shell among them)
    kill -TERM -- "-$$" 2>/dev/null || true
    for _ in $(seq 50); do  # up to 5 s for a clean exit; then whatever is left (this shell too), for good
      alive=""
      for pid in $left; do
        [ "$pid" != $$ ] && kill -0 "$pid" 2>/dev/null && alive=1
      done
      [ -z "$alive" ] && break
      sleep 0.1
    done
    kill -KILL -- "-$$" 2>/dev/null || true
  else
    kill -TERM "$ray_start" 2>/dev/null || true
  fi
  exit 0
fi
address="${1:?usage: ray-start-worker.sh HEAD_IP:6379 [HOST_FILE]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
host_file="${2:-$here/clusters/hosts/$(hostname -s).json}"
if [ ! -f "$host_file" ]; then
  echo "no tags file $host_file: create it, e.g. {\"mps\": 1} or {\"GPU\": 1, \"cuda\": 1, \"gtx1080ti\": 1}" >&2
  exit 2
fi
# one line of ray start options: --num-gpus=N (when declared) and --resources={tags}
options="$(python3 - "$host_file" <<'PY'
import json, shlex, sys
tags = json.load(open(sys.argv[1]))
gpus = tags.pop("GPU", None)
out = [f"--num-gpus={gpus:g}"] if gpus is not None else []
print(" ".join(out + ["--resources=" + shlex.quote(json.dumps(tags))]))
PY
)"
# `ray start --block` stays beside the node's processes and, when one of them ends unexpectedly (the
# raylet after it lost the head, or killed), stops the rest (plain `ray start` leaves Ray's log monitor
# running forever); this script's --supervise mode (above) runs it and ends what it leaves behind. It
# runs in a session of its own (setsid, where there is one) so the SSH login that started it can end;
# this script returns once Ray says it started, or fails with its output.
log="${TMPDIR:-/tmp}/cifar_ray-worker-start.log"
pidfile="${TMPDIR:-/tmp}/cifar_ray-worker-start.pid"
# an earlier one outlives `ray stop` (which stops only its subprocesses): end it first
if [ -f "$pidfile" ] && ps -p "$(cat "$pidfile")" -o args= 2>/dev/null | grep -q -- "--block"; then
  kill "$(cat "$pidfile")" 2>/dev/null || true
fi
detach="$(command -v setsid || true)"  # macOS (the M1 laptops) has no setsid: nohup alone ignores the hangup
# `exec`: the background job becomes the supervisor itself (setsid and nohup exec too), so the pid file
# names the process the next start must end, and under setsid its pid is its process group's
: >"$log"  # emptied here, before the job starts: the wait below must never read the last start's log
eval "exec $detach nohup bash \"\${BASH_SOURCE[0]}\" --supervise --address=\"\$address\" $options --block" \
  >"$log" 2>&1 </dev/null &
ray_start=$!
echo "$ray_start" >"$pidfile"
while kill -0 "$ray_start" 2>/dev/null; do
  if grep -q "Ray runtime started" "$log"; then
    cat "$log"
    exit 0
  fi
  sleep 0.5
done
cat "$log" >&2
exit 1
