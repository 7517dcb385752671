#!/usr/bin/env bash
# Start this host as a Ray worker with its own resource tags from clusters/hosts/<hostname>.json.
#   scripts/ray-start-worker.sh HEAD_IP:6379 [HOST_FILE]
set -euo pipefail
address="${1:?usage: ray-start-worker.sh HEAD_IP:6379 [HOST_FILE]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
host_file="${2:-$here/clusters/hosts/$(hostname -s).json}"
if [ ! -f "$host_file" ]; then
  echo "no tags file $host_file: create it, e.g. {\"mps\": 1} or {\"cuda\": 1, \"gtx1080ti\": 1}" >&2
  exit 2
fi
resources="$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$host_file")"
exec ray start --address="$address" --resources="$resources"
