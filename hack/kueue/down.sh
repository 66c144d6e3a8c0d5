#!/usr/bin/env bash
# Stop the Kueue that hack/kueue/up.sh started. Its webhook configurations go first: left registered with no server
# behind them, they make every Job create in the cluster fail. Kueue's CRDs and objects stay (their finalizers need
# the manager). Safe to run twice.
set -euo pipefail
: "${KUBECONFIG:?set KUBECONFIG to the kubeconfig of the cluster}"
WORK=${LFT_KUEUE_WORK:?set LFT_KUEUE_WORK to the folder up.sh used}
export KUBECONFIG
kubectl delete mutatingwebhookconfiguration kueue-mutating-webhook-configuration --ignore-not-found >&2 || true
kubectl delete validatingwebhookconfiguration kueue-validating-webhook-configuration --ignore-not-found >&2 || true
if [ -f "$WORK/kueue.pid" ]; then
  pid=$(cat "$WORK/kueue.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$WORK/kueue.pid"
fi
# /etc/kueue only if it is the link up.sh made into this work folder
if [ -L /etc/kueue ] && [ "$(readlink /etc/kueue)" = "$WORK/etc" ]; then rm -f /etc/kueue; fi
