#!/usr/bin/env bash
# `make image`: builds the CPU image (deploy/docker/Dockerfile.cpu) with buildah, without a
# Docker daemon. The same Dockerfile builds with plain `docker build` elsewhere.
#
#   1. The base. With BASE_IMAGE set (e.g. python:3.11-slim from a registry you can reach),
#      that. Otherwise a Debian bookworm base made here (no registry needed):
#      `debootstrap --variant=minbase` with Python 3.11, its venv module and headers
#      (what python:3.11-slim has), imported with `buildah from scratch` + copy + commit.
#      Made once; REBUILD_BASE=1 makes it again.
#   2. The image, FROM that base, with `--storage-driver vfs --isolation chroot`; the
#      install step gets, read-only and only while it runs:
#        - this machine's CA bundle as the build secret `host-ca` ($HOST_CA, default
#          /etc/ssl/certs/ca-certificates.crt): TLS through a proxy's own authority;
#        - a local folder holding torch's `+cpu` wheel, on /run/wheels, when one exists
#          ($UNIPOOL_TORCH_WHEELS, else pip's configured find-links); otherwise the build
#          downloads it from PyTorch's CPU index ($TORCH_CPU_INDEX). The lock's hash
#          decides either way.
#      Skipped when the image holds a label equal to the hash of its inputs (FORCE=1 builds).
#   3. Clean-up: no working containers, no dangling images (vfs stores every layer in full).
#
# Needs root (debootstrap, buildah's vfs store in /var/lib/containers); installs buildah and
# debootstrap with apt when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/unipool-serve:cpu}
DEBIAN_BASE=localhost/unipool-base:bookworm-py3.11
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
DOCKERFILE=deploy/docker/Dockerfile.cpu
BUILDAH=(buildah --storage-driver vfs)
INPUTS_LABEL=org.unipool-serve.inputs

say() { echo "[image] $*"; }
die() { echo "[image] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap and buildah's vfs store need it"
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
if [ -z "${BASE_IMAGE:-}" ]; then command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap); fi
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# debootstrap mounts /proc in the new root and leaves it mounted when it is interrupted:
# unmount whatever is mounted below the folder before removing it, and never cross into a mount.
remove_rootfs() {
    local mnt
    for mnt in $(awk -v root="$1/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$mnt" || true
    done
    rm -rf --one-file-system "$1" "$1.log"
}

make_debian_base() {
    local rootfs ctr mnt started
    started=$(date +%s)
    rootfs=$(mktemp -d /var/tmp/unipool-base.XXXXXX)
    trap 'remove_rootfs "$rootfs"' EXIT
    say "making $DEBIAN_BASE: debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
    # python3.11-dev: the headers; python:3.11-slim has them, and torch.compile's C++
    # kernels include Python.h.
    if ! debootstrap --variant=minbase --include=python3,python3-venv,python3.11-dev,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR" > "$rootfs.log" 2>&1; then
        cp "$rootfs.log" /var/tmp/unipool-base-debootstrap.log
        tail -20 "$rootfs.log" >&2
        die "debootstrap failed (log: /var/tmp/unipool-base-debootstrap.log; DEBIAN_MIRROR=URL for another mirror)"
    fi
    # debootstrap copies this machine's resolv.conf and hosts in; a container runtime mounts its own.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
           "$rootfs"/etc/resolv.conf "$rootfs"/etc/hosts
    echo localhost > "$rootfs"/etc/hostname
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["python3"]' --label org.opencontainers.image.description="Debian bookworm minbase, Python 3.11" \
        "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$DEBIAN_BASE" >/dev/null
    remove_rootfs "$rootfs"
    trap - EXIT
    say "base made in $(( $(date +%s) - started )) s"
}

# A folder holding torch's +cpu wheel, if this machine has one; nothing otherwise.
local_torch_wheels() {
    local version dir
    version=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' locks/cpu-serve.txt)
    for dir in ${UNIPOOL_TORCH_WHEELS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
        if compgen -G "$dir/torch-$version-*.whl" >/dev/null; then
            echo "$dir"
            return 0
        fi
    done
}

inputs_hash() {
    { cat "$DOCKERFILE" .dockerignore pyproject.toml README.md locks/cpu-serve.txt locks/tools.txt scripts/uv-env.sh
      find model_executor kernels server demo models -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
          ! -path '*.egg-info/*' | LC_ALL=C sort | xargs sha256sum
      echo "${BASE_IMAGE:-$DEBIAN_BASE}"; } | sha256sum | cut -d' ' -f1
}

# The whole run is one function, read in full before it starts: editing this file while a
# build runs cannot change the build.
main() {
    local base hash wheels started seconds size args
    base=${BASE_IMAGE:-$DEBIAN_BASE}
    if [ -z "${BASE_IMAGE:-}" ] && { [ "${REBUILD_BASE:-0}" = 1 ] || ! exists "$DEBIAN_BASE"; }; then
        exists "$DEBIAN_BASE" && "${BUILDAH[@]}" rmi "$DEBIAN_BASE" >/dev/null
        make_debian_base
    fi

    hash=$(inputs_hash)
    if [ "${FORCE:-0}" != 1 ] && exists "$IMAGE" \
            && [ "$("${BUILDAH[@]}" inspect --type image --format "{{index .OCIv1.Config.Labels \"$INPUTS_LABEL\"}}" "$IMAGE")" = "$hash" ]; then
        say "$IMAGE is up to date (FORCE=1 rebuilds)"
        exit 0
    fi

    args=(bud --isolation chroot --format docker --force-rm --layers=false -f "$DOCKERFILE" -t "$IMAGE"
          --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX_URL=$TORCH_CPU_INDEX"
          --label "$INPUTS_LABEL=$hash")
    if [ -f "$HOST_CA" ]; then
        args+=(--secret "id=host-ca,src=$HOST_CA")
    fi
    wheels=$(local_torch_wheels)
    if [ -n "$wheels" ]; then
        say "torch's +cpu wheel from $wheels (mounted read-only on /run/wheels)"
        args+=(--volume "$(realpath "$wheels"):/run/wheels:ro")
    else
        say "torch's +cpu wheel from $TORCH_CPU_INDEX"
    fi

    say "building $IMAGE from $DOCKERFILE, FROM $base"
    started=$(date +%s)
    "${BUILDAH[@]}" "${args[@]}" .
    seconds=$(( $(date +%s) - started ))

    # A rebuild leaves the previous image untagged; vfs keeps every layer in full.
    "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
    size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -n 1)
    say "built $IMAGE in ${seconds} s; size $size; store $(du -sh /var/lib/containers/storage | cut -f1)"
}

main "$@"; exit $?
