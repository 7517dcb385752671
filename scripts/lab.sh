#!/usr/bin/env bash
# The seed's lab of hosts on this one machine: a head and the hosts named in clusters/hosts/ (m1-laptop,
# desktop-1080ti, t4-box), each with its own network address, hostname, process table, /tmp and home,
# and a real sshd; Ray's `local` provider then brings them up over SSH as it would a real lab.
#   scripts/lab.sh up              build the hosts, write clusters/lab.yaml; then `ray up clusters/lab.yaml -y`
#   scripts/lab.sh status          the hosts, their addresses and what runs on each
#   scripts/lab.sh down            remove every namespace, process, address, mount and key it made
#   scripts/lab.sh unplug HOST     set HOST's network link down (a laptop leaving the network)
#   scripts/lab.sh plug HOST       set it up again
#   scripts/lab.sh reset HOST      kill every process on HOST (a power cut), then boot it again (sshd only)
#   scripts/lab.sh exec HOST CMD   run CMD on HOST as root (its namespaces, its home)
#   scripts/lab.sh yaml            write clusters/lab.yaml again (after an edit of clusters/onprem.yaml)
# Needs root (namespaces, a bridge, mounts) and Debian's openssh-server and rsync. The hosts take
# addresses in 198.18.0.0/24 (the benchmark-testing range) on a bridge of the lab's own and have no
# route beyond it: traffic from a host reaches only the lab. Settings: CIFAR_RAY_LAB (state folder,
# default /var/tmp/cifar-ray-lab), PY (the Python each host runs, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
LAB="${CIFAR_RAY_LAB:-/var/tmp/cifar-ray-lab}"
PY="${PY:-.venv/bin/python}"
BRIDGE=crlab0
BRIDGE_IP=198.18.0.1
PREFIX=24
SHARED=/mnt/cifar-ray  # the NFS export onprem.yaml describes: the same folder on every host and here
HEAD=head
HEAD_IP=198.18.0.10
NS_PREFIX=cifar-lab-

die() { echo "error: $*" >&2; exit 2; }

