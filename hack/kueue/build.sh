#!/usr/bin/env bash
# Build Kueue's manager from the Go module proxy, once, and print the folder holding it (`kueue-manager`) and the
# module's source (for its CRDs and webhook manifests) as two lines:
#
#   { read -r KUEUE_BIN; read -r KUEUE_SRC; } < <(hack/kueue/build.sh)
#
# Its own module, not one more tool of hack/cluster/build.sh: Kueue builds against controller-runtime and the k8s.io
# 0.36 libraries, and putting it beside the 1.37.2 tools would move the versions they share (and their cache key).
# Cached by version in ~/.cache/lorafinetune/kueue-<version>. Cold: ~3.3 min on 2 cores; warm: instant.
set -euo pipefail
KUEUE_VERSION=${KUEUE_VERSION:-0.19.2}
ROOT=${LFT_KUEUE_CACHE:-$HOME/.cache/lorafinetune/kueue-$KUEUE_VERSION}
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
mkdir -p "$ROOT"
exec 9>"$ROOT/.build.lock"
flock 9  # the tests may start this in the background; a second caller waits, then finds it built
if [ ! -x "$ROOT/bin/kueue-manager" ]; then
  echo "[kueue build] building Kueue v$KUEUE_VERSION" >&2
  start=$(date +%s)
  rm -rf "$ROOT/src" && mkdir -p "$ROOT/src" && cd "$ROOT/src"
  go mod init local/lorafinetune-kueue >&2
  go get -tool "sigs.k8s.io/kueue/cmd/kueue@v$KUEUE_VERSION" >&2
  v=sigs.k8s.io/kueue/pkg/version
  go build -trimpath -ldflags "-s -w -X $v.GitVersion=v$KUEUE_VERSION -X $v.GitCommit=go-module-proxy" \
    -o "$ROOT/bin.new/kueue-manager" sigs.k8s.io/kueue/cmd/kueue >&2
  rm -rf "$ROOT/bin" && mv "$ROOT/bin.new" "$ROOT/bin"  # complete or absent
  echo "[kueue build] built in $(( $(date +%s) - start ))s" >&2
fi
echo "$ROOT/bin"
cd "$ROOT/src" && go mod download -json "sigs.k8s.io/kueue@v$KUEUE_VERSION" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
