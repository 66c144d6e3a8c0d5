#!/usr/bin/env bash
# Build the project's images with podman (no Docker engine needed) and print their references, one a line, last:
#
#   hack/image/build.sh                                  # trainer + operator, FROM the official python image
#   BASE=localhost/lorafinetune-base:bookworm hack/image/build.sh    # FROM a Debian-made base (no registry needed;
#                                                        # hack/image/base.sh makes it, and is run here if missing)
#   hack/image/save.sh IMAGE... > images.tar             # docker-archive for `ctr -n k8s.io images import`
#
# Knobs (environment):
#   BASE            base image (default docker.io/library/python:3.11.14-slim-bookworm, which needs Docker Hub)
#   IMAGE           trainer image, which also runs the operator (default localhost/lorafinetune:dev)
#   OPERATOR_IMAGE  slim operator image (default: IMAGE's name + "-operator", same tag)
#   TARGETS         which to build, in order (default "operator trainer")
#   PIP_CA          CA bundle pip trusts for PyPI (default: $PIP_CERT, else /etc/ssl/certs/ca-certificates.crt);
#                   handed in as a build secret, never stored in the image
#   CPU_MARCH       x86-64 level DeepSpeed's CPU ops are compiled for (default x86-64-v3, AVX2)
#   NICE            niceness of the build (default 10: the machine is shared with other builds)
#
# podman runs with this project's own configuration and image store (podman-env.sh: ~/.cache/lorafinetune/podman),
# so the host's container settings are neither needed nor changed. RUN steps use the host's network (no bridge).
# The host's pip cache (~/.cache/pip) is mounted into the pip steps when it exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
. hack/image/podman-env.sh
# One build at a time per image store (the tests start one in the background while others run): a second caller waits
# here and then reuses every layer. Under the lock, any working container in this private store is a leftover of an
# interrupted build (they hold gigabytes): remove them.
exec 9>"$LFT_PODMAN_DIR/build.lock"
flock 9
podman ps --all --external --quiet | xargs -r podman rm --force >/dev/null

BASE=${BASE:-docker.io/library/python:3.11.14-slim-bookworm}
IMAGE=${IMAGE:-localhost/lorafinetune:dev}
if [[ ${IMAGE##*/} == *:* ]]; then name=${IMAGE%:*} tag=${IMAGE##*:}; else name=$IMAGE tag=latest; fi
OPERATOR_IMAGE=${OPERATOR_IMAGE:-$name-operator:$tag}
TARGETS=${TARGETS:-operator trainer}
PIP_CA=${PIP_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}

# The Debian-made base is ours to build: do it on first use. Any other base is pulled once, with a hint where no
# registry answers (these machines reach PyPI and Debian, not Docker Hub).
if [[ $BASE == localhost/lorafinetune-base:* ]] && ! podman image exists "$BASE"; then
  BASE_IMAGE=$BASE hack/image/base.sh >/dev/null
elif ! podman image exists "$BASE" && ! podman pull "$BASE" >&2; then
  echo "cannot pull $BASE; without a registry, build FROM a base made from Debian packages:" >&2
  echo "  BASE=localhost/lorafinetune-base:bookworm $0" >&2
  exit 1
fi

args=(--layers --network host --build-arg "BASE=$BASE" --build-arg "CPU_MARCH=${CPU_MARCH:-x86-64-v3}")
if [ -f "$PIP_CA" ]; then
  # The bundle is a build secret (mounted only into the RUN steps that name it) and PIP_CERT says where it is.
  args+=(--secret "id=pip-ca,src=$PIP_CA" --build-arg PIP_CERT=/run/secrets/pip-ca)
fi
if [ -d "$HOME/.cache/pip" ]; then
  # Reuse what the project's own venv left there (scripts/env.sh); a volume is not part of any layer. The Dockerfile
  # turns pip's cache off when nothing is mounted there.
  args+=(--volume "$HOME/.cache/pip:/root/.cache/pip")
fi

built=()
iid=$(mktemp)  # podman writes the image id here only once the image is committed
trap 'rm -f "$iid"' EXIT
for target in $TARGETS; do
  case $target in
    operator) ref=$OPERATOR_IMAGE ;;
    trainer) ref=$IMAGE ;;
    *) echo "unknown target: $target (operator, trainer)" >&2; exit 2 ;;
  esac
  echo "building $ref (target $target, FROM $BASE)..." >&2
  : >"$iid"
  nice -n "${NICE:-10}" podman build "${args[@]}" --iidfile "$iid" --target "$target" --tag "$ref" --file Dockerfile . >&2
  # A podman build stopped by a signal can exit 0 without an image: print only what was really built.
  [ -s "$iid" ] || { echo "podman build of $ref ended without an image" >&2; exit 1; }
  built+=("$ref")
done
printf '%s\n' "${built[@]}"
