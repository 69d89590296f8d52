# CPU image: runs the test suite (and small CPU conversions). Build from the repo root:
#   docker build -f docker/cpu.Dockerfile -t ascend-edit:cpu .
#   docker run --rm ascend-edit:cpu
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# PyPI's Linux x86_64 torch wheel is the CUDA build (several GB of CUDA libraries); the CPU
# index has the same version as a CPU-only wheel. Installed first, it satisfies setup.py's
# exact pin, so the project install below does not fetch torch again.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

WORKDIR /workspace/ascend_edit
COPY . .
RUN pip install -e ".[test]"

CMD ["python", "-m", "pytest", "-m", "not slow", "-q"]
