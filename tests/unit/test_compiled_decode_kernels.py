"""Inductor fuses the decode step's small ops: kernels launched per compiled step, counted in its generated code.

At batch 1 the eager step is a few thousand tiny kernels (norms, rotary, residual adds, casts, cache
bookkeeping); the compiled step (`StaticDecoder(mode="compile")`) should launch far fewer. On CPU the
generated module's `call()` names each launch: a fused C++ kernel (`cpp_fused_*`) or an ATen call left to the
library (`extern_kernels.*`, `aten.*`: the matmuls). No timings.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from ascend_edit.models.static_decode import StaticDecoder
from tests.unit.test_decode_op_counts import OpLog, converted

LAUNCH = re.compile(r"^\s+(?:buf\w+ = )?(cpp_fused_\w+|extern_kernels\.\w+|aten\.\w+|torch\.ops\.\w+\.\w+)\(", re.M)


def launches(code: str) -> list[str]:
    """Kernel launches in the generated module's `call()`: fused kernels and library calls."""
    body = code[code.index("def call("):]
    return LAUNCH.findall(body)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_compiled_step_launches_far_fewer_kernels_than_the_eager_step_runs_ops(kind):
    model = converted(kind)
    ids = torch.randint(3, 250, (1, 5), generator=torch.Generator().manual_seed(0))
    eager = StaticDecoder(model, batch=1, max_cache_len=16, mode="eager")
    eager.prefill(ids)
    with OpLog() as ops:
        eager.step()
    compiled = StaticDecoder(model, batch=1, max_cache_len=16, mode="compile")
    compiled.prefill(ids)
    _, codes = run_and_get_code(compiled.step)
    calls = [name for code in codes for name in launches(code)]
    fused = [name for name in calls if name.startswith("cpp_fused")]
    eager_ops = sum(ops.ops.values())
    print(f"{kind}: eager step {eager_ops} ops; compiled step {len(calls)} launches ({len(fused)} fused kernels)")
    assert fused and eager_ops > 4 * len(calls), (len(calls), eager_ops)
