#!/usr/bin/env bash
# Start Kueue (its manager as a host process, real CRDs and webhooks) on the local control plane of
# hack/cluster/up.sh, and print the manager's PID once its controllers run. Stop it with hack/kueue/down.sh.
#
#   KUBECONFIG=$(hack/cluster/up.sh) LFT_KUEUE_WORK=/tmp/kueue hack/kueue/up.sh
#
# The API server calls Kueue's webhooks on https://127.0.0.1:9443 with a CA made here. Needs kubectl on PATH
# (hack/cluster/build.sh's folder), openssl, curl, and a Python with PyYAML ($PYTHON, default python3). Kueue reads
# its metrics certificate from /etc/kueue/metrics/certs, a path it hard-codes: up.sh links /etc/kueue to the work
# folder if nothing is there, and down.sh removes that link (and nothing else).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${KUBECONFIG:?set KUBECONFIG to the kubeconfig of the cluster}"
WORK=${LFT_KUEUE_WORK:?set LFT_KUEUE_WORK to a work folder}
PYTHON=${PYTHON:-python3}
export KUBECONFIG
{ read -r KUEUE_BIN; read -r KUEUE_SRC; } < <("$here/build.sh")
certificates() {  # a CA, and a serving certificate for 127.0.0.1 signed by it
  local d=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=lorafinetune-test-kueue-ca -keyout "$d/ca.key" \
    -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$d/tls.key" -out "$d/tls.csr" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > "$d/ext.cnf"
  openssl x509 -req -in "$d/tls.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/ext.cnf" -out "$d/tls.crt" 2>/dev/null
}
mkdir -p "$WORK/certs"
[ -f "$WORK/certs/tls.crt" ] || certificates "$WORK/certs"
"$PYTHON" "$here/webhooks.py" "$KUEUE_SRC" "$WORK/certs/ca.crt" https://127.0.0.1:9443 "$WORK"
kubectl apply --server-side --force-conflicts -f "$KUEUE_SRC/config/components/crd/bases/" >&2
for patch in "$WORK"/conversion/*.yaml; do
  kubectl patch crd "$(basename "$patch" .yaml).kueue.x-k8s.io" --type=merge --patch-file "$patch" >&2
done
kubectl wait --for=condition=Established -f "$KUEUE_SRC/config/components/crd/bases/" --timeout=60s >/dev/null
kubectl create namespace kueue-system --dry-run=client -o yaml | kubectl apply -f - >&2
kubectl apply --server-side --force-conflicts -f "$WORK/webhooks.yaml" >&2
if [ ! -e /etc/kueue ]; then
  mkdir -p "$WORK/etc/metrics" && ln -sfn "$WORK/certs" "$WORK/etc/metrics/certs" && ln -s "$WORK/etc" /etc/kueue
fi
sed "s#CERT_DIR#$WORK/certs#" "$here/config.yaml" > "$WORK/config.yaml"
# VisibilityOnDemand off: its API server would need certificates at another hard-coded path and an APIService.
setsid "$KUEUE_BIN/kueue-manager" --config "$WORK/config.yaml" --kubeconfig "$KUBECONFIG" \
  --feature-gates=VisibilityOnDemand=false > "$WORK/kueue.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$WORK/kueue.pid"
for _ in $(seq 1 120); do
  if curl -fsS http://127.0.0.1:8081/readyz >/dev/null 2>&1; then echo "$pid"; exit 0; fi
  kill -0 "$pid" 2>/dev/null || { echo "[kueue] the manager exited; see $WORK/kueue.log" >&2; exit 1; }
  sleep 0.5
done
echo "[kueue] not ready after 60 s; see $WORK/kueue.log" >&2
exit 1
