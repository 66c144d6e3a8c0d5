#!/usr/bin/env bash
# Write images from this project's podman store (hack/image/build.sh) as one docker-archive to stdout, the format
# containerd imports with no registry in between:
#
#   hack/image/save.sh localhost/lorafinetune:dev | ctr -n k8s.io images import -
#   hack/image/save.sh localhost/lorafinetune:dev localhost/lorafinetune-operator:dev > images.tar
set -euo pipefail
cd "$(dirname "$0")"
. ./podman-env.sh

if [ $# -eq 0 ]; then
  echo "usage: $0 IMAGE... > archive.tar" >&2
  exit 2
fi
if [ -t 1 ]; then
  echo "$0: refusing to write an archive to a terminal; redirect stdout" >&2
  exit 2
fi
multi=()
[ $# -gt 1 ] && multi=(--multi-image-archive)  # several images in one archive (ctr imports them all)
exec podman save --format docker-archive "${multi[@]}" "$@"
