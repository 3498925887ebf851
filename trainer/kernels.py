"""Whether Colossal-AI's compiled kernels a plugin needs can be had on this machine, asked before any work.

``--plugin gemini`` and ``zero2_cpu`` keep optimizer states on the CPU and step them with ``HybridAdam``,
whose GPU half is Colossal-AI's fused CUDA Adam (``colossalai._C.fused_optim_cuda``). Without a prebuilt
copy Colossal-AI JIT-compiles it with ``nvcc`` from ``CUDA_HOME`` at the optimizer's construction, after
the model is loaded; where there is no nvcc (our image: PyPI has no CUDA 12 nvcc, docs/image.md) that fails
minutes into the job with a compiler trace. This says so at the start, naming the flag and the fix.
"""

from __future__ import annotations

import importlib.util
import os

# Plugins whose optimizer is HybridAdam (trainer/runtime.py make_optimizer).
OFFLOAD_PLUGINS = ("gemini", "zero2_cpu")
FUSED_ADAM_MODULE = "colossalai._C.fused_optim_cuda"


def fused_adam_problem(plugin: str, cuda: bool, cuda_home: str | None) -> str | None:
    """Why ``--plugin plugin`` cannot get its fused CUDA Adam here, or None when it can (or needs none).

    ``cuda``: CUDA is in use (HybridAdam loads the kernel only then); ``cuda_home``: torch's CUDA_HOME.
    """
    if plugin not in OFFLOAD_PLUGINS or not cuda:
        return None
    try:
        if importlib.util.find_spec(FUSED_ADAM_MODULE) is not None:
            return None  # prebuilt (a colossalai built with BUILD_EXT=1)
    except ModuleNotFoundError:  # no colossalai._C at all
        pass
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc and os.access(nvcc, os.X_OK):
        return None  # Colossal-AI compiles it on first use (once per $HOME's cache)
    where = f"{nvcc} does not exist" if nvcc else "CUDA_HOME is not set and no nvcc is on PATH"
    return (
        f"--plugin {plugin} steps its CPU-offloaded optimizer with Colossal-AI's HybridAdam, whose fused CUDA "
        f"Adam is neither prebuilt ({FUSED_ADAM_MODULE}) nor compilable here ({where}); use --plugin zero2 "
        "(no offload), or an image with the CUDA 12 toolkit's nvcc (docs/image.md)"
    )


def check_offload_kernels(plugin: str) -> str | None:
    """:func:`fused_adam_problem` for this process (torch's CUDA availability and CUDA_HOME)."""
    if plugin not in OFFLOAD_PLUGINS:
        return None  # torch.utils.cpp_extension imports setuptools: only where it is needed
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return fused_adam_problem(plugin, torch.cuda.is_available(), CUDA_HOME)
