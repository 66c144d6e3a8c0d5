#!/usr/bin/env bash
# Build every Go tool the tests use from published Go modules (no container engine, no download site) and print the
# folder holding them:
#   control plane  etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl
#   real node      kubelet, kube-proxy, CoreDNS (only the plugins node/Corefile uses), crictl, and a pause image
#                  (../images/pause.tar) from the Kubernetes module's pause.c
#   chart tests    helm
#
#   BIN=$(hack/cluster/build.sh)
#
# All of them are tools of ONE Go module built by one `go build`, so the libraries they share (k8s.io/api,
# client-go, apiserver, gRPC, protobuf, Prometheus's client) are compiled once, at one version. Built one module
# each, kwok, helm, CoreDNS and crictl compiled their own k8s.io/* versions again, and compiling was most of a cold
# run on 2 cores. Go's minimal version selection gives each library the highest version any tool asks for; the
# Kubernetes staging modules are pinned to this Kubernetes release.
#
# Binaries are cached outside the repository, keyed by the versions below (~/.cache/lorafinetune/tools-<versions>),
# and built only when missing. Cold build on 2 cores: see README ("Tests"); warm: instant.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.37.2}
ETCD_VERSION=${ETCD_VERSION:-3.7.3}
KWOK_VERSION=${KWOK_VERSION:-0.8.0}
COREDNS_VERSION=${COREDNS_VERSION:-1.15.0}
CRICTL_VERSION=${CRICTL_VERSION:-1.37.0}
HELM_VERSION=${HELM_VERSION:-3.21.4}
# CoreDNS with only the plugins hack/cluster/node/Corefile names (a directive missing here fails CoreDNS's start with
# "Unknown directive"): the stock binary links every cloud provider's SDK.
COREDNS_PLUGINS="bind cache errors forward kubernetes"
K8S_CMDS="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"
[ $# = 0 ] || { echo "usage: $0   (builds once, prints the folder of the binaries)" >&2; exit 2; }

VERSIONS="k8s$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION-coredns$COREDNS_VERSION-crictl$CRICTL_VERSION-helm$HELM_VERSION"
ROOT=${LFT_TOOLS_CACHE:-$HOME/.cache/lorafinetune/tools-$VERSIONS}
BIN=$ROOT/bin
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

here=$(cd "$(dirname "$0")" && pwd)
. "$here/node/env.sh"
log() { echo "[tools build] $*" >&2; }
module_info() { go mod download -json "$1" | python3 -c "import json,sys;print(json.load(sys.stdin)['$2'])"; }

tool_packages() {  # every tool's main package at its version, one a line
  local c
  for c in $K8S_CMDS; do echo "k8s.io/kubernetes/cmd/$c@v$K8S_VERSION"; done
  echo "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
  echo "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
  echo "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  echo "sigs.k8s.io/cri-tools/cmd/crictl@v$CRICTL_VERSION"
  echo "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}

# Version stamps the projects' own Makefiles set. helm's: the Kubernetes version `helm template` and `helm lint`
# assume (unstamped it is 1.20, below the chart's kubeVersion).
ldflags() {
  local minor=${K8S_VERSION#1.} pkg
  minor=${minor%%.*}
  local f="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  f="$f -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION"
  f="$f -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
  for pkg in pkg/lint/rules pkg/chartutil; do
    f="$f -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
  done
  echo "$f"
}

build_tools() {
  local mod=$ROOT/src p
  rm -rf "$mod" && mkdir -p "$mod/coredns" && cd "$mod"
  go mod init local/lorafinetune-tools >&2
  sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$(module_info "k8s.io/kubernetes@v$K8S_VERSION" GoMod)" |
    while read -r m; do go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"; done
  # CoreDNS is assembled from plugins: its main package lives in this module.
  {
    echo 'package main'
    echo 'import ('
    echo '	"github.com/coredns/coredns/coremain"'
    for p in $COREDNS_PLUGINS; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ')'
    echo 'func main() { coremain.Run() }'
  } > coredns/main.go
  mapfile -t tools < <(tool_packages)
  go get -tool "${tools[@]}" >&2
  go get "github.com/coredns/coredns@v$COREDNS_VERSION" >&2
  go mod tidy >&2
  local out=$ROOT/bin.new
  rm -rf "$out" && mkdir -p "$out"
  go build -trimpath -ldflags "$(ldflags)" -o "$out/" "${tools[@]%@*}" ./coredns >&2
  mv "$out/server" "$out/etcd"  # the binary of go.etcd.io/etcd/server/v3 is named after "server"
}

# The sandbox ("pause") image of the real node: the Kubernetes module's own pause.c, linked statically, as a
# one-layer FROM-scratch image in a docker-archive tar (no container engine needed).
build_pause() {
  local src out=$ROOT/images
  src=$(module_info "k8s.io/kubernetes@v$K8S_VERSION" Dir)
  mkdir -p "$out"
  gcc -Os -static -Wall -DVERSION="v$K8S_VERSION" -o "$out/pause" "$src/build/pause/linux/pause.c" >&2
  strip "$out/pause"
  python3 "$here/node/mkimage.py" -t "$NODE_PAUSE_IMAGE" --file /pause="$out/pause" --entrypoint /pause \
    --user 65535:65535 -o "$out/pause.tar"
  rm -f "$out/pause"
}

mkdir -p "$ROOT"
# One build at a time per cache (the tests start one in the background while others run): a second caller waits here,
# then finds the binaries built.
exec 9>"$ROOT/.build.lock"
flock 9
start=$(date +%s)
if [ ! -d "$BIN" ]; then
  log "building Kubernetes v$K8S_VERSION, etcd v$ETCD_VERSION, kwok v$KWOK_VERSION, CoreDNS v$COREDNS_VERSION," \
    "crictl v$CRICTL_VERSION, helm v$HELM_VERSION (the long part of a cold run)"
  build_tools
  mv "$ROOT/bin.new" "$BIN"  # complete or absent: an interrupted build is redone
fi
[ -f "$ROOT/images/pause.tar" ] || { log "building the pause image"; build_pause; }
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 5 ] || log "built in ${elapsed}s"
echo "$BIN"
