#!/usr/bin/env bash
# Builds the job-API controllers of the test control plane (the JobSet controller, the Kubeflow Trainer v2
# controller manager, Kueue), pinned by the Go modules in jobset/, trainer-v2/ and kueue/ next to this
# script, into their own cache directory, and prints that directory on its last stdout line. They are kept
# apart from tests/controlplane/build.sh and its cache (own folder outside tests/controlplane, so neither
# build.sh's key nor CI's cache key of tests/controlplane/** changes; own key: this recipe and these three
# go.mod + go.sum only), so adding or bumping them never rebuilds the Kubernetes binaries, and tests that do
# not use them never wait for them. tests/controlplane/jobcontrollers.py starts them.
#
#   tests/controlplane-jobs/build.sh            # build what is missing, print the dir
#   R1_GRPO_CONTROLPLANE_CACHE=/x build.sh      # cache root (default ~/.cache/r1-grpo/controlplane)
#
# Layout of the printed dir: bin/{jobset-controller,trainer-controller-manager,kueue}, manifests/<component>/
# (CRDs, webhook configurations and, for the Trainer, its runtimes, copied from the same module versions as
# the binaries), versions.txt. Progress and timings go to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Bump when the build recipe below changes (flags, copied files), so old caches are not reused.
recipe=1

declare -A targets=(
  [jobset]="jobset-controller=sigs.k8s.io/jobset"
  [trainer-v2]="trainer-controller-manager=github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
  [kueue]="kueue=sigs.k8s.io/kueue/cmd/kueue"
)
declare -A modpath=(
  [jobset]="sigs.k8s.io/jobset"
  [trainer-v2]="github.com/kubeflow/trainer/v2"
  [kueue]="sigs.k8s.io/kueue"
)
# component -> "dest-subdir=source-dir-in-module ..." (whole folders: a few hundred KiB of YAML).
declare -A copies=(
  [jobset]="crd=config/components/crd webhook=config/components/webhook"
  [trainer-v2]="crds=manifests/base/crds webhook=manifests/base/webhook runtimes=manifests/base/runtimes"
  [kueue]="crd=config/components/crd webhook=config/components/webhook manager=config/components/manager"
)
components=(jobset trainer-v2 kueue)

log() { printf '[controlplane-jobs %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

key="jobs-$(
  {
    echo "recipe=$recipe"
    for c in "${components[@]}"; do cat "$here/$c/go.mod" "$here/$c/go.sum"; done
  } | sha256sum | cut -c1-12
)"
dir="${R1_GRPO_CONTROLPLANE_CACHE:-$HOME/.cache/r1-grpo/controlplane}/$key"

complete() {
  local c pair
  for c in "${components[@]}"; do
    for pair in ${targets[$c]}; do [[ -x "$dir/bin/${pair%%=*}" ]] || return 1; done
    [[ -s "$dir/manifests/$c/.done" ]] || return 1
  done
}

if complete; then
  echo "$dir"
  exit 0
fi

if ! command -v go >/dev/null; then
  echo "tests/controlplane-jobs/build.sh: the job controllers of the test control plane are not built yet" \
    "($dir) and 'go' is not on PATH: install Go >= 1.26 (https://go.dev/dl/), or set R1_GRPO_SKIP_CLUSTER=1" \
    "to skip the tests that need the cluster" >&2
  exit 3
fi

mkdir -p "$dir/bin" "$dir/manifests"
exec 9>"$dir/.lock"
flock 9
if complete; then
  echo "$dir"
  exit 0
fi

export CGO_ENABLED=0
t_start=$SECONDS
for c in "${components[@]}"; do
  t=$SECONDS
  (cd "$here/$c" && go mod download)
  log "$c: modules downloaded in $((SECONDS - t)) s"
done

: >"$dir/.versions.tmp"
for c in "${components[@]}"; do
  version="$(cd "$here/$c" && go list -m -f '{{.Version}}' "${modpath[$c]}")"
  src="$(cd "$here/$c" && go list -m -f '{{.Dir}}' "${modpath[$c]}")"
  echo "$c $version" >>"$dir/.versions.tmp"
  for pair in ${targets[$c]}; do
    bin="${pair%%=*}"
    pkg="${pair#*=}"
    [[ -x "$dir/bin/$bin" ]] && continue
    t=$SECONDS
    log "building $bin ($pkg $version) ..."
    tmp="$dir/bin/.$bin.tmp.$$"
    (cd "$here/$c" && go build -p 2 -trimpath -ldflags="-s -w" -o "$tmp" "$pkg")
    mv -f "$tmp" "$dir/bin/$bin"
    log "built $bin in $((SECONDS - t)) s ($(du -m "$dir/bin/$bin" | cut -f1) MiB)"
  done
  if [[ ! -s "$dir/manifests/$c/.done" ]]; then
    tmp="$dir/manifests/.$c.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for pair in ${copies[$c]}; do
      cp -R "$src/${pair#*=}" "$tmp/${pair%%=*}"
    done
    chmod -R u+w,a+rX "$tmp"
    echo "$c $version" >"$tmp/.done"
    rm -rf "$dir/manifests/$c"
    mv "$tmp" "$dir/manifests/$c"
  fi
done
echo "go $(go env GOVERSION)" >>"$dir/.versions.tmp"
mv -f "$dir/.versions.tmp" "$dir/versions.txt"
log "done in $((SECONDS - t_start)) s: $dir"
echo "$dir"
