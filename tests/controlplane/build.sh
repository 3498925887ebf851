#!/usr/bin/env bash
# Builds the control-plane binaries pinned by the Go modules next to this script (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok, training-operator) into a cache directory outside the
# repository, keyed by the pinned versions, and prints that directory on its last stdout line.
#
#   tests/controlplane/build.sh            # build what is missing (cold: ~35 min on 2 cores), print the dir
#   R1_GRPO_CONTROLPLANE_CACHE=/x build.sh  # cache root (default ~/.cache/r1-grpo/controlplane)
#
# Layout of the printed dir: bin/<binary>, manifests/ (the PyTorchJob CRD and webhook manifests of the
# operator, kwok's default stages and its Logs CRD), versions.txt; cluster.py adds operator-webhook-pki/ there. Progress
# and timings go to stderr. Needs only go (>= 1.26, or GOTOOLCHAIN=auto) and the module proxy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Bump when the build recipe below changes (flags, ldflags, copied files), so old caches are not reused.
recipe=1

# component dir -> "binary=package ..." (packages are `tool` entries of that component's go.mod).
declare -A targets=(
  [etcd]="etcd=go.etcd.io/etcd/server/v3"
  [kubernetes]="kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver
kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler"
  [kwok]="kwok=sigs.k8s.io/kwok/cmd/kwok"
  [training-operator]="training-operator=github.com/kubeflow/training-operator/cmd/training-operator.v1"
)
components=(etcd kubernetes kwok training-operator)
manifests=(kubeflow.org_pytorchjobs.yaml webhook-manifests.yaml kwok-stages.yaml kwok-logs-crd.yaml)

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

key="$(
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
  done
  for m in "${manifests[@]}"; do [[ -s "$dir/manifests/$m" ]] || return 1; done
}

if complete; then
  echo "$dir"
  exit 0
fi

if ! command -v go >/dev/null; then
  echo "tests/controlplane/build.sh: the test control plane is not built yet ($dir) and 'go' is not on" \
    "PATH: install Go >= 1.26 (https://go.dev/dl/), or set R1_GRPO_SKIP_CLUSTER=1 to skip the tests that" \
    "need the cluster" >&2
  exit 3
fi

mkdir -p "$dir/bin" "$dir/manifests"
# Serialise concurrent builders (parallel test workers) of the same key; the loser finds it complete.
exec 9>"$dir/.lock"
flock 9
if complete; then
  echo "$dir"
  exit 0
fi

export CGO_ENABLED=0 # static binaries, as upstream releases them; no C toolchain needed
modcache="$(go env GOMODCACHE)"
mkdir -p "$modcache"
mod_kb_before="$(du -sk "$modcache" | cut -f1)"
t_start=$SECONDS

# Prints the VCS commit of module@version $1 (component $2) when the proxy recorded it, else nothing.
commit_of() {
  local info
  info="$(cd "$here/$2" && go mod download -json "$1" | sed -n 's/.*"Info": "\(.*\)".*/\1/p')"
  sed -n 's/.*"Hash": *"\([0-9a-f]*\)".*/\1/p' "$info" | head -n1
}

for c in "${components[@]}"; do
  t=$SECONDS
  (cd "$here/$c" && go mod download)
  log "$c: modules downloaded in $((SECONDS - t)) s"
done
mod_kb_after="$(du -sk "$modcache" | cut -f1)"
log "module cache $modcache grew by $(((mod_kb_after - mod_kb_before) / 1024)) MiB" \
  "(now $((mod_kb_after / 1024)) MiB)"

k8s_version="$(cd "$here/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
k8s_commit="$(commit_of "k8s.io/kubernetes@$k8s_version" kubernetes)"
k8s_date="$(cd "$here/kubernetes" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
etcd_version="$(cd "$here/etcd" && go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
etcd_commit="$(commit_of "go.etcd.io/etcd/server/v3@$etcd_version" etcd)"
kwok_version="$(cd "$here/kwok" && go list -m -f '{{.Version}}' sigs.k8s.io/kwok)"
to_version="$(cd "$here/training-operator" && go list -m -f '{{.Version}}' github.com/kubeflow/training-operator)"
to_dir="$(cd "$here/training-operator" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)"
kwok_dir="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"

ldflags() {
  case "$1" in
    kubernetes)
      local major="${k8s_version#v}" minor
      minor="${major#*.}"
      major="${major%%.*}"
      minor="${minor%%.*}"
      local x=()
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        x+=("-X $p.gitVersion=$k8s_version" "-X $p.gitMajor=$major" "-X $p.gitMinor=$minor"
          "-X $p.gitTreeState=clean" "-X $p.buildDate=$k8s_date")
        [[ -z "$k8s_commit" ]] || x+=("-X $p.gitCommit=$k8s_commit")
      done
      echo "-s -w ${x[*]}"
      ;;
    etcd) echo "-s -w${etcd_commit:+ -X go.etcd.io/etcd/api/v3/version.GitSHA=${etcd_commit:0:9}}" ;;
    *) echo "-s -w" ;;
  esac
}

for c in "${components[@]}"; do
  for pair in ${targets[$c]}; do
    bin="${pair%%=*}"
    pkg="${pair#*=}"
    [[ -x "$dir/bin/$bin" ]] && continue
    t=$SECONDS
    log "building $bin ($pkg) ..."
    tmp="$dir/bin/.$bin.tmp.$$"
    (cd "$here/$c" && go build -p 2 -trimpath -ldflags="$(ldflags "$c")" -o "$tmp" "$pkg")
    mv -f "$tmp" "$dir/bin/$bin"
    log "built $bin in $((SECONDS - t)) s ($(du -m "$dir/bin/$bin" | cut -f1) MiB)"
  done
done

# The CRD and webhook configuration come from the same training-operator module version as the binary.
install -m 0644 "$to_dir/manifests/base/webhook/manifests.yaml" "$dir/manifests/.webhook.tmp.$$"
mv -f "$dir/manifests/.webhook.tmp.$$" "$dir/manifests/webhook-manifests.yaml"
install -m 0644 "$to_dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$dir/manifests/.crd.tmp.$$"
mv -f "$dir/manifests/.crd.tmp.$$" "$dir/manifests/kubeflow.org_pytorchjobs.yaml"

# kwok's Logs CRD: the launcher installs it so tests can give a fake pod a log (pods/log through kwok).
install -m 0644 "$kwok_dir/kustomize/crd/bases/kwok.x-k8s.io_logs.yaml" "$dir/manifests/.kwok-logs.tmp.$$"
mv -f "$dir/manifests/.kwok-logs.tmp.$$" "$dir/manifests/kwok-logs-crd.yaml"

# kwok itself has no built-in stages: the launcher passes these (kwokctl's default "fast" set: nodes
# become Ready and keep a lease, pods become Running, Job pods complete) with --config.
for f in "$kwok_dir"/kustomize/stage/{node/fast,node/heartbeat-with-lease,pod/fast}/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] && continue
  echo "---"
  cat "$f"
done >"$dir/manifests/.kwok-stages.tmp.$$"
mv -f "$dir/manifests/.kwok-stages.tmp.$$" "$dir/manifests/kwok-stages.yaml"

cat >"$dir/versions.txt" <<EOF
kubernetes $k8s_version $k8s_commit
etcd $etcd_version $etcd_commit
kwok $kwok_version
training-operator $to_version
go $(go env GOVERSION)
EOF
log "done in $((SECONDS - t_start)) s: $dir"
echo "$dir"
