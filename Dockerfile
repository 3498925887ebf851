# syntax=docker/dockerfile:1
#
# The r1-grpo trainer image: Debian 12 (CPython 3.11), the project's pinned requirements
# (requirements/constraints.txt, the same pins the tests use) in /opt/venv, among them PyPI's torch 2.5.1,
# whose nvidia-* wheels are the CUDA 12.4 runtime (cuBLAS, cuDNN, NCCL, ...: the GPU node supplies only the
# driver), PyPI's nvidia-cuda-nvcc-cu12 (ptxas, libdevice; its 12.4 wheel has no nvcc driver), g++ for the
# C++ kernels compiled on the node, flash-attn, and the trainer package with its `r1-grpo` entry point. docs/image.md explains the choices and how `make image` builds it here.
#
#   docker build -t r1-grpo:dev .
#   docker build --build-arg FLASH_ATTN_INSTALL=source -t r1-grpo:dev .   # compile flash-attn (slow)
#   docker build --build-arg FLASH_ATTN_INSTALL=none -t r1-grpo:dev .     # no flash-attn (sdpa attention)
#
# ci/github-actions.yml builds it with VERSION / VCS_REF / BUILD_DATE / SOURCE_URL from git.

# Debian's slim image: no CUDA toolkit in the base, torch's wheels bring the CUDA libraries they were built
# against. `make image` builds FROM a local equivalent made by image/base.sh from Debian's packages.
FROM debian:bookworm-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CUDA_HOME=/opt/cuda \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never

# The installer of the Python packages (parallel downloads, one wheel cache across builds).
ARG UV_VERSION=0.13.9

# CPython 3.11 with its headers and g++: Triton compiles a launcher per kernel and torch / Colossal-AI
# build their C++/CUDA extensions on the node, both need a host compiler and Python.h.
# The suite (bookworm, from the base's sources) is the pin: security updates replace package versions in
# the archive, so an exact pin would break the build at the next point release (DL3008).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=build-ca \
    apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca PIP_CERT=/run/secrets/build-ca; fi \
    && pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/r1-grpo

# Dependencies first (a layer that survives source edits): the package's requirements resolved against the
# shared pins, plus CUDA 12.4's ptxas and libdevice (nvidia-cuda-nvcc-cu12). uv's wheel cache is a build cache mount, never part of the image.
# The optional secret `build-ca` is a CA bundle for builders behind a TLS-inspecting proxy (make image
# passes the machine's); it is used by the steps that download and is never stored in the image.
# nvcc of the CUDA release torch's wheels were built with (torch.version.cuda 12.4 = CUDA 12.4.1).
ARG CUDA_NVCC_VERSION=12.4.131
COPY requirements/ requirements/
COPY pyproject.toml ./
RUN --mount=type=cache,id=r1-grpo-uv,target=/root/.cache/uv,sharing=locked --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca PIP_CERT=/run/secrets/build-ca; fi \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && uv pip install -c requirements/constraints.txt -r /tmp/requirements.txt "nvidia-cuda-nvcc-cu12==${CUDA_NVCC_VERSION}" \
    && rm /tmp/requirements.txt \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '2.5.1' and torch.version.cuda == '12.4', torch.__version__"

# CUDA_HOME as torch.utils.cpp_extension and Colossal-AI's kernel builder expect it (bin/, include/, lib64/),
# made of links into the nvidia-* wheels (the headers and libraries torch runs with). It has no nvcc: the
# 12.4 wheel does not ship one, so CUDA kernels cannot be JIT-compiled in this image (docs/image.md).
COPY image/cuda_home.sh /usr/local/bin/r1-grpo-cuda-home
RUN r1-grpo-cuda-home /opt/venv /opt/cuda \
    && /opt/cuda/bin/ptxas --version | tail -n 2

# flash-attn: `prebuilt` installs a release wheel built for exactly the installed torch (version, CUDA major,
# C++ ABI) and CPython, found from torch itself (FLASH_ATTN_WHEEL overrides it, e.g. a mirror's URL);
# `source` compiles the same version with this image's nvcc for TORCH_CUDA_ARCH_LIST (hours on few cores,
# MAX_JOBS parallel jobs); `none` skips it (the trainer then uses PyTorch's sdpa attention).
ARG FLASH_ATTN_INSTALL=prebuilt
ARG FLASH_ATTN_VERSION=2.7.4.post1
ARG FLASH_ATTN_RELEASES=https://github.com/Dao-AILab/flash-attention/releases/download
ARG FLASH_ATTN_WHEEL=
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=4
# DL3013: the prebuilt wheel is pinned by FLASH_ATTN_VERSION inside its file name, the source build by ==.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca PIP_CERT=/run/secrets/build-ca; fi; \
    case "${FLASH_ATTN_INSTALL}" in \
      prebuilt) wheel="${FLASH_ATTN_WHEEL:-$(python -c 'import os, sys, torch; v = os.environ["FLASH_ATTN_VERSION"]; r = os.environ["FLASH_ATTN_RELEASES"]; abi = str(torch._C._GLIBCXX_USE_CXX11_ABI).upper(); t = ".".join(torch.__version__.split("+")[0].split(".")[:2]); cu = torch.version.cuda.split(".")[0]; py = "cp%d%d" % sys.version_info[:2]; print(f"{r}/v{v}/flash_attn-{v}+cu{cu}torch{t}cxx11abi{abi}-{py}-{py}-linux_x86_64.whl")')}" \
                && echo "flash-attn wheel: ${wheel}" \
                && uv pip install --no-cache --no-deps "${wheel}" ;; \
      source) MAX_JOBS="${MAX_JOBS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" FLASH_ATTENTION_FORCE_BUILD=TRUE \
              uv pip install --no-cache --no-deps --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" ;; \
      none) echo "flash-attn not installed (FLASH_ATTN_INSTALL=none)" ;; \
      *) echo "FLASH_ATTN_INSTALL must be prebuilt, source or none, not '${FLASH_ATTN_INSTALL}'" >&2; exit 1 ;; \
    esac \
    && if [ "${FLASH_ATTN_INSTALL}" != none ]; then python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; fi

# The trainer itself (README.md is the package's long description: copied here, an edit to it does not
# invalidate the dependency layer).
COPY README.md ./
COPY trainer/ trainer/
RUN --mount=type=cache,id=r1-grpo-uv,target=/root/.cache/uv,sharing=locked --mount=type=secret,id=build-ca \
    if [ -s /run/secrets/build-ca ]; then export SSL_CERT_FILE=/run/secrets/build-ca PIP_CERT=/run/secrets/build-ca; fi \
    && uv pip install --no-deps -c requirements/constraints.txt . \
    && r1-grpo --help > /dev/null

# Non-root: UID/GID 10001 match the chart's securityContext (runAsUser / fsGroup).
RUN groupadd --gid 10001 r1 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/r1 --shell /usr/sbin/nologin r1
USER 10001:10001
ENV HOME=/home/r1
WORKDIR /home/r1

# Build metadata last: these change on every commit and would otherwise invalidate every cached layer.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=unknown

LABEL org.opencontainers.image.title="r1-grpo" \
      org.opencontainers.image.description="SFT -> GRPO training of DeepSeek-R1-style reasoning models with Colossal-AI, for Kubeflow PyTorchJobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# A batch job: Kubernetes restarts or retries it by exit status, there is no service to health-check.
# checkov:skip=CKV_DOCKER_2:batch training image, the PyTorchJob and the controller act on the exit status
ENTRYPOINT ["r1-grpo"]
CMD ["--help"]
