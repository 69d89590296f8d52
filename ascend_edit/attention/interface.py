"""The targets' dense attention through transformers' attention-interface registry.

MLA and GateSWA run their dense (non-kernel) paths through the function transformers registers for the
model's `config._attn_implementation` (`ALL_ATTENTION_FUNCTIONS`), with transformers' eager function as
the default for "eager", so `model.attn_implementation` -- and a function a user registers with
`transformers.AttentionInterface.register(name, fn)` -- applies to the targets as to the teacher.

The targets ask more of that function than a plain causal decoder does:
* GateSWA's sliding layers pass their own 4-D mask (causal + window + sinks, or a ring cache's slots),
  so the function must apply the mask it is given. flash_attention_2/3/4 and hub kernels take only
  causal / sliding-window information and ignore such a mask, so they would be silently wrong;
* MLA's query/key head dim (nope + rope) differs from its value head dim.

Of transformers' own functions only those checked against both are allowed (`TARGET_IMPLEMENTATIONS`);
the others are refused with one line. A function registered by the user (defined outside transformers)
is taken at its word: it receives the mask in the format transformers' mask interface gives that name
(eager's additive float mask when registered with `AttentionMaskInterface` as `eager_mask`, else sdpa's
boolean mask, True = attend).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

# transformers' attention functions that apply an explicit 4-D mask and accept a value head dim other
# than the query/key one (sdpa: torch's scaled_dot_product_attention; eager: matmul + softmax).
TARGET_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_IMPLEMENTATION = "sdpa"  # a target built without a model config (unit tests, standalone use)


def target_implementation_problem(name: str) -> str | None:
    """Why the targets cannot run `model.attn_implementation=name` (one line), or None when they can."""
    if name in TARGET_IMPLEMENTATIONS:
        return None
    fn = ALL_ATTENTION_FUNCTIONS.get(name) if "/" not in name else None
    defined_in = getattr(fn, "__module__", None) or ""
    if fn is not None and defined_in.split(".")[0] != "transformers":
        return None  # registered by the user: their contract
    return (f"model.attn_implementation={name!r} cannot run the attention targets (they pass explicit "
            f"window/sink masks and MLA's value head dim differs from its query/key one): use one of "
            f"{list(TARGET_IMPLEMENTATIONS)} or a function registered with transformers.AttentionInterface")


def implementation_of(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) or DEFAULT_IMPLEMENTATION


def attention_function(module: torch.nn.Module) -> Callable:
    """The registry's function for the module's `config._attn_implementation` (eager's by default)."""
    name = implementation_of(module)
    if name == DEFAULT_IMPLEMENTATION:  # the common case: no further check needed
        return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)
    problem = target_implementation_problem(name)
    if problem:
        raise ValueError(problem)
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)


def dense_mask(module: torch.nn.Module, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean visibility mask (True = attend, every row with at least one True, as `to_sdpa_mask`
    returns it) in the format the module's attention function expects: eager's additive float mask,
    or the boolean one."""
    name = implementation_of(module)
    if name == DEFAULT_IMPLEMENTATION:
        return visible
    if name == "eager" or ALL_MASK_ATTENTION_FUNCTIONS.get(name) is eager_mask:
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return visible
