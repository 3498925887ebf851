#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a lent GPU machine that has torch, transformers 5.x and most of
# the scientific stack preinstalled but no network (bench/README.md). Downloads, here, into .whl/ at the
# repository root (in .gitignore: it travels only when the device tool's `carry` names it) the pinned
# versions (requirements/constraints.txt) of what is missing there: Colossal-AI and what it imports, and
# math-verify for the reward. With PINNED_HF=1 (the default) also transformers, tokenizers and
# huggingface_hub at our pins, so the check runs the stack the image runs; PINNED_HF=0 leaves the
# machine's transformers 5.x. About 57 MB in all (the device tool carries at most 64 MiB, working tree
# included).
#
#   bench/gpu_wheels.sh            # then, on the machine:  see bench/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
PYVER=${PYVER:-3.12}
pin() {  # NAME -> NAME==VERSION from the constraints file (names compared case- and -/_-insensitively)
  local want
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub("_","-",n); if (n==w) {print $1"=="$2; exit}}' requirements/constraints.txt
}
PACKAGES=(colossalai bitsandbytes galore-torch dill math-verify latex2sympy2_extended antlr4-python3-runtime)
if [ "${PINNED_HF:-1}" = 1 ]; then
  PACKAGES+=(transformers tokenizers huggingface_hub)
fi
rm -rf "$DEST" && mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
  spec=$(pin "$name")
  [ -n "$spec" ] || { echo "gpu_wheels.sh: $name is not pinned in requirements/constraints.txt" >&2; exit 2; }
  if [ "$name" = colossalai ]; then
    # Published as a source distribution only: build its pure-Python wheel here (its kernels are compiled
    # on first use, on the machine that runs them).
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      --platform any -d "$DEST" "$spec"
  fi
done
ls -l "$DEST"
du -sh "$DEST"
