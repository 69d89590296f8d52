# CPU image: runs the test suite (and small CPU conversions). Build from the repo root:
#   docker build -f docker/cpu.Dockerfile -t ascend-edit:cpu .
#   docker run --rm ascend-edit:cpu
# Where no Docker engine runs, docker/verify-cpu.sh builds and tests it with podman.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# DeepSpeed compiles its CPU communication op (shm_comm) at first use: ZeRO runs need a C++ compiler.
# Unpinned on purpose: the compiler version is the base image's Debian release's.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# PyPI's Linux x86_64 torch wheel is the CUDA build (several GB of CUDA libraries); the CPU
# index has the same version as a CPU-only wheel. Installed first, it satisfies setup.py's
# exact pin, so the project install below does not fetch torch again.
# TORCH_FIND_LINKS: a directory with a torch-2.13.0+cpu wheel already on disk (mounted for the
# build, e.g. `podman build -v /opt/wheels:/wheels:ro --build-arg TORCH_FIND_LINKS=/wheels`);
# pip prefers 2.13.0+cpu there over a plain 2.13.0 on the index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
# torch is pinned (==2.13.0); hadolint misreads the optional --find-links expansion as a package.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} \
        torch==2.13.0 \
    && python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"

WORKDIR /workspace/ascend_edit
COPY . .
RUN pip install -e ".[test]"

CMD ["python", "-m", "pytest", "-m", "not slow", "-q"]
