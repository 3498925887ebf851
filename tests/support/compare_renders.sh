#!/usr/bin/env bash
# Byte-compare the chart's `helm template` output between two commits, for the default values and every
# value set tests/test_chart.py renders (helm 3 and helm 4).
#
#   tests/support/compare_renders.sh [BEFORE] [AFTER]     (defaults: 50897d2 and HEAD)
#
# Three runs of tests/test_chart.py with R1_GRPO_RENDER_DUMP (tests/support/helmtool.py keeps each render
# under a hash of its helm version, arguments and values):
#   before  BEFORE's tests on BEFORE's chart
#   after   AFTER's tests on AFTER's chart
#   cross   AFTER's tests on BEFORE's chart, so value sets that only AFTER's tests render are compared too
# It fails when a render differs, when a render of `before` is missing from `after`, or when `after` and
# `cross` differ in any file. The dump keys hold the chart's absolute path, so every run checks out into
# the same folder, a sibling of this repository (where ../shared/crds resolves as it does here).
#
# Environment: PYTHON (default <repo>/.venv/bin/python, else python3); KEEP=1 keeps the dumps.
set -euo pipefail

repo=$(git rev-parse --show-toplevel)
before=$(git -C "$repo" rev-parse --verify "${1:-50897d2}^{commit}")
after=$(git -C "$repo" rev-parse --verify "${2:-HEAD}^{commit}")
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)
work="$(dirname "$repo")/.r1-grpo-render-compare.$$"
out=$(mktemp -d "${TMPDIR:-/tmp}/r1-grpo-renders.XXXXXX")

cleanup() {
    git -C "$repo" worktree remove --force "$work" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "dumps kept in $out"; else rm -rf "$out"; fi
}
trap cleanup EXIT

# render LABEL TESTS_REV [CHART_REV]: run TESTS_REV's tests/test_chart.py (on CHART_REV's chart if given).
render() {
    local label=$1 rev=$2 chart_rev=${3:-}
    git -C "$repo" worktree add --detach --quiet "$work" "$rev"
    # helm 4 and checkov are cached under .cache/tools; reuse this checkout's copies instead of fetching.
    if [ -d "$repo/.cache" ]; then ln -s "$(readlink -f "$repo/.cache")" "$work/.cache"; fi
    if [ -n "$chart_rev" ]; then
        git -C "$work" rm -r --quiet charts/r1-grpo
        git -C "$work" checkout "$chart_rev" -- charts/r1-grpo
    fi
    local chart=${chart_rev:-$rev}
    echo "== $label: tests of ${rev:0:12}, chart of ${chart:0:12}"
    local status=0
    (cd "$work" && PYTHONPATH="$work" R1_GRPO_RENDER_DUMP="$out/$label" \
        "$python" -m pytest -q -p no:cacheprovider tests/test_chart.py) | tail -n 3 || status=$?
    git -C "$repo" worktree remove --force "$work"
    if [ "$status" -ne 0 ]; then
        echo "FAIL: tests/test_chart.py failed in the $label run"
        exit 1
    fi
}

render before "$before"
render after "$after"
render cross "$after" "$before"

failed=0
count() { find "$1" -maxdepth 1 -type f | wc -l; }
common=0 only_before=0 only_after=0
for file in "$out"/before/*; do
    name=$(basename "$file")
    if [ -f "$out/after/$name" ]; then
        common=$((common + 1))
        if ! cmp -s "$file" "$out/after/$name"; then
            echo "DIFFERS (before vs after): $name"
            diff "$file" "$out/after/$name" | head -n 20
            failed=1
        fi
    else
        only_before=$((only_before + 1))
        echo "MISSING in after: $name (a value set the old tests rendered is no longer rendered)"
        failed=1
    fi
done
only_after=$(($(count "$out/after") - common))
if ! diff -r "$out/after" "$out/cross" >/dev/null; then
    echo "DIFFERS (after vs cross: the same tests on the two charts):"
    diff -rq "$out/after" "$out/cross" | head -n 20
    failed=1
fi
echo "before: $(count "$out/before") renders; after: $(count "$out/after"); cross: $(count "$out/cross")"
echo "before vs after: $common compared byte for byte, $only_before missing in after, $only_after new in after"
echo "after vs cross: $(count "$out/after") renders of the new tests compared on both charts"
if [ "$failed" -ne 0 ]; then
    echo "FAIL: the renders differ"
    exit 1
fi
echo "OK: byte-identical"
