"""The offloaded AdamW's device path (pinned host states, copy-in / compute / copy-out streams, slots
reused across chunks and steps) against its CPU path on the same gradients. Needs CUDA: skipped elsewhere
(the CPU path's own tests are tests/unit/test_offload_optimizer.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ascend_edit.train.offload import SLOTS, StreamedOffloadAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the streamed path needs CUDA")


def pair(sizes, chunk):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=g) for n in sizes]
    host = [nn.Parameter(v.clone()) for v in values]
    device = [nn.Parameter(v.clone().cuda().bfloat16()) for v in values]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, chunk_elements=chunk)
    return StreamedOffloadAdamW(host, **kwargs), StreamedOffloadAdamW(device, **kwargs), values, device


def test_streamed_steps_match_the_cpu_path():
    sizes, chunk = [1000, 3000, 17, 512], 256  # 21 chunks through 3 slots, some partial
    assert sum(-(-n // chunk) for n in sizes) > 2 * SLOTS
    reference, streamed, values, device_params = pair(sizes, chunk)
    streamed.load_masters(values)  # the same fp32 masters as the reference (its bf16 params were rounded)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(n, generator=g) for n in sizes]
        for acc, grad in zip(reference.grads, grads):
            acc.copy_(grad)
        for acc, grad in zip(streamed.grads, grads):
            acc.copy_(grad.cuda())
        reference.step()
        streamed.step()
        reference.zero_grad()
        streamed.zero_grad()
    for ours, theirs in zip(streamed.masters(), reference.masters()):
        assert ours.is_pinned()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for p, master in zip(device_params, streamed.masters()):
        assert torch.equal(p.detach().cpu(), master.bfloat16())
    state = streamed.state_dict()["state"]
    for index, p in enumerate(reference.param_groups[0]["params"]):
        torch.testing.assert_close(state[index]["exp_avg_sq"], reference.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(state[index]["step"]) == 3.0
