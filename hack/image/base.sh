#!/usr/bin/env bash
# Build (once) a Debian 12 base image with Python 3.11 from Debian packages, for building the project's image where
# no container registry is reachable (the official python image lives on Docker Hub).
#
#   hack/image/base.sh            # prints the image reference, e.g. localhost/lorafinetune-base:bookworm
#   BASE=$(hack/image/base.sh) hack/image/build.sh
#
# mmdebstrap needs only the Debian mirror (and root, or a user namespace); the rootfs goes into this project's own
# podman store (hack/image/podman-env.sh). Skipped when the image exists; FORCE=1 rebuilds it. Cold: about a minute.
set -euo pipefail
cd "$(dirname "$0")"
. ./podman-env.sh

IMAGE=${BASE_IMAGE:-localhost/lorafinetune-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [ "${FORCE:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "$IMAGE"
  exit 0
fi

tar=$LFT_PODMAN_DIR/base-bookworm.tar
rm -f "$tar"
trap 'rm -f "$tar"' EXIT
echo "building $IMAGE with mmdebstrap (Debian bookworm, minbase)..." >&2
# minbase: essential packages + apt only. python3-venv brings ensurepip, so `python3 -m venv` has a pip;
# ca-certificates lets pip in the image reach PyPI where the network needs no private CA.
# The three sources are also written into the image's apt sources (the Dockerfile's builder stage apt-gets).
nice -n 10 mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$tar" \
  "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" >&2
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tar" "$IMAGE" >&2
echo "$IMAGE"
