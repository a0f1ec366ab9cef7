#!/usr/bin/env bash
# Build Pleura's images without Docker Hub or a Docker engine: a Debian bookworm base made from
# Debian's own packages (mmdebstrap), then docker/Dockerfile built with buildah (chroot isolation,
# the host's network). Run as root from anywhere:
#   docker/build-local.sh              # the cpu image, localhost/pleura:<version>-cpu
#   docker/build-local.sh cpu cuda     # both images
# Settings (environment):
#   TORCH_INDEX_URL      where the cpu image's torch comes from (default: the Dockerfile's, PyTorch's CPU index)
#   PLEURA_CA_BUNDLE     the CA bundle pip trusts in the build (default: this host's)
#   PLEURA_BUILD_CACHE   the base's tarball and the build log (default /var/cache/pleura-build)
#   PLEURA_BASE_MAX_AGE_DAYS  remake the base (security updates) when older (default 7)
# Wheel downloads stay in buildah's cache mount, and unchanged layers are reused, between builds.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 [cpu] [cuda]" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu)
for target in "${targets[@]}"; do
    case "$target" in cpu|cuda) ;; *) echo "build-local: unknown image '$target': use cpu or cuda" >&2; usage ;; esac
done
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "build-local: $tool is missing: apt-get install $tool (./scripts/setup.sh installs it)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "build-local: run as root (buildah's chroot isolation needs it)" >&2; exit 2; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
cache=${PLEURA_BUILD_CACHE:-/var/cache/pleura-build}
ca_bundle=${PLEURA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
base=localhost/pleura-base:bookworm
mkdir -p "$cache"
log() { echo "build-local: $*"; echo "$(date -u +%FT%TZ) $*" >> "$cache/build.log"; }

# --- the base: Debian bookworm (with its updates and security updates), Python 3.11 and venv --------
base_age_days() {
    local created
    created=$(buildah inspect --type image --format '{{.Docker.Created.Unix}}' "$base" 2>/dev/null) || { echo 9999; return; }
    echo $(( ($(date +%s) - created) / 86400 ))
}
if [ "$(base_age_days)" -ge "${PLEURA_BASE_MAX_AGE_DAYS:-7}" ]; then
    start=$SECONDS
    mirror=${PLEURA_DEBIAN_MIRROR:-http://deb.debian.org}
    mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$cache/base-bookworm.tar" \
        "deb $mirror/debian bookworm main" "deb $mirror/debian bookworm-updates main" \
        "deb $mirror/debian-security bookworm-security main"
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$cache/base-bookworm.tar" /
    buildah config --env LANG=C.UTF-8 --cmd python --label org.opencontainers.image.base.name=debian:bookworm "$container"
    buildah commit --quiet --format docker --rm "$container" "$base" >/dev/null
    rm -f "$cache/base-bookworm.tar"
    log "base $base made in $((SECONDS - start)) s"
fi

# --- pip inside the build trusts this host's CA bundle (PyPI through a proxy that re-signs TLS):
#     a pip configuration folder mounted on /etc/xdg/pip for the build only (an empty folder stays).
pip_dir="$cache/pip-config"
mkdir -p "$pip_dir"
cp "$ca_bundle" "$pip_dir/ca-certificates.crt"
printf '[global]\ncert = /etc/xdg/pip/ca-certificates.crt\n' > "$pip_dir/pip.conf"
volumes=(--volume "$pip_dir:/etc/xdg/pip:ro")
build_args=(--build-arg "PYTHON_IMAGE=$base")
if [ -n "${TORCH_INDEX_URL:-}" ]; then build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); fi

for target in "${targets[@]}"; do
    image=localhost/pleura:$version-$target
    start=$SECONDS
    if ! buildah build --layers --format docker --isolation chroot --network host \
            "${volumes[@]}" "${build_args[@]}" --target "$target" --tag "$image" -f docker/Dockerfile . \
            > "$cache/build-$target.log" 2>&1; then
        tail -n 30 "$cache/build-$target.log" >&2
        echo "build-local: building $image failed (whole log: $cache/build-$target.log)" >&2
        exit 1
    fi
    log "$image built in $((SECONDS - start)) s, $(buildah images --format '{{.Size}}' "$image" | head -n 1)"
done
