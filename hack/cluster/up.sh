#!/usr/bin/env bash
# Start a local Kubernetes control plane (real etcd, kube-apiserver, controller-manager, scheduler; kwok as the
# kubelet of two fake 8-GPU nodes) on 127.0.0.1, install the CRD (unless LFT_APPLY_CRD=0, e.g. for the Helm chart
# to install it), and print the kubeconfig path.
#
#   export KUBECONFIG=$(hack/cluster/up.sh)   # then kubectl get nodes; hack/cluster/down.sh to stop
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-lft}
BIN=$("$here/build.sh")
WORK=${LFT_CLUSTER_WORK:-$HOME/.cache/lorafinetune/clusters/$NAME}
mkdir -p "$WORK"
sed "s#BIN_DIR#$BIN#g" "$here/kwok.yaml" > "$WORK/kwok.yaml"
export PATH="$BIN:$PATH" KWOK_WORKDIR="$WORK/kwok"
KUBECONFIG_FILE="$WORK/kubeconfig"
kwokctl -c "$WORK/kwok.yaml" create cluster --name "$NAME" --runtime binary --kubeconfig "$KUBECONFIG_FILE" \
  --wait 180s >&2
kubectl --kubeconfig "$KUBECONFIG_FILE" apply -f "$here/nodes.yaml" >&2
if [ "${LFT_APPLY_CRD:-1}" = 1 ]; then
  kubectl --kubeconfig "$KUBECONFIG_FILE" apply --server-side -f "$here/../../crds/" >&2
  kubectl --kubeconfig "$KUBECONFIG_FILE" wait --for=condition=Established crd/lorafinetunes.lorafinetune.io \
    --timeout=60s >&2
fi
echo "$KUBECONFIG_FILE"
