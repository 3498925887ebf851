#!/usr/bin/env bash
# The Dockerfile's public base, `debian:bookworm-slim`, made here from Debian's own packages and stored in
# buildah's local storage under that very name, so `buildah bud --pull=never` builds FROM it without a
# registry. Same recipe as the official image (debuerreotype): the minbase variant of bookworm with
# main from bookworm, bookworm-updates and bookworm-security, documentation, man pages and locales kept out
# by dpkg path-excludes (copyright files kept), apt told to keep no .debs, no translations.
#
#   image/base.sh [NAME]        NAME defaults to docker.io/library/debian:bookworm-slim
#   STORAGE_DRIVER=vfs image/base.sh   (default overlay)
set -euo pipefail
name="${1:-docker.io/library/debian:bookworm-slim}"
driver="${STORAGE_DRIVER:-overlay}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if buildah --storage-driver "$driver" inspect --type image "$name" >/dev/null 2>&1; then
    echo "base image $name: present"
    exit 0
fi
for tool in mmdebstrap buildah; do
    command -v "$tool" >/dev/null || { echo "image/base.sh: $tool missing (apt-get install -y buildah mmdebstrap)" >&2; exit 2; }
done

work="$(mktemp -d "${TMPDIR:-/var/tmp}/r1-grpo-base.XXXXXX")"
ctr=""
cleanup() { [ -n "$ctr" ] && buildah --storage-driver "$driver" rm "$ctr" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT

# The slim image's dpkg excludes (debuerreotype's --slimify list), written into the image so packages
# installed later by the Dockerfile are slimmed the same way.
excludes=(
    '/usr/share/doc/*' '/usr/share/info/*' '/usr/share/linda/*' '/usr/share/lintian/overrides/*'
    '/usr/share/locale/*' '/usr/share/man/*' '/usr/share/groff/*'
)
dpkgopts=()
for path in "${excludes[@]}"; do dpkgopts+=("--dpkgopt=path-exclude=$path"); done
dpkgopts+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")

mmdebstrap --variant=minbase --components=main --format=tar \
    "${dpkgopts[@]}" \
    --aptopt='Acquire::Languages "none"' \
    --aptopt='APT::AutoRemove::SuggestsImportant "false"' \
    --customize-hook='printf "%s\n" "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };" "APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" > "$1/etc/apt/apt.conf.d/docker-clean"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log "$1"/var/log/apt/*' \
    bookworm "$work/rootfs.tar" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main"

ctr="$(buildah --storage-driver "$driver" from scratch)"
buildah --storage-driver "$driver" add "$ctr" "$work/rootfs.tar" /
buildah --storage-driver "$driver" config --cmd bash \
    --label org.opencontainers.image.description="debian:bookworm-slim equivalent, built locally by image/base.sh (mmdebstrap minbase)" \
    "$ctr"
buildah --storage-driver "$driver" commit --rm "$ctr" "$name"
ctr=""
echo "base image $name: built"
