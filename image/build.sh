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

# buildah keeps `RUN --mount=type=cache,id=ID` folders in $TMPDIR/buildah-cache-<uid>/ID: point the uv
# cache's id at the machine's uv cache (a link; buildah bind-mounts what it resolves to).
export TMPDIR="${IMAGE_TMPDIR:-/var/tmp/r1-grpo-image}"
cache_parent="$TMPDIR/buildah-cache-$(id -u)"
mkdir -p "$cache_parent"
uv_cache="${UV_CACHE-$(command -v uv >/dev/null && uv cache dir 2>/dev/null || true)}"
if [ -n "$uv_cache" ] && [ -d "$uv_cache" ]; then
    [ -d "$cache_parent/r1-grpo-uv" ] && [ ! -L "$cache_parent/r1-grpo-uv" ] && rm -rf "$cache_parent/r1-grpo-uv"
    ln -sfn "$uv_cache" "$cache_parent/r1-grpo-uv"
    echo "wheel cache: $uv_cache"
fi

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
