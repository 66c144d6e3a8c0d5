#!/usr/bin/env bash
# Start a local Kubernetes control plane (real etcd, kube-apiserver, controller-manager, scheduler; kwok as the
# kubelet of two fake 8-GPU nodes) on 127.0.0.1, install the CRD (unless LFT_APPLY_CRD=0, e.g. for the Helm chart
# to install it), and print the kubeconfig path.
#
# With LFT_REAL_NODE=1, also a real node `lft-node` (label lorafinetune.io/node=real) beside the kwok ones: containerd,
# CNI bridge, kubelet, kube-proxy and CoreDNS (hack/cluster/node/), where pods run as real containers and reach the API
# server in-cluster. Needs root; one per host. Images: hack/cluster/node/import-image.sh $WORK/node/containerd.sock.
#
#   export KUBECONFIG=$(hack/cluster/up.sh)   # then kubectl get nodes; hack/cluster/down.sh to stop
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-lft}
REAL_NODE=${LFT_REAL_NODE:-0}
if [ "$REAL_NODE" = 1 ]; then
  "$here/node/node-up.sh" --check   # refuse before starting anything if a real node already runs on this host
fi
BIN=$("$here/build.sh")
WORK=${LFT_CLUSTER_WORK:-$HOME/.cache/lorafinetune/clusters/$NAME}
mkdir -p "$WORK"
sed "s#BIN_DIR#$BIN#g" "$here/kwok.yaml" > "$WORK/kwok.yaml"
configs=(-c "$WORK/kwok.yaml")
# the real node needs the API server on the bridge too, a certificate for the `kubernetes` Service, and kwok off it
[ "$REAL_NODE" = 1 ] && configs+=(-c "$here/node/kwok-node.yaml")
export PATH="$BIN:$PATH" KWOK_WORKDIR="$WORK/kwok"
KUBECONFIG_FILE="$WORK/kubeconfig"
kwokctl "${configs[@]}" create cluster --name "$NAME" --runtime binary --kubeconfig "$KUBECONFIG_FILE" \
  --wait 180s >&2
kubectl --kubeconfig "$KUBECONFIG_FILE" apply -f "$here/nodes.yaml" >&2
if [ "$REAL_NODE" = 1 ]; then
  "$here/node/node-up.sh" "$WORK" "$KUBECONFIG_FILE" "$BIN" ||
    { echo "[up] the real node did not start; clean up with: LFT_CLUSTER_WORK=$WORK $here/down.sh $NAME" >&2; exit 1; }
fi
if [ "${LFT_APPLY_CRD:-1}" = 1 ]; then
  kubectl --kubeconfig "$KUBECONFIG_FILE" apply --server-side -f "$here/../../crds/" >&2
  kubectl --kubeconfig "$KUBECONFIG_FILE" wait --for=condition=Established crd/lorafinetunes.lorafinetune.io \
    --timeout=60s >&2
fi
echo "$KUBECONFIG_FILE"
