#!/usr/bin/env bash
# Build a real Kubernetes control plane from published Go modules (no container engine needed) and print the folder
# holding the binaries: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl.
# With --node (or LFT_REAL_NODE=1) also what the real node needs (hack/cluster/node/): kubelet and kube-proxy from the
# same Kubernetes module, CoreDNS (with only the plugins node/Corefile uses), crictl, and a pause image
# (../images/pause.tar) from the module's pause.c.
#
#   BIN=$(hack/cluster/build.sh)          BIN=$(hack/cluster/build.sh --node)
#
# Binaries are cached outside the repository, keyed by version (~/.cache/lorafinetune/cluster-<versions>/bin), and
# built only when missing. Cold build on 2 cores: see README ("Tests"); warm: instant.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.37.2}
ETCD_VERSION=${ETCD_VERSION:-3.7.3}
KWOK_VERSION=${KWOK_VERSION:-0.8.0}
COREDNS_VERSION=${COREDNS_VERSION:-1.15.0}
CRICTL_VERSION=${CRICTL_VERSION:-1.37.0}
NODE=0
[ "${LFT_REAL_NODE:-0}" = 1 ] && NODE=1
for arg; do
  case $arg in
    --node) NODE=1 ;;
    *) echo "usage: $0 [--node]" >&2; exit 2 ;;
  esac
done
ROOT=${LFT_CLUSTER_CACHE:-$HOME/.cache/lorafinetune/cluster-k8s$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION}
BIN=$ROOT/bin
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

here=$(cd "$(dirname "$0")" && pwd)
log() { echo "[cluster build] $*" >&2; }

build_k8s() {  # build_k8s CMD...: add k8s.io/kubernetes/cmd/CMD as tools of one module and build them into $BIN
  local mod=$ROOT/src/k8s
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init local/k8s-binaries >&2
  # k8s.io/kubernetes points its staging modules at ./staging; replace each with its published v0.X.Y twin.
  local modfile
  modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$modfile" |
    while read -r m; do go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"; done
  local cmd pkgs=()
  for cmd; do
    go get -tool "k8s.io/kubernetes/cmd/$cmd@v$K8S_VERSION" >&2
    pkgs+=("k8s.io/kubernetes/cmd/$cmd")
  done
  go mod tidy >&2
  local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  local ldf="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ldf="$ldf -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION"
  go build -trimpath -ldflags "$ldf" -o "$BIN/" "${pkgs[@]}" >&2
}

# The sandbox ("pause") image of the real node: the Kubernetes module's own pause.c, linked statically, as a
# one-layer FROM-scratch image in a docker-archive tar (no container engine needed).
build_pause() {
  local src out=$ROOT/images
  src=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out"
  gcc -Os -static -Wall -DVERSION="v$K8S_VERSION" -o "$out/pause" "$src/build/pause/linux/pause.c" >&2
  strip "$out/pause"
  python3 "$here/node/mkimage.py" -t "$NODE_PAUSE_IMAGE" --file /pause="$out/pause" --entrypoint /pause \
    --user 65535:65535 -o "$out/pause.tar"
  rm -f "$out/pause"
}

# go install of a module without replace lines; a stamp keeps the version, since ROOT is keyed by k8s/etcd/kwok only
go_install() {  # go_install NAME VERSION PACKAGE
  [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ] && return 0
  log "building $1 v$2"
  GOBIN=$BIN go install -trimpath -ldflags "-s -w" "$3@v$2" >&2
  echo "$2" > "$BIN/.$1.version"
}

# CoreDNS with only the plugins hack/cluster/node/Corefile names (a directive missing here fails CoreDNS's start with
# "Unknown directive"): the stock binary links every cloud provider's SDK and took 9 of the node's 14 build minutes.
COREDNS_PLUGINS="bind cache errors forward kubernetes"
build_coredns() {
  local stamp="$COREDNS_VERSION $COREDNS_PLUGINS" mod=$ROOT/src/coredns p
  [ -x "$BIN/coredns" ] && [ "$(cat "$BIN/.coredns.version" 2>/dev/null)" = "$stamp" ] && return 0
  log "building CoreDNS v$COREDNS_VERSION ($COREDNS_PLUGINS)"
  rm -rf "$mod" && mkdir -p "$mod" && cd "$mod"
  {
    echo 'package main'
    echo 'import ('
    echo '	"github.com/coredns/coredns/coremain"'
    for p in $COREDNS_PLUGINS; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ')'
    echo 'func main() { coremain.Run() }'
  } > main.go
  go mod init local/coredns-binary >&2
  go get "github.com/coredns/coredns@v$COREDNS_VERSION" >&2
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/coredns" . >&2
  echo "$stamp" > "$BIN/.coredns.version"
}

build_etcd() {
  local mod=$ROOT/src/etcd
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init local/etcd-binary >&2
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
}

mkdir -p "$BIN"
# One build at a time per cache (the tests start one in the background while others run): a second caller waits here,
# then finds the binaries built.
exec 9>"$ROOT/.build.lock"
flock 9
start=$(date +%s)
[ -x "$BIN/etcd" ] || { log "building etcd v$ETCD_VERSION"; build_etcd; }
[ -x "$BIN/kwokctl" ] || { log "building kwok v$KWOK_VERSION"; GOBIN=$BIN go install "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION" >&2; }
[ -x "$BIN/kubectl" ] || { log "building Kubernetes v$K8S_VERSION (the long part)"; build_k8s kube-apiserver \
  kube-controller-manager kube-scheduler kubectl; }
if [ "$NODE" = 1 ]; then
  . "$here/node/env.sh"
  [ -x "$BIN/kubelet" ] && [ -x "$BIN/kube-proxy" ] || { log "building kubelet, kube-proxy v$K8S_VERSION"; \
    build_k8s kubelet kube-proxy; }
  build_coredns
  go_install crictl "$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl
  [ -f "$ROOT/images/pause.tar" ] || { log "building the pause image"; build_pause; }
fi
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 5 ] || log "built in ${elapsed}s"
echo "$BIN"
