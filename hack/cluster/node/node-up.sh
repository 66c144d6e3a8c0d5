#!/usr/bin/env bash
# Start the real node `lft-node` beside a running kwokctl control plane (hack/cluster/up.sh calls this when
# LFT_REAL_NODE=1): containerd (Debian package) + CNI bridge + kubelet + kube-proxy (iptables) + CoreDNS, so pods run
# as real containers, reach each other, cluster DNS, ClusterIP Services and the API server in-cluster.
#
#   node-up.sh --check                  refuse (exit 1) if a real node is already up on this host
#   node-up.sh WORK KUBECONFIG BIN      start it; everything per-cluster goes under WORK/node
#
# Prints nothing on stdout. The containerd socket is WORK/node/containerd.sock (see import-image.sh). Only one real
# node per host: its bridge, addresses, cgroups and containerd image store ($NODE_CACHE) are host-wide. Every host
# change is recorded first and undone by node-down.sh (also after a failed start).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
log() { echo "[node-up $(date +%T)] $*" >&2; }
die() { echo "[node-up] error: $*" >&2; exit 1; }

claim_alive() {  # is any process recorded by the node in work dir $1 still running (with that dir in its command)?
  local f pid
  for f in "$1"/pids/*.pid; do
    pid=$(cat "$f" 2>/dev/null) || continue
    [ -n "$pid" ] && { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$1" && return 0
  done
  return 1
}

check() {
  [ "$(id -u)" = 0 ] || die "the real node needs root (bridge, iptables, mounts, cgroups)"
  local owner=""
  [ -f "$NODE_CACHE/active" ] && owner=$(cat "$NODE_CACHE/active")
  if [ -z "$owner" ] && ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    die "bridge $NODE_BRIDGE exists but no real node claims it (see $NODE_CACHE/active): another real node may be up
  from another checkout; if not, remove it with: ip link delete $NODE_BRIDGE"
  fi
  if [ -n "$owner" ] && ! claim_alive "$owner"; then
    # A run that was killed (a stopped CI job, a crashed test session) never got to node-down.sh: nothing of that
    # node runs any more, so give the host back now instead of refusing every later run.
    log "a real node was left behind by a run that did not stop it ($owner; none of its processes runs): cleaning up"
    "$here/node-down.sh" "${owner%/node}" "$("$here/../build.sh")" >&2 ||
      die "could not clean up the real node left in $owner"
    owner=""
    [ -f "$NODE_CACHE/active" ] && owner=$(cat "$NODE_CACHE/active")
  fi
  if [ -n "$owner" ]; then
    local work=${owner%/node} name
    name=$(ls "$work/kwok/clusters" 2>/dev/null | head -1)
    die "a real node is already up on this host (bridge $NODE_BRIDGE, work dir ${owner:-unknown}); only one can run.
  Stop it first: LFT_CLUSTER_WORK=$work hack/cluster/down.sh ${name:-NAME}"
  fi
  for c in containerd runc ctr iptables iptables-save iptables-restore ip envsubst; do
    command -v "$c" >/dev/null || die "missing $c (apt-get install containerd runc iptables iproute2 gettext-base)"
  done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || die "missing CNI plugins (apt-get install containernetworking-plugins)"
}

if [ "${1:-}" = --check ]; then check; exit 0; fi
[ $# -eq 3 ] || die "usage: node-up.sh --check | node-up.sh WORK KUBECONFIG BIN"
WORK=$(cd "$1" && pwd) KUBECONFIG_FILE=$(realpath "$2") BIN=$(realpath "$3")
check
NODE_WORK=$WORK/node
SOCK=$NODE_WORK/containerd.sock
# a unix socket path holds at most 107 bytes (containerd adds ".ttrpc")
[ ${#SOCK} -le 100 ] || die "work dir too deep for containerd's socket path ($SOCK): use a shorter LFT_CLUSTER_WORK"
export PATH="$BIN:$PATH" KUBECONFIG=$KUBECONFIG_FILE
export NODE_WORK NODE_CONTAINERD_ROOT NODE_PAUSE_IMAGE NODE_CNI_NET NODE_BRIDGE NODE_POD_CIDR NODE_GW NODE_NAME \
  NODE_KUBELET_PORT KUBECONFIG_FILE
for b in kubelet kube-proxy coredns crictl; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing: build with hack/cluster/build.sh --node"
done
start=$(date +%s.%N)
since() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
mkdir -p "$NODE_WORK"/{host,pids,logs,containerd,cni/net.d,cni/ipam,kubelet/root,kubelet/pki,kube-proxy,coredns} \
  "$NODE_CONTAINERD_ROOT"
# claim the host before changing anything, so node-down.sh knows whom it belongs to
echo "$NODE_WORK" > "$NODE_CACHE/active"

# --- record the host as found (once per work dir: a second run must not record our own changes) -------------------
H=$NODE_WORK/host
if [ ! -f "$H/recorded" ]; then
  for s in $NODE_SYSCTLS; do v=$(sysctl -n "$s" 2>/dev/null) && echo "$s = $v"; done > "$H/sysctl.conf"
  for d in /run/containerd /run/netns /var/lib/cni /var/lib/kubelet /var/log/containers \
      /sys/fs/cgroup/memory/kubepods; do
    [ -e "$d" ] && echo "$d"; done > "$H/existing-paths"
  ls /run/netns 2>/dev/null > "$H/netns" || true
  python3 "$here/netfilter.py" nfacct-list > "$H/nfacct" || true
  python3 "$here/netfilter.py" tables > "$H/nft-tables" || true
  touch "$H/recorded"
fi

# --- network: the bridge exists before anything starts, so the kubelet (node IP), CoreDNS and the API server's
# advertised address are all reachable at the gateway before the first pod (the CNI bridge plugin adopts it) ---------
ip link add "$NODE_BRIDGE" type bridge
ip addr add "$NODE_GW/${NODE_POD_CIDR#*/}" dev "$NODE_BRIDGE"
ip link set "$NODE_BRIDGE" up
render() { envsubst "$(printf '${%s} ' NODE_WORK NODE_CONTAINERD_ROOT NODE_PAUSE_IMAGE NODE_CNI_NET NODE_BRIDGE \
  NODE_POD_CIDR NODE_GW NODE_NAME NODE_KUBELET_PORT KUBECONFIG_FILE)" < "$here/$1" > "$2"; }
