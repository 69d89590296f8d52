# Ascend NPU image: CANN toolkit + torch + torch_npu + ascend_edit. Build from the repo root:
#   docker build -f docker/npu.Dockerfile -t ascend-edit:npu .
# NOT built or run on Ascend hardware by this project yet; see docker/README.md.

# Ascend's CANN images (github.com/Ascend/cann-container-image), tag
# <cann>-<chip>-<os>-py<python>. torch_npu must match the CANN version (torch_npu's
# COMPATIBILITY.md; 2.12.0 pairs with CANN 9.1.0): pass the tag that table names for
# torch_npu 2.13.0, e.g. --build-arg CANN_IMAGE=ascendai/cann:<cann>-910b-ubuntu22.04-py3.11
# (use -a3- for Atlas A3).
ARG CANN_IMAGE=ascendai/cann:9.0.0-910b-ubuntu22.04-py3.11
FROM ${CANN_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch_npu runs on the CPU build of torch (the CPU index serves both x86_64 and aarch64).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install pyyaml setuptools

WORKDIR /workspace/ascend_edit
COPY . .
# The npu extra pins torch_npu==2.13.0, the build for torch 2.13.0.
RUN pip install -e ".[npu,test]"

# CANN's libraries and tools are only usable after its set_env.sh ran in the same shell.
COPY docker/npu-entrypoint.sh /usr/local/bin/npu-entrypoint.sh
RUN chmod +x /usr/local/bin/npu-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/npu-entrypoint.sh"]
CMD ["python", "-m", "pytest", "-m", "not slow", "-q"]
