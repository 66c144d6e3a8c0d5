#!/usr/bin/env bash
# Build a real Kubernetes control plane from published Go modules (no container engine needed) and print the folder
# holding the binaries: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl.
#
#   BIN=$(hack/cluster/build.sh)
#
# Binaries are cached outside the repository, keyed by version (~/.cache/lorafinetune/cluster-<versions>/bin), and
# built only when missing. Cold build on 2 cores: see README ("Tests"); warm: instant.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.37.2}
ETCD_VERSION=${ETCD_VERSION:-3.7.3}
KWOK_VERSION=${KWOK_VERSION:-0.8.0}
ROOT=${LFT_CLUSTER_CACHE:-$HOME/.cache/lorafinetune/cluster-k8s$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION}
BIN=$ROOT/bin
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

log() { echo "[cluster build] $*" >&2; }

build_k8s() {
  local mod=$ROOT/src/k8s
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init local/k8s-binaries >&2
  # k8s.io/kubernetes points its staging modules at ./staging; replace each with its published v0.X.Y twin.
  local modfile
  modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$modfile" |
    while read -r m; do go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"; done
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    go get -tool "k8s.io/kubernetes/cmd/$cmd@v$K8S_VERSION" >&2
  done
  go mod tidy >&2
  local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  local ldf="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ldf="$ldf -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION"
  go build -trimpath -ldflags "$ldf" -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >&2
}

build_etcd() {
  local mod=$ROOT/src/etcd
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init local/etcd-binary >&2
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
}

mkdir -p "$BIN"
start=$(date +%s)
[ -x "$BIN/etcd" ] || { log "building etcd v$ETCD_VERSION"; build_etcd; }
[ -x "$BIN/kwokctl" ] || { log "building kwok v$KWOK_VERSION"; GOBIN=$BIN go install "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION" >&2; }
[ -x "$BIN/kubectl" ] || { log "building Kubernetes v$K8S_VERSION (the long part)"; build_k8s; }
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 5 ] || log "built in ${elapsed}s"
echo "$BIN"
