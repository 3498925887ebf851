# syntax=docker/dockerfile:1
#
# The r1-grpo trainer image: PyTorch 2.5.1 + CUDA 12.4 *devel* (Colossal-AI compiles its CUDA kernels at
# run time with nvcc), the project's pinned requirements (requirements/constraints.txt, the same pins the
# tests use), flash-attn, and the trainer package with its `r1-grpo` entry point.
#
#   docker build -t r1-grpo:dev .
#   docker build --build-arg FLASH_ATTN_INSTALL=source -t r1-grpo:dev .   # compile flash-attn (slow)
#   docker build --build-arg FLASH_ATTN_INSTALL=none -t r1-grpo:dev .     # no flash-attn (sdpa attention)
#
# ci/github-actions.yml builds it with VERSION / VCS_REF / BUILD_DATE / SOURCE_URL from git.

# Fixed, not a build arg: torch 2.5.1 / CUDA 12.4 / CPython 3.11 are the pins everything else is built for.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

# flash-attn: `prebuilt` installs a release wheel built for exactly the installed torch (version, CUDA major,
# C++ ABI) and CPython, found from torch itself (FLASH_ATTN_WHEEL overrides it, e.g. a mirror's URL);
# `source` compiles the same version with this image's nvcc (about an hour, MAX_JOBS parallel jobs);
# `none` skips it (the trainer then uses PyTorch's sdpa attention).
ARG FLASH_ATTN_INSTALL=prebuilt
ARG FLASH_ATTN_VERSION=2.7.4.post1
ARG FLASH_ATTN_RELEASES=https://github.com/Dao-AILab/flash-attention/releases/download
ARG FLASH_ATTN_WHEEL=
ARG MAX_JOBS=4
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
      org.opencontainers.image.base.name="docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_HOME=/usr/local/cuda

WORKDIR /opt/r1-grpo

# Dependencies first (a layer that survives source edits): the package's requirements resolved against the
# shared pins. torch==2.5.1 is the base image's own torch, so it is kept, not downloaded again.
COPY requirements/ requirements/
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt
RUN pip install --no-cache-dir -c requirements/constraints.txt -r /tmp/requirements.txt \
    && python -c "import torch; assert torch.__version__.startswith('2.5.1'), torch.__version__"

# DL3013: the prebuilt wheel is pinned by FLASH_ATTN_VERSION inside its file name, the source build by ==.
# hadolint ignore=DL3013
RUN case "${FLASH_ATTN_INSTALL}" in \
      prebuilt) wheel="${FLASH_ATTN_WHEEL:-$(python -c 'import os, sys, torch; v = os.environ["FLASH_ATTN_VERSION"]; r = os.environ["FLASH_ATTN_RELEASES"]; abi = str(torch._C._GLIBCXX_USE_CXX11_ABI).upper(); t = ".".join(torch.__version__.split("+")[0].split(".")[:2]); cu = torch.version.cuda.split(".")[0]; py = "cp%d%d" % sys.version_info[:2]; print(f"{r}/v{v}/flash_attn-{v}+cu{cu}torch{t}cxx11abi{abi}-{py}-{py}-linux_x86_64.whl")')}" \
                && echo "flash-attn wheel: ${wheel}" \
                && pip install --no-cache-dir --no-deps "${wheel}" ;; \
      source) MAX_JOBS="${MAX_JOBS}" FLASH_ATTENTION_FORCE_BUILD=TRUE \
              pip install --no-cache-dir --no-deps --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" ;; \
      none) echo "flash-attn not installed (FLASH_ATTN_INSTALL=none)" ;; \
      *) echo "FLASH_ATTN_INSTALL must be prebuilt, source or none, not '${FLASH_ATTN_INSTALL}'" >&2; exit 1 ;; \
    esac \
    && if [ "${FLASH_ATTN_INSTALL}" != none ]; then python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; fi

# The trainer itself.
COPY trainer/ trainer/
RUN pip install --no-cache-dir --no-deps -c requirements/constraints.txt . \
    && r1-grpo --help > /dev/null

# Non-root: UID/GID 10001 match the chart's securityContext (runAsUser / fsGroup).
RUN groupadd --gid 10001 r1 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/r1 --shell /usr/sbin/nologin r1
USER 10001:10001
ENV HOME=/home/r1
WORKDIR /home/r1

# A batch job: Kubernetes restarts or retries it by exit status, there is no service to health-check.
# checkov:skip=CKV_DOCKER_2:batch training image, the PyTorchJob and the controller act on the exit status
ENTRYPOINT ["r1-grpo"]
CMD ["--help"]
