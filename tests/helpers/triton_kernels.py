"""Where the Triton kernel tests run: on a CUDA GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter's tl.dot misreads bf16 operands (numpy has no bf16; Triton 3.6 gives garbage, not an error),
# so 16-bit inputs are fp16 on CPU.
HALF = torch.bfloat16 if HAS_CUDA else torch.float16


def runs_kernel(triton_available: bool) -> pytest.MarkDecorator:
    """Skip unless the kernel can run here: a CUDA GPU, or Triton with its interpreter."""
    return pytest.mark.skipif(not (HAS_CUDA or (INTERPRET and triton_available)),
                              reason="needs a CUDA GPU, or Triton with TRITON_INTERPRET=1")
