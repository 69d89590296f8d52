# Ascend NPU image: CANN toolkit + torch + torch_npu + MindSpeed (from source) + ascend_edit.
# Build from the repo root:
#   docker build -f docker/npu.Dockerfile -t ascend-edit:npu .
# NOT built or run on Ascend hardware by this project yet; see docker/README.md.
#
# One consistent triple, from TorchNPU 26.2.0's release notes (branch v2.13.0-26.2.0):
#   CANN 9.2.0  +  torch 2.13.0  +  torch_npu 2.13.0
# The build fails if the base image's CANN or the installed torch / torch_npu differ from the ARGs.
ARG CANN_VERSION=9.2.0
# Ascend's CANN images (Ascend/cann-container-image), tag <cann>-<chip>-<os>-py<python>;
# chip 910b = Atlas A2, a3 = Atlas A3. Any image with CANN ${CANN_VERSION} under
# /usr/local/Ascend/ascend-toolkit and Python 3.10+ on PATH works.
ARG BASE_IMAGE=ascendai/cann:${CANN_VERSION}-910b-ubuntu22.04-py3.11
FROM ${BASE_IMAGE}

ARG CANN_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_NPU_VERSION=2.13.0
# torch_npu runs on the CPU build of torch (the CPU index serves both x86_64 and aarch64).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A directory of wheels already on disk, mounted for the build (hosts without the CPU index):
# pip prefers torch-${TORCH_VERSION}+cpu there over a plain ${TORCH_VERSION} on the index.
ARG TORCH_FIND_LINKS=""
# MindSpeed from source: 26.2.0_core_r0.12.1 is the MindSpeed branch released with TorchNPU 26.2.0 /
# CANN 9.2.0 (its table lists torch 2.10 as tested; torch 2.13 is not). MINDSPEED_REF="" leaves it out;
# the project works the same without it (docs/npu.md).
ARG MINDSPEED_REF=26.2.0_core_r0.12.1
ARG MINDSPEED_REPO=https://gitcode.com/Ascend/MindSpeed.git

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base image must carry the CANN version the triple names (version.cfg / *_install.info differ
# between CANN releases, so any file under the toolkit naming the version is accepted).
RUN grep -rqs --include='*.info' --include='*.cfg' "${CANN_VERSION}" /usr/local/Ascend/ascend-toolkit/latest/ \
    || { echo "base image does not hold CANN ${CANN_VERSION}; pass a matching BASE_IMAGE" >&2; exit 1; }

RUN PIP_FIND_LINKS="${TORCH_FIND_LINKS}" pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install "torch_npu==${TORCH_NPU_VERSION}" pyyaml==6.0.3 setuptools==84.2.1 \
    && python -c "import importlib.metadata as m; \
got = (m.version('torch').split('+')[0], m.version('torch_npu')); \
want = ('${TORCH_VERSION}', '${TORCH_NPU_VERSION}'); \
assert got == want, f'installed torch, torch_npu {got}; the triple names {want}'"

# git is needed only to fetch MindSpeed; the CANN images are Ubuntu based. git is unpinned on
# purpose: the version is the base image's Ubuntu release's.
# hadolint ignore=DL3008
RUN if [ -n "${MINDSPEED_REF}" ]; then \
        apt-get update && apt-get install -y --no-install-recommends git \
        && rm -rf /var/lib/apt/lists/* \
        && git clone --depth 1 --branch "${MINDSPEED_REF}" "${MINDSPEED_REPO}" /opt/MindSpeed \
        && TORCH_DEVICE_BACKEND_AUTOLOAD=0 pip install --no-deps -e /opt/MindSpeed; \
    fi

WORKDIR /workspace/ascend_edit
COPY . .
# torch / torch_npu are already the pinned triple; the npu extra pins the same torch_npu.
# torch_npu registers itself for torch's backend autoload, and importing it needs CANN's and the
# host driver's libraries (the driver is only mounted at run time): DeepSpeed's setup.py imports
# torch, so the install runs with the autoload off.
RUN TORCH_DEVICE_BACKEND_AUTOLOAD=0 pip install -e ".[npu,test]" \
    && python -c "import importlib.metadata as m; assert m.version('torch_npu') == '${TORCH_NPU_VERSION}'"

# CANN's libraries and tools are only usable after its set_env.sh ran in the same shell.
COPY docker/npu-entrypoint.sh /usr/local/bin/npu-entrypoint.sh
RUN chmod +x /usr/local/bin/npu-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/npu-entrypoint.sh"]
CMD ["python", "-m", "pytest", "-m", "not slow", "-q"]