render containerd.toml "$NODE_WORK/containerd/config.toml"
render cni.conflist "$NODE_WORK/cni/net.d/10-lft.conflist"
render kubelet.yaml "$NODE_WORK/kubelet/config.yaml"
render kube-proxy.yaml "$NODE_WORK/kube-proxy/config.yaml"
render Corefile "$NODE_WORK/coredns/Corefile"

# Each daemon in its own session (setsid), stdio away from our caller (up.sh's stdout is usually a pipe), pid recorded.
spawn() { local name=$1; shift
  setsid "$@" < /dev/null >> "$NODE_WORK/logs/$name.log" 2>&1 &
  echo $! > "$NODE_WORK/pids/$name.pid"
}
alive() { [ -f "$NODE_WORK/pids/$1.pid" ] && kill -0 "$(cat "$NODE_WORK/pids/$1.pid")" 2>/dev/null; }
wait_for() { local what=$1 tries=$2 d; shift 2
  for _ in $(seq "$tries"); do
    "$@" >/dev/null 2>&1 && return 0
    for d in $(ls "$NODE_WORK/pids"); do  # fail fast when a daemon died
      alive "${d%.pid}" || die "${d%.pid} exited; see $NODE_WORK/logs/${d%.pid}.log"
    done
    sleep 0.5
  done
  die "$what not ready; see $NODE_WORK/logs/"
}

log "containerd (image store $NODE_CONTAINERD_ROOT)"
spawn containerd containerd -c "$NODE_WORK/containerd/config.toml"
wait_for containerd 60 ctr -a "$SOCK" version
crictl_() { crictl -r "unix://$SOCK" -i "unix://$SOCK" --timeout 30s "$@"; }
# sandboxes of an earlier run that was never stopped are still in the persistent metadata store: drop them
[ -z "$(crictl_ pods -q 2>/dev/null)" ] || crictl_ rmp -fa >&2 || true
# (grep without -q: an early exit would break ctr's pipe and, with pipefail, read as "missing")
if ! ctr -a "$SOCK" -n k8s.io images ls -q | grep -x "$NODE_PAUSE_IMAGE" >/dev/null; then
  "$here/import-image.sh" "$SOCK" "$(dirname "$BIN")/images/pause.tar" >&2
fi

log "kubelet"
spawn kubelet kubelet --config="$NODE_WORK/kubelet/config.yaml" --kubeconfig="$KUBECONFIG_FILE" \
  --root-dir="$NODE_WORK/kubelet/root" --cert-dir="$NODE_WORK/kubelet/pki" --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_GW" --node-labels=lorafinetune.io/node=real --v=2
log "kube-proxy"
spawn kube-proxy kube-proxy --config="$NODE_WORK/kube-proxy/config.yaml" --v=2
log "CoreDNS on $NODE_GW:53"
spawn coredns coredns -conf "$NODE_WORK/coredns/Corefile"

node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ] &&
    [ -z "$(kubectl get node "$NODE_NAME" -o 'jsonpath={.spec.taints}')" ]
}
wait_for "node $NODE_NAME (Ready, untainted)" 240 node_ready
# The kubelet wrote its preferred kernel tunables at start (vm.overcommit_memory=1, kernel.panic=10,
# kernel.panic_on_oops=1, ...) and does not look at them again: give the host its own values back now.
grep -E '^(vm|kernel)\.' "$H/sysctl.conf" > "$H/sysctl-kernel.conf"; sysctl -q -p "$H/sysctl-kernel.conf" || true
# pods are refused until their namespace's ServiceAccount exists; kube-proxy has synced once its healthz answers
wait_for "default ServiceAccount" 120 kubectl get serviceaccount default
wait_for kube-proxy 120 python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:10256/healthz', timeout=2)"
for d in containerd kubelet kube-proxy coredns; do alive $d || die "$d exited; see $NODE_WORK/logs/$d.log"; done
log "node $NODE_NAME Ready in $(since)s (containerd socket $SOCK)"
