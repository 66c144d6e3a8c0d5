# Sourced by hack/image/*.sh: podman and buildah with this project's own configuration and image store.
#
#   . hack/image/podman-env.sh      # then plain `podman ...` uses it
#
# Images live under $LFT_PODMAN_DIR (default ~/.cache/lorafinetune/podman/storage), kept between runs so rebuilds
# reuse layers; runtime state goes under /tmp (gone at reboot, as podman expects). Nothing host-global changes.
LFT_PODMAN_DIR=${LFT_PODMAN_DIR:-$HOME/.cache/lorafinetune/podman}
LFT_PODMAN_RUN=${LFT_PODMAN_RUN:-${TMPDIR:-/tmp}/lorafinetune-podman-$(id -u)}
mkdir -p "$LFT_PODMAN_DIR" "$LFT_PODMAN_RUN"
_lft_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for _f in containers.conf storage.conf; do
  # a temporary name of this shell's own: two scripts sourcing this at once (the background image build and the
  # real-node fixture) must not move each other's file away
  sed -e "s|@STATE@|$LFT_PODMAN_DIR|g" -e "s|@RUN@|$LFT_PODMAN_RUN|g" "$_lft_here/$_f.in" >"$LFT_PODMAN_DIR/$_f.new.$$"
  mv "$LFT_PODMAN_DIR/$_f.new.$$" "$LFT_PODMAN_DIR/$_f"
done
unset _f _lft_here
export CONTAINERS_CONF=$LFT_PODMAN_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$LFT_PODMAN_DIR/storage.conf
# podman reads registries.conf and policy.json from /etc/containers; those are only read, never written.