workers() {  # the hosts of clusters/hosts/, sorted: m1-laptop desktop-1080ti t4-box -> .21 .22 .23
  local f
  for f in clusters/hosts/*.json; do basename "$f" .json; done | sort
}

host_ip() {
  local name="$1" i=21 w
  [ "$name" = "$HEAD" ] && { echo "$HEAD_IP"; return; }
  for w in $(workers); do
    [ "$w" = "$name" ] && { echo "198.18.0.$i"; return; }
    i=$((i + 1))
  done
  die "no host $name in the lab (hosts: $HEAD $(workers | tr '\n' ' '))"
}

all_hosts() { echo "$HEAD"; workers; }

veth_of() {  # the host's end of its link on the bridge (interface names are at most 15 characters)
  local name="$1" i=0 h
  for h in $(all_hosts); do
    [ "$h" = "$name" ] && { echo "crlab-v$i"; return; }
    i=$((i + 1))
  done
}

init_pid() { cat "$LAB/$1/init.pid" 2>/dev/null || true; }

host_alive() { local pid; pid="$(init_pid "$1")"; [ -n "$pid" ] && [ -e "/proc/$pid" ]; }

host_ns() {  # the host's PID namespace (unshare, its init pid, made it for its children)
  local pid
  pid="$(init_pid "$1")"
  [ -n "$pid" ] && readlink "/proc/$pid/ns/pid_for_children" 2>/dev/null || true
}

ns_pids() {  # the live processes of a PID namespace, seen from here (zombies are gone already)
  local ns="$1" p
  [ -n "$ns" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$ns" ] || continue
    grep -q '^State:[[:space:]]*Z' "$p/status" 2>/dev/null || echo "${p#/proc/}"
  done
}

host_pids() { ns_pids "$(host_ns "$1")"; }

python_home() {  # the folder of the interpreter the project's venv was made from (pyvenv.cfg's home)
  sed -n 's/^home = //p' "$(dirname "$PY")/../pyvenv.cfg"
}

# ---------------------------------------------------------------- one host, from inside its namespaces

boot() {  # PID 1 of a host: its own /tmp, /run, home and /etc/hosts, the shared folder, and sshd
  local name="$1" dir="$LAB/$1"
  hostname "$name"
  # the host's /tmp is its own, but the repository and its Python stay visible where they lie under /tmp
  # (a clone there: the host's venv reads this machine's packages from it)
  local keep=() path i venv
  venv="$(cd "$(dirname "$PY")/.." && pwd)"
  for path in "$REPO" "$venv"; do
    case "$path" in "$REPO"/*) continue ;; /tmp | /tmp/*) keep+=("$path") ;; esac
  done
  for i in "${!keep[@]}"; do mkdir -p "$dir/keep$i"; mount --bind "${keep[$i]}" "$dir/keep$i"; done
  mount -t tmpfs -o mode=1777 tmpfs /tmp
  for i in "${!keep[@]}"; do mkdir -p "${keep[$i]}"; mount --bind "$dir/keep$i" "${keep[$i]}"; done
  mount -t tmpfs -o mode=755 tmpfs /run
  mkdir -p /run/sshd
  mount --bind "$LAB/etc-hosts" /etc/hosts
  mkdir -p "$SHARED"
  mount --bind "$LAB/shared" "$SHARED"
  # the host's own home; the machine's Python installation under it stays visible (a host's system Python)
  local pyroot
  pyroot="$(python_home)"
  if [ "${pyroot#"$HOME"/}" != "$pyroot" ]; then
    local top="${pyroot#"$HOME"/}"
    top="${top%%/*}"
    mkdir -p "$dir/home/$top"
    mount --bind "$HOME/$top" "$dir/home/$top"
  fi
  mount --rbind "$dir/home" "$HOME"
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" >>"$dir/sshd.log" 2>&1 &
  # PID 1 of the namespace: reap whatever the sessions leave behind until sshd ends
  while kill -0 $! 2>/dev/null; do wait $! || true; done
}

start_host() {
  local name="$1" dir="$LAB/$1" ns="$NS_PREFIX$1"
  rm -f "$dir/init.pid"
  setsid ip netns exec "$ns" unshare --uts --pid --mount --fork --mount-proc --propagation private \
    bash "$REPO/scripts/lab.sh" _boot "$name" </dev/null >>"$dir/boot.log" 2>&1 &
  echo $! >"$dir/init.pid"
  local ip
  ip="$(host_ip "$name")"
  for _ in $(seq 1 300); do  # until its sshd answers (60 s at most)
    if "$PY" -c "import socket, sys; s = socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('$ip', 22)))" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  cat "$dir/boot.log" "$dir/sshd.log" >&2 2>/dev/null || true
  die "host $name did not start its sshd"
}

make_host() {
  local name="$1" ip dir="$LAB/$1" ns="$NS_PREFIX$1" veth
  ip="$(host_ip "$name")"
  veth="$(veth_of "$name")"
  mkdir -p "$dir/home/.ssh" "$dir/home/.config/pip"
  chmod 700 "$dir/home" "$dir/home/.ssh"
  cp "$LAB/key.pub" "$dir/home/.ssh/authorized_keys"
  cat >"$dir/home/.bashrc" <<BASHRC
# $name's ~/.bashrc (a lab host)
# The lab's failure detection, read by the Ray every login shell starts (ray up's start commands): the
# head marks a silent host dead after 5 missed health checks, one a second with a 2 s timeout (about 15 s;
# Ray's defaults, 3 s and 10 s, take about 65 s), and its autoscaler starts a node's Ray again 15 s after
# its last heartbeat (default 30 s). The lab's bridge has no latency to allow for; a real lab keeps Ray's
# defaults (clusters/onprem.yaml sets none of these).
export RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=2000 RAY_health_check_failure_threshold=5
export AUTOSCALER_HEARTBEAT_TIMEOUT_S=15
BASHRC
  printf '# %s: login shells read ~/.bashrc too, as Debian'"'"'s default ~/.profile does\n[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n' \
    "$name" >"$dir/home/.profile"
  ssh-keygen -q -t ed25519 -N "" -C "lab host $name" -f "$dir/ssh_host_ed25519_key"
  cat >"$dir/sshd_config" <<EOF
ListenAddress $ip
HostKey $dir/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
PidFile none
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
EOF
  # The host's Python: a virtual environment that sees this machine's installed packages (torch,
  # torchvision, Ray, pip ...), the stand-in for a machine that has them installed already. The cluster
  # file's setup_commands install cifar_ray into it. The lab has no route to a package index.
  "$(python_home)/python3" -m venv --without-pip "$dir/home/cifar-ray-venv"
  "$PY" -c 'import site; print(site.getsitepackages()[0])' \
    >"$(ls -d "$dir"/home/cifar-ray-venv/lib/python3*/site-packages)/lab-host-packages.pth"
  # console scripts of those packages (ray, wandb ...) run with the host's Python, as if installed there
  local script venv_py="$dir/home/cifar-ray-venv/bin/python"
  for script in "$(dirname "$PY")"/*; do
    [ -f "$script" ] && [ ! -e "$dir/home/cifar-ray-venv/bin/$(basename "$script")" ] || continue
    head -c 2 "$script" | grep -q '#!' && head -n 1 "$script" | grep -q python || continue
    { echo "#!$venv_py"; tail -n +2 "$script"; } >"$dir/home/cifar-ray-venv/bin/$(basename "$script")"
    chmod 755 "$dir/home/cifar-ray-venv/bin/$(basename "$script")"
  done
  # no index to reach: build editable installs with the setuptools the host has (pip reads this
  # store-false option inverted: "no-build-isolation = false" turns build isolation off)
  printf '[global]\nno-index = true\nno-build-isolation = false\nfind-links =\nextra-index-url =\n' \
    >"$dir/home/.config/pip/pip.conf"
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/$PREFIX" dev eth0
  ip -n "$ns" link set eth0 up
  start_host "$name"
}

write_lab_yaml() {  # clusters/onprem.yaml with the lab's addresses, user and key, nothing else changed
  local workers_ips="" w
  for w in $(workers); do workers_ips="$workers_ips${workers_ips:+, }$(host_ip "$w")"; done
  "$PY" - "$LAB/key" "$HEAD_IP" "$workers_ips" <<'EOF'
import re
import sys
from pathlib import Path

key, head, workers = sys.argv[1:]
text = Path("clusters/onprem.yaml").read_text()
header = ("# clusters/lab.yaml: written by scripts/lab.sh up. clusters/onprem.yaml with the lab's addresses,\n"
          "# SSH user and key; nothing else changed (python -m cifar_ray.cluster validate checks it).\n")
text = re.sub(r"^(\s*)head_ip: .*$", rf"\g<1>head_ip: {head}", text, count=1, flags=re.M)
text = re.sub(r"^(\s*)worker_ips: .*$", rf"\g<1>worker_ips: [{workers}]", text, count=1, flags=re.M)
text = re.sub(r"^(\s*)ssh_user: .*$", r"\g<1>ssh_user: root", text, count=1, flags=re.M)
text = re.sub(r"^(\s*)#? ?ssh_private_key: .*$", rf"\g<1>ssh_private_key: {key}", text, count=1, flags=re.M)
body = "\n".join(line for line in text.splitlines() if not line.startswith("# clusters/onprem.yaml"))
Path("clusters/lab.yaml").write_text(header + body + "\n")
EOF
}

# ---------------------------------------------------------------- commands

up() {
  [ "$(id -u)" = 0 ] || die "the lab needs root (network namespaces, a bridge, mounts)"
  command -v /usr/sbin/sshd >/dev/null || die "no sshd: apt-get install openssh-server rsync"
  command -v rsync >/dev/null || die "no rsync: apt-get install rsync"
  [ -x "$PY" ] || die "$PY: no such Python; run make setup first"
  [ -d "$LAB" ] && die "a lab is already up under $LAB; scripts/lab.sh down first"
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "interface $BRIDGE exists already; scripts/lab.sh down first"
  mkdir -p -m 700 "$LAB" "$LAB/shared"
  mkdir -p "$LAB/shared/results"
  ssh-keygen -q -t ed25519 -N "" -C "cifar-ray lab" -f "$LAB/key"
  {
    echo "127.0.0.1 localhost"
    for h in $(all_hosts); do echo "$(host_ip "$h") $h"; done
  } >"$LAB/etc-hosts"
  ip link add "$BRIDGE" type bridge
  ip addr add "$BRIDGE_IP/$PREFIX" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  if [ ! -d "$SHARED" ]; then mkdir -p "$SHARED"; touch "$LAB/made-mountpoint"; fi
  mount --bind "$LAB/shared" "$SHARED"
  for h in $(all_hosts); do make_host "$h"; done
  write_lab_yaml
  "$PY" -m cifar_ray.cluster validate clusters/lab.yaml >/dev/null
  if [ ! -f "$HOME/.ray/auth_token" ]; then  # the cluster file carries this machine's Ray token to every host
    "$(dirname "$PY")/ray" get-auth-token --generate >/dev/null
    echo "made a Ray token at ~/.ray/auth_token (yours, kept by down; the cluster file copies it to every host)"
  fi
  echo "lab up: $(for h in $(all_hosts); do printf '%s=%s ' "$h" "$(host_ip "$h")"; done)"
  echo "shared folder: $SHARED (results: $SHARED/results); SSH key: $LAB/key"
  echo "next: PATH=$(dirname "$PY"):\$PATH ray up clusters/lab.yaml -y"
}

status() {
  [ -d "$LAB" ] || { echo "no lab under $LAB"; return 0; }
  local h
  for h in $(all_hosts); do
    local state="down" link
    host_alive "$h" && state="up"
    link="$(ip -n "$NS_PREFIX$h" -br link show eth0 2>/dev/null | awk '{print $2}')"
    local ray
    ray="$(for p in $(host_pids "$h"); do tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline"; echo; done \
      | grep -cE '(raylet|gcs_server)' || true)"
    echo "$h $(host_ip "$h") host=$state link=${link:-none} ray_processes=$ray"
  done
}

kill_host() {  # every process of the host's PID namespace, and the unshare that holds it; waits for them
  local name="$1" pid ns pids
  pid="$(init_pid "$name")"
  [ -n "$pid" ] || return 0
  ns="$(host_ns "$name")"
  pids="$(ns_pids "$ns")"
  # shellcheck disable=SC2086
  kill -KILL $pids "$pid" 2>/dev/null || true
  while [ -n "$(ns_pids "$ns")" ] || { [ -e "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"; }; do
    sleep 0.1
  done
  rm -f "$LAB/$name/init.pid"
}

down() {
  [ -d "$LAB" ] || { ip link del "$BRIDGE" 2>/dev/null || true; echo "no lab under $LAB"; return 0; }
  local h
  for h in $(all_hosts); do
    kill_host "$h"
    ip netns del "$NS_PREFIX$h" 2>/dev/null || true
  done
  for h in $(all_hosts); do  # the namespaces' links go with them; wait until the kernel has removed them
    while ip netns list | grep -qw "$NS_PREFIX$h"; do sleep 0.1; done
    while ip link show "$(veth_of "$h")" >/dev/null 2>&1; do sleep 0.1; done
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if mountpoint -q "$SHARED"; then umount "$SHARED"; fi
  if [ -f "$LAB/made-mountpoint" ]; then rmdir "$SHARED" 2>/dev/null || true; fi
  # a host's mounts lived in its own mount namespace and ended with it; what is left is plain files
  rm -rf "$LAB"
  rm -f clusters/lab.yaml
  echo "lab down"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  unplug|plug)
    [ -n "${2:-}" ] || die "usage: scripts/lab.sh $1 HOST"
    host_ip "$2" >/dev/null
    ip link set "$(veth_of "$2")" "$([ "$1" = unplug ] && echo down || echo up)"
    ;;
  reset)
    [ -n "${2:-}" ] || die "usage: scripts/lab.sh reset HOST"
    host_ip "$2" >/dev/null
    kill_host "$2"
    start_host "$2"
    echo "host $2 reset: every process killed, booted again (sshd only)"
    ;;
  exec)
    [ -n "${2:-}" ] && [ -n "${3:-}" ] || die "usage: scripts/lab.sh exec HOST COMMAND"
    host_alive "$2" || die "host $2 is not running"
    pids="$(host_pids "$2")"
    pid="${pids%%$'\n'*}"  # any process of the host: they share its namespaces
    shift 2
    exec nsenter --target "$pid" --net --uts --pid --mount -- env HOME="$HOME" bash -lc "$*"
    ;;
  yaml) [ -d "$LAB" ] || die "no lab under $LAB"; write_lab_yaml ;;
  _boot) boot "$2" ;;
  *)
    echo "usage: scripts/lab.sh up|status|down|unplug HOST|plug HOST|reset HOST|exec HOST COMMAND" >&2
    exit 2
    ;;
esac
