#!/usr/bin/env bash
# Print the folder holding the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, ...), fetched once from the
# Go module proxy into the module cache. The chart test applies the real CRDs so the API server validates the chart's
# ServiceMonitor and PodMonitor against their actual schemas.  Cold: ~30 MB download; warm: instant.
set -euo pipefail
VERSION=${PROMETHEUS_OPERATOR_VERSION:-0.90.1}
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/prometheus-operator/prometheus-operator@v$VERSION" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
echo "$dir/example/prometheus-operator-crd"
