#!/usr/bin/env bash
# Import images into the real node's containerd, in the k8s.io namespace where the kubelet looks, unpacked so the
# first pod starts at once. No registry is involved: pods then use the image by its tag with imagePullPolicy: Never
# (or IfNotPresent). The image store is a persistent cache: an image imported once stays across cluster restarts.
#
#   hack/cluster/node/import-image.sh TARGET IMAGE.tar        a docker-archive (podman save, mkimage.py) or OCI archive
#   hack/cluster/node/import-image.sh TARGET - < IMAGE.tar    the same from stdin (also when no image is named)
#   hack/cluster/node/import-image.sh TARGET localhost/x:tag  an image of the project's podman store, streamed through
#                                                             hack/image/save.sh (podman save); several may be named
#
# TARGET: the containerd socket ($LFT_CLUSTER_WORK/node/containerd.sock of a cluster started with LFT_REAL_NODE=1) or
# the cluster work dir ($LFT_CLUSTER_WORK) itself.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 SOCKET|CLUSTER_WORK [IMAGE.tar|-|IMAGE_REF]..." >&2; exit 2; }
sock=$1; shift
[ -d "$sock" ] && sock=$sock/node/containerd.sock
[ -S "$sock" ] || { echo "import-image: no containerd socket at $sock (is the real node up?)" >&2; exit 1; }
# ctr reports progress on stdout: keep our stdout clean for callers
import() { ctr -a "$sock" -n k8s.io images import --snapshotter overlayfs "$1" >&2; }
[ $# -gt 0 ] || set -- -
for image; do
  if [ "$image" = - ] || [ -f "$image" ]; then
    import "$image"
  else
    # An image reference: skip it when containerd already holds this very image (same podman image id, recorded at
    # the last import into this persistent store), which saves streaming gigabytes on every warm test run.
    id=$(. "$(dirname "$0")/../../image/podman-env.sh" && podman image inspect --format '{{.Id}}' "$image")
    . "$(dirname "$0")/env.sh"
    stamp=$NODE_CONTAINERD_ROOT/.imported/$(echo "$image" | tr '/:' '__')
    if [ "$(cat "$stamp" 2>/dev/null)" = "$id" ] && ctr -a "$sock" -n k8s.io images ls -q | grep -qx "$image"; then
      echo "import-image: $image ($id) is already in containerd" >&2
      continue
    fi
    "$(dirname "$0")/../../image/save.sh" "$image" | import -
    mkdir -p "$(dirname "$stamp")" && echo "$id" > "$stamp"
  fi
done
