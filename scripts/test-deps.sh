#!/usr/bin/env bash
# System tools the tests start for real, installed from Debian's packages when missing:
#   prometheus                          tests/integration/test_metrics.py scrapes a training run with it
#   containerd runc containernetworking-plugins iptables conntrack
#                                       the real node beside the kwok ones (hack/cluster, LFT_REAL_NODE=1)
#   podman mmdebstrap gcc libc6-dev     the project's image, built FROM a Debian base made here (hack/image)
# go is on the machine image: it builds the control plane, the real node's binaries and helm (hack/cluster/build.sh,
# one module) and the S3 server (hack/s3/build.sh) once, cached by version.
set -euo pipefail
need=()
for pair in prometheus:prometheus containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    iptables:iptables conntrack:conntrack podman:podman mmdebstrap:mmdebstrap gcc:gcc; do
  tool=${pair%%:*} pkg=${pair#*:}
  if [[ $tool == /* ]]; then [ -e "$tool" ] || need+=("$pkg"); else command -v "$tool" >/dev/null || need+=("$pkg"); fi
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing Debian packages the tests use: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" libc6-dev >&2
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "Go is needed to build the test cluster" >&2; exit 1; }
