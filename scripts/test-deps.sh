#!/usr/bin/env bash
# System tools the tests start for real, installed when missing:
#   prometheus  (Debian's package; tests/integration/test_metrics.py scrapes a training run with it)
#   go          (on the machine image; builds the control plane, the S3 server and helm once: hack/*/build.sh)
set -euo pipefail
if ! command -v prometheus >/dev/null; then
  echo "installing Debian's prometheus package (tests run a real Prometheus)..." >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "Go is needed to build the test cluster" >&2; exit 1; }
