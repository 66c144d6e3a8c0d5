#!/usr/bin/env bash
# Build (once; cached) a small Debian 12 image with python3 and CA certificates for pods on the real node, as a
# docker-archive tar, and print its path. No registry and no container engine: mmdebstrap makes the root filesystem
# from the Debian mirror, mkimage.py wraps it as a one-layer image. Load it with import-image.sh (containerd) or
# `podman load -i` (to build FROM it).
#
#   TAR=$(hack/cluster/node/base-image.sh)      # image localhost/debian-python:bookworm
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
TAG=${LFT_BASE_IMAGE:-localhost/debian-python:bookworm}
dir=$NODE_CACHE/images
out=$dir/debian-python-bookworm.tar
if [ ! -f "$out" ]; then
  mkdir -p "$dir"
  start=$(date +%s)
  rootfs=$dir/debian-python-bookworm.rootfs.tar
  if [ ! -f "$rootfs" ]; then
    echo "[base-image] mmdebstrap bookworm (python3, ca-certificates)" >&2
    # mmdebstrap picks its output format from the name: keep ".tar" last. nice: it usually runs beside a Go build.
    nice -n 10 mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates bookworm "$dir/partial.rootfs.tar" >&2
    mv "$dir/partial.rootfs.tar" "$rootfs"
  fi
  python3 "$here/mkimage.py" -t "$TAG" --layer "$rootfs" --cmd python3 -o "$out"
  rm -f "$rootfs"
  echo "[base-image] built $out in $(( $(date +%s) - start ))s" >&2
fi
echo "$out"
