#!/usr/bin/env bash
# Stop and delete the local cluster started by up.sh; with a real node (LFT_REAL_NODE=1), stop it first and give the
# host back as up.sh found it (hack/cluster/node/node-down.sh). Safe to run twice and after a failed up.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-lft}
BIN=$("$here/build.sh")
WORK=${LFT_CLUSTER_WORK:-$HOME/.cache/lorafinetune/clusters/$NAME}
export PATH="$BIN:$PATH" KWOK_WORKDIR="$WORK/kwok"
# a no-op unless this cluster has (or had) a real node
"$here/node/node-down.sh" "$WORK" "$BIN" || echo "[down] the real node's cleanup reported an error" >&2
kwokctl -c "$WORK/kwok.yaml" delete cluster --name "$NAME" >&2 || true
