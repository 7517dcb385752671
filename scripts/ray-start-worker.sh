#!/usr/bin/env bash
# Start this host as a Ray worker with its own resources from clusters/hosts/<hostname>.json: "GPU"
# (if present) is the host's GPU count, every other key a tag, e.g. {"GPU": 1, "cuda": 1, "t4": 1}.
#   scripts/ray-start-worker.sh HEAD_IP:6379 [HOST_FILE]
set -euo pipefail
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
# running forever). It runs in a session of its own (setsid, where there is one) so the SSH login that
# started it can end; this script returns once Ray says it started, or fails with its output.
log="${TMPDIR:-/tmp}/cifar_ray-worker-start.log"
pidfile="${TMPDIR:-/tmp}/cifar_ray-worker-start.pid"
# an earlier one outlives `ray stop` (which stops only its subprocesses): end it first
if [ -f "$pidfile" ] && ps -p "$(cat "$pidfile")" -o args= 2>/dev/null | grep -q -- "--block"; then
  kill "$(cat "$pidfile")" 2>/dev/null || true
fi
detach="$(command -v setsid || true)"  # macOS (the M1 laptops) has no setsid: nohup alone ignores the hangup
# `exec`: the background job becomes `ray start` itself (setsid and nohup exec too), so the pid file
# names the --block process the next start must end; without it the pid was a bash subshell's, the
# check above never matched, and a --block process whose node `ray stop` ended slept on for ever
: >"$log"  # emptied here, before the job starts: the wait below must never read the last start's log
eval "exec $detach nohup ray start --address=\"\$address\" $options --block" >"$log" 2>&1 </dev/null &
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
