#!/usr/bin/env bash
# Build helm from its Go module (no download site needed), once, and print its path. The chart tests lint, render
# and install charts/lorafinetune with it.  Cold: ~1.5-3 min on 2 cores; warm: instant.
set -euo pipefail
VERSION=${HELM_VERSION:-3.21.4}
BIN=${LFT_HELM_CACHE:-$HOME/.cache/lorafinetune/helm-$VERSION/bin}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
mkdir -p "$BIN"
exec 9>"$BIN/.build.lock"  # one build at a time: a second caller waits, then finds helm built
flock 9
if [ ! -x "$BIN/helm" ]; then
  echo "[helm build] building helm v$VERSION" >&2
  export GOFLAGS=-mod=mod CGO_ENABLED=0
  # helm's Makefile stamps these: its version, and the Kubernetes version `helm template` and `helm lint` assume
  # (that of the client-go it is built with; unstamped it is 1.20, below the chart's kubeVersion).
  modfile=$(go mod download -json "helm.sh/helm/v3@v$VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  minor=$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$modfile")
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$VERSION"
  for pkg in pkg/lint/rules pkg/chartutil; do
    ldflags="$ldflags -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
  done
  GOBIN=$BIN go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@v$VERSION" >&2
fi
echo "$BIN/helm"
