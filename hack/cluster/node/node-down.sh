#!/usr/bin/env bash
# Stop the real node started by node-up.sh and give the host back as node-up.sh found it (hack/cluster/down.sh calls
# this before deleting the control plane):
#   kubelet stopped first (so it restarts nothing) -> every pod sandbox stopped and removed through the CRI (CNI DEL:
#   veths, IP leases and the bridge plugin's iptables rules go; netns unmounted) -> kube-proxy, CoreDNS, containerd
#   stopped, leftover shims and container processes killed -> kube-proxy --cleanup -> mounts under the work dir,
#   network namespaces, the bridge, KUBE-* and our CNI-* iptables chains, kube-proxy's nfacct counters, the nftables
#   tables iptables-nft created, kubepods cgroups and the directories the daemons created outside the work dir removed
#   -> sysctls put back from what node-up.sh recorded.
#
#   node-down.sh WORK [BIN]
#
# Safe to run twice and after a start that failed midway. No `set -e`: this is best-effort cleanup, every step copes
# with what an earlier (partial) run left or already removed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
[ $# -ge 1 ] || { echo "usage: node-down.sh WORK [BIN]" >&2; exit 2; }
NODE_WORK=$(realpath -m "$1/node")
release() { [ "$(cat "$NODE_CACHE/active" 2>/dev/null)" = "$NODE_WORK" ] && rm -f "$NODE_CACHE/active"; }
[ -d "$NODE_WORK" ] || { release; exit 0; }  # nothing here (a work dir lost to a reboot still held the claim)
[ -n "${2:-}" ] && export PATH="$2:$PATH"
SOCK=$NODE_WORK/containerd.sock
H=$NODE_WORK/host
start=$(date +%s.%N)
since() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
log() { echo "[node-down $(date +%T)] $*" >&2; }

# pid of a daemon we started, only if that process is still ours (its command line names our work dir)
ours() { local pid; pid=$(cat "$NODE_WORK/pids/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -F "$NODE_WORK" >/dev/null && echo "$pid"; }
stop() {  # stop NAME...: TERM all at once, KILL what is left after 10 s
  local name pid pids=()
  for name; do
    pid=$(ours "$name") && { kill -TERM "$pid" 2>/dev/null; pids+=("$pid"); }
    rm -f "$NODE_WORK/pids/$name.pid"
  done
  for _ in $(seq 100); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null && log "killed $pid (did not stop in 10 s)"; done
}
existed() { grep -qxF "$1" "$H/existing-paths" 2>/dev/null; }
if [ ! -f "$H/recorded" ]; then release; exit 0; fi  # node-up.sh stopped before changing the host

log "stopping kubelet"
stop kubelet
if ours containerd >/dev/null && [ -S "$SOCK" ]; then
  log "removing pod sandboxes through the CRI"
  crictl -r "unix://$SOCK" -i "unix://$SOCK" --timeout 60s rmp -fa >/dev/null 2>&1 || log "crictl rmp failed"
  # whatever the CRI did not get to: kill its task (its shim exits with it) and drop the container record, so the
  # persistent metadata store holds no stale containers
  for ns in $(ctr -a "$SOCK" namespaces ls -q 2>/dev/null); do
    for t in $(ctr -a "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
      ctr -a "$SOCK" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; sleep 0.2
      ctr -a "$SOCK" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1
    done
    for c in $(ctr -a "$SOCK" -n "$ns" containers ls -q 2>/dev/null); do
      ctr -a "$SOCK" -n "$ns" containers delete "$c" >/dev/null 2>&1
    done
  done
fi
log "stopping kube-proxy, CoreDNS, containerd"
stop kube-proxy coredns containerd
# shims of this containerd (named by its socket) and any process still in the kubelet's cgroups
for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK( |$)"); do kill -KILL "$pid" 2>/dev/null; done
if ! existed /sys/fs/cgroup/memory/kubepods; then
  for pid in $(find /sys/fs/cgroup/*/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
    kill -KILL "$pid" 2>/dev/null
  done
fi

# kube-proxy's own cleanup mode: its KUBE-* chains in iptables (IPv4 and IPv6), and its IPVS/nftables state if any
command -v kube-proxy >/dev/null && kube-proxy --cleanup --v=0 >> "$NODE_WORK/logs/kube-proxy.log" 2>&1

log "unmounting, deleting netns, bridge, iptables chains, cgroups"
# kubelet volumes, its rshared bind mount of its root dir, containerd's rootfs/shm mounts: deepest first
for _ in 1 2 3; do
  mounts=$(awk -v w="$NODE_WORK/" -v r="$NODE_CONTAINERD_ROOT/" 'index($2, w) == 1 || index($2, r) == 1 {print $2}' \
    /proc/self/mounts | sort -r | uniq)
  [ -z "$mounts" ] && break
  for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done
# network namespaces of sandboxes the CRI could not stop (containerd names them cni-<uuid>)
for ns in $(ls /run/netns 2>/dev/null | grep '^cni-'); do
  grep -qxF "$ns" "$H/netns" 2>/dev/null || ip netns delete "$ns" 2>/dev/null
done
if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
  for veth in $(ip -o link show master "$NODE_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link delete "$veth" 2>/dev/null
  done
  ip link delete "$NODE_BRIDGE"
fi
# KUBE-* chains (the kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT, and what --cleanup missed) and
# the bridge plugin's CNI-* masquerade chains of our network only (podman's stay)
for ipt in iptables ip6tables; do
  command -v "$ipt-save" >/dev/null || continue
  script=$("$ipt-save" 2>/dev/null | python3 "$here/iptables-cleanup.py" "$NODE_CNI_NET")
  [ -n "$script" ] && { echo "$script" | "$ipt-restore" --noflush || log "$ipt cleanup failed"; }
done
# kube-proxy's nfacct counters (metrics of its iptables rules) outlive the rules, even its --cleanup
for c in ct_state_invalid_dropped_pkts localhost_nps_accepted_pkts; do
  grep -qxF "$c" "$H/nfacct" 2>/dev/null || python3 "$here/netfilter.py" nfacct-delete "$c" || log "nfacct $c left"
done
# iptables-nft created the nftables tables (ip filter, ip6 nat, ...) on first use; with their chains and rules gone they
# stay as empty tables: delete those that were not there before, if nothing but empty ACCEPT base chains is left
tables=$(python3 "$here/netfilter.py" tables 2>/dev/null)
while read -r family table; do
  case $table in filter|nat|mangle|raw|security) ;; *) continue ;; esac
  grep -qxF "$family $table" "$H/nft-tables" 2>/dev/null && continue
  ipt=iptables; [ "$family" = ip6 ] && ipt=ip6tables
  # (grep without -q: an early exit would break the pipe and, with pipefail, read as "empty")
  "$ipt-save" -t "$table" 2>/dev/null | grep -E '^(-A |:[^ ]+ (-|DROP) )' >/dev/null && continue
  python3 "$here/netfilter.py" table-delete "$family" "$table" || log "nftables table $family $table left"
done <<< "$tables"
# the kubelet's cgroup tree (cgroupfs driver, cgroup v1: one kubepods directory per controller); rmdir, deepest first
if ! existed /sys/fs/cgroup/memory/kubepods; then
  for d in /sys/fs/cgroup/*/kubepods; do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done
fi
# directories the daemons create outside the work dir (containerd 1.6 hard-codes its shim sockets under
# /run/containerd/s; the kubelet its device-plugin socket and checkpoint under /var/lib/kubelet/device-plugins whatever
# its root dir; netns are bind mounts under a self-bind-mounted /run/netns; libcni caches results under /var/lib/cni;
# the kubelet links container logs from /var/log/containers): remove what we added, and a shared directory only if it
# was not there before and is empty now (podman may use /run/netns and /var/lib/cni meanwhile)
existed /run/containerd || rm -rf /run/containerd
existed /var/lib/kubelet || rm -rf /var/lib/kubelet
# (results of sandboxes torn down without a CNI DEL: ours by network name, and the loopback ones of the same sandboxes)
for f in /var/lib/cni/results/"$NODE_CNI_NET"-*; do
  [ -e "$f" ] || continue
  id=${f#/var/lib/cni/results/"$NODE_CNI_NET"-}; id=${id%-*}
  rm -f "$f" "/var/lib/cni/results/cni-loopback-$id-lo"
done
existed /var/lib/cni || find /var/lib/cni -depth -type d -empty -delete 2>/dev/null
for l in /var/log/containers/*.log; do
  [ -L "$l" ] && case $(readlink "$l") in "$NODE_WORK"/*) rm -f "$l" ;; esac
done
existed /var/log/containers || rmdir /var/log/containers 2>/dev/null
if ! existed /run/netns && [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
  while mountpoint -q /run/netns; do umount /run/netns || break; done
  rmdir /run/netns
fi

# sysctls: the kubelet's kernel tunables, ip_forward from the CNI bridge plugin, anything kube-proxy touched
[ -f "$H/sysctl.conf" ] && sysctl -q -p "$H/sysctl.conf"

left=$(awk -v w="$NODE_WORK/" 'index($2, w) == 1' /proc/self/mounts | wc -l)
if [ "$left" -eq 0 ]; then
  # keep the logs; drop state, records and the claim on the host
  find "$NODE_WORK" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  release
  log "node stopped and host restored in $(since)s"
else
  log "warning: $left mounts left under $NODE_WORK; kept its state (run down.sh again)"
fi
