#!/usr/bin/env bash
# Lay out a CUDA_HOME from the nvidia-* wheels of a virtualenv (torch's CUDA runtime and nvidia-cuda-nvcc):
#   bin/  nvvm/    the nvcc wheel's own folders (ptxas, libdevice; nvcc itself where the wheel has it)
#   include/       every wheel's headers (cuda_runtime.h, cublas_v2.h, crt/, nvtx3/, ...)
#   lib64/         every wheel's shared libraries, plus the unversioned lib*.so names the linker looks for
# torch.utils.cpp_extension (and Colossal-AI's kernel builder on top of it) finds nvcc, headers and
# libraries only under one CUDA_HOME; links keep the files where pip put them, so torch and the kernels
# compiled on the node use the same libraries. Usage: cuda_home.sh VENV TARGET
set -euo pipefail
venv="${1:?usage: cuda_home.sh VENV TARGET}"
target="${2:?usage: cuda_home.sh VENV TARGET}"
nvidia="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia"
# nvidia-cuda-nvcc-cu12 12.4.131 ships ptxas and nvvm (libdevice), not the nvcc driver (docs/image.md).
[ -x "$nvidia/cuda_nvcc/bin/ptxas" ] || { echo "cuda_home.sh: no ptxas in $nvidia/cuda_nvcc (nvidia-cuda-nvcc-cu12 not installed)" >&2; exit 2; }

mkdir -p "$target/include" "$target/lib64"
ln -sfn "$nvidia/cuda_nvcc/bin" "$target/bin"
ln -sfn "$nvidia/cuda_nvcc/nvvm" "$target/nvvm"
# Headers: one link per top-level entry; a folder two wheels share (crt/) becomes a real folder of links.
for include in "$nvidia"/*/include; do
    for entry in "$include"/*; do
        name="${entry##*/}"
        if [ -d "$entry" ] && [ -e "$target/include/$name" ]; then
            if [ -L "$target/include/$name" ]; then
                first="$(readlink "$target/include/$name")"
                rm "$target/include/$name" && mkdir "$target/include/$name"
                ln -sf "$first"/* "$target/include/$name/"
            fi
            ln -sf "$entry"/* "$target/include/$name/"
        else
            ln -sfn "$entry" "$target/include/$name"
        fi
    done
done
for lib in "$nvidia"/*/lib/lib*.so*; do
    name="${lib##*/}"
    ln -sf "$lib" "$target/lib64/$name"
    ln -sf "$lib" "$target/lib64/${name%%.so*}.so"
done
echo "CUDA_HOME $target: $(ls "$target/include" | wc -l) header entries, $(ls "$target/lib64" | wc -l) libraries"
