#!/usr/bin/env bash
# Stop and delete the local cluster started by up.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-lft}
BIN=$("$here/build.sh")
WORK=${LFT_CLUSTER_WORK:-$HOME/.cache/lorafinetune/clusters/$NAME}
export PATH="$BIN:$PATH" KWOK_WORKDIR="$WORK/kwok"
kwokctl -c "$WORK/kwok.yaml" delete cluster --name "$NAME" >&2 || true
