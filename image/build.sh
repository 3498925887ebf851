#!/usr/bin/env bash
# `make image`: the Dockerfile built with buildah (no Docker engine, no registry), FROM the local
# debian:bookworm-slim that image/base.sh makes. Same recipe as users' CI builds with docker buildx.
#
#   image/build.sh [TAG]            TAG defaults to localhost/r1-grpo:dev
# Environment: STORAGE_DRIVER (overlay; vfs where overlay cannot mount), FLASH_ATTN_INSTALL (none here:
# the prebuilt wheel is a GitHub release download), UV_CACHE (a uv cache folder to serve as the build's
# wheel cache, default: this machine's own `uv cache dir` if there is one, so torch's ~2.5 GB of CUDA
# wheels are not downloaded again), BUILD_ARGS (more --build-arg options).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-localhost/r1-grpo:dev}"
driver="${STORAGE_DRIVER:-overlay}"

bash image/base.sh

# buildah keeps `RUN --mount=type=cache,id=ID` folders in $TMPDIR/buildah-cache/ID (1.28;
# buildah-cache-<uid> in later releases). Where the build has no cache of its own yet, the uv cache's id
# is pointed at the machine's uv cache (a link; buildah bind-mounts what it resolves to); an existing
# folder there is the build's own cache from earlier builds and is kept.
export TMPDIR="${IMAGE_TMPDIR:-/var/tmp/r1-grpo-image}"
uv_cache="${UV_CACHE-$(command -v uv >/dev/null && uv cache dir 2>/dev/null || true)}"
for cache_parent in "$TMPDIR/buildah-cache" "$TMPDIR/buildah-cache-$(id -u)"; do
    mkdir -p "$cache_parent"
    if [ -n "$uv_cache" ] && [ -d "$uv_cache" ] && [ ! -e "$cache_parent/r1-grpo-uv" ]; then
        ln -s "$uv_cache" "$cache_parent/r1-grpo-uv"
    fi
    if [ -e "$cache_parent/r1-grpo-uv" ]; then
        echo "wheel cache $cache_parent/r1-grpo-uv -> $(readlink -f "$cache_parent/r1-grpo-uv")"
    fi
done

# --format docker: the OCI format has no SHELL, and buildah would run the RUN steps with /bin/sh instead
# of the Dockerfile's bash -o pipefail.
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
# shellcheck disable=SC2086
buildah --storage-driver "$driver" bud \
    --isolation chroot --pull=never --layers --format docker \
    --build-arg FLASH_ATTN_INSTALL="${FLASH_ATTN_INSTALL:-none}" \
    --build-arg VERSION="$version" \
    --build-arg VCS_REF="$revision" \
    --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --build-arg SOURCE_URL="$(git remote get-url origin 2>/dev/null || echo unknown)" \
    --secret id=build-ca,src="${BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}" \
    ${BUILD_ARGS:-} \
    --tag "$tag" .
buildah --storage-driver "$driver" images --format '{{.Name}}:{{.Tag}} {{.ID}} {{.Size}}' "$tag"
