"""trainer/kernels.py: the offloading plugins' fused CUDA Adam is refused up front where it cannot be had.

No GPU here: the decision is a function of (plugin, CUDA in use, CUDA_HOME), tested with real folders; the
image test (tests/support/image.py) asks it inside the built image, whose CUDA_HOME has no nvcc.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.kernels import FUSED_ADAM_MODULE, OFFLOAD_PLUGINS, fused_adam_problem


def _cuda_home(tmp_path: Path, nvcc: bool, executable: bool = True) -> str:
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "ptxas").write_text("#!/bin/sh\n")  # what PyPI's CUDA 12 nvcc wheels hold
    if nvcc:
        (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (home / "bin" / "nvcc").chmod(0o755 if executable else 0o644)
    return str(home)


@pytest.mark.parametrize("plugin", OFFLOAD_PLUGINS)
def test_offloading_plugin_on_cuda_without_nvcc_is_refused_naming_the_fix(
    tmp_path: Path, plugin: str
) -> None:
    home = _cuda_home(tmp_path, nvcc=False)
    problem = fused_adam_problem(plugin, cuda=True, cuda_home=home)
    assert problem is not None
    assert f"--plugin {plugin}" in problem and os.path.join(home, "bin", "nvcc") in problem
    assert "--plugin zero2" in problem and "\n" not in problem
    assert "CUDA_HOME is not set" in fused_adam_problem(plugin, cuda=True, cuda_home=None)
    # nvcc present but not executable is no compiler either
    other = tmp_path / "other"
    other.mkdir()
    assert fused_adam_problem(plugin, cuda=True, cuda_home=_cuda_home(other, nvcc=True, executable=False))


@pytest.mark.parametrize("plugin", OFFLOAD_PLUGINS)
def test_offloading_plugin_with_nvcc_or_on_cpu_is_allowed(tmp_path: Path, plugin: str) -> None:
    assert fused_adam_problem(plugin, cuda=True, cuda_home=_cuda_home(tmp_path, nvcc=True)) is None
    assert fused_adam_problem(plugin, cuda=False, cuda_home=None) is None  # HybridAdam loads it only on CUDA


@pytest.mark.parametrize("plugin", ["ddp", "zero2", "3d"])
def test_plugins_without_offload_need_no_kernel(plugin: str) -> None:
    assert fused_adam_problem(plugin, cuda=True, cuda_home=None) is None


def test_this_colossalai_has_no_prebuilt_fused_adam() -> None:
    # The pinned colossalai wheel is built without BUILD_EXT: the prebuilt path is really absent here, so the
    # tests above exercise the nvcc branch (were it present, a refusal would be wrong and they would say so).
    code = f"import importlib.util as u; print(u.find_spec({FUSED_ADAM_MODULE!r}) is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
