#!/usr/bin/env bash
# `make test`'s pytest run. On a machine without the control plane's caches, its two Go builds
# (tests/controlplane/build.sh, then tests/controlplane-jobs/build.sh; ~1 h of CPU on 2 cores) run in the
# background at low priority while pytest runs the tests that need no cluster first (tests/conftest.py
# orders the suite: no cluster, the cluster, the job-API controllers). A test that needs a build calls that
# build.sh, which waits on the background build's lock and then finds it complete, so only the cluster
# tests wait, and only for what is still building. Cached builds return at once and nothing changes.
#
#   tests/run_suite.sh PYTEST [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${R1_GRPO_SKIP_CLUSTER:-}" == 1 ]]; then
  echo "R1_GRPO_SKIP_CLUSTER=1: the test control plane is not built and the tests that need it are skipped"
  exec "$@"
fi

log="$(mktemp "${TMPDIR:-/tmp}/r1-grpo-controlplane-build.XXXXXX")"
# nice 10: the tests' own timings stay as on a warm machine; the builds take the CPU the tests leave idle.
nice -n 10 bash -c 'bash tests/controlplane/build.sh && bash tests/controlplane-jobs/build.sh' \
  >/dev/null 2>"$log" &
build=$!

rc=0
"$@" || rc=$?

build_rc=0
wait "$build" || build_rc=$?
# The builds' progress and timings (quiet when both were cached: a warm build.sh prints nothing).
if [[ -s "$log" ]]; then
  echo "--- control plane build (background, nice 10): $log"
  grep -E "built |done in|modules downloaded|exited|error|Error" "$log" || true
fi
if [[ "$build_rc" != 0 ]]; then
  echo "the control plane build failed (exit $build_rc); its log: $log" >&2
  tail -n 20 "$log" >&2
  exit "$build_rc"
fi
rm -f "$log"
exit "$rc"
