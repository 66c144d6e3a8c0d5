#!/usr/bin/env bash
# Build the Versity S3 gateway (Apache-2.0, a real S3-compatible server) from Go modules, once, and print its path.
# Tests run it on 127.0.0.1 with the posix backend.  Cold: ~1-2 min on 2 cores; warm: instant.
set -euo pipefail
VERSION=${VERSITYGW_VERSION:-1.8.0}
BIN=${LFT_S3_CACHE:-$HOME/.cache/lorafinetune/versitygw-$VERSION/bin}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
if [ ! -x "$BIN/versitygw" ]; then
  echo "[s3 build] building versitygw v$VERSION" >&2
  mkdir -p "$BIN"
  GOBIN=$BIN CGO_ENABLED=0 GOFLAGS=-mod=mod go install "github.com/versity/versitygw/cmd/versitygw@v$VERSION" >&2
fi
echo "$BIN/versitygw"
