"""Decode-only rewrites of a model's linear layers: fewer, larger GEMMs and a batch-1 GEMV kernel.

At batch 1 a decode step is weight-bandwidth bound: every GEMM reads its whole weight for one row. Two
opt-in transforms, for inference only (never in training or export: the fused modules change the
state-dict layout), applied by swapping child modules on their parents (no class or function of
transformers is changed):

* :func:`fuse_decode_projections` — linears that read the *same input* in one forward become one linear
  holding their concatenated weights (:class:`FusedInputLinear`); each original child is replaced by an
  :class:`OutputSlice` that returns its columns of the fused output. Which siblings read the same input is
  known per module family (:data:`GROUPS`): MLA's query projection and ``kv_a_proj_with_mqa``; GateSWA's
  and the stock attentions' ``q/k/v_proj`` (+ GateSWA's output gate, which reads the layer input too);
  a gated MLP's ``gate_proj`` + ``up_proj``. The fused module owns the only copy of the weights (the
  originals are dropped); the slices hold no parameters.
  One fused GEMM per group and forward: a forward pre-hook on the owning module runs the fused linear on
  the module's input and primes the slices with the result; a forward hook releases it when the module
  returns (a long prefill keeps nothing alive). Hooks trace into a compiled step like the forward itself
  (the trace does not merge repeated identical GEMMs on its own: inference graphs get no CSE).
* :func:`use_gemv_linears` — every linear (and every fused linear) runs ``ascend_edit::gemv``
  (``kernels/triton/gemv.py``) when its input has at most ``MAX_ROWS`` rows on a device the kernel serves
  (CUDA), without grad; otherwise ``F.linear`` (prefill, training, CPU). Weights are shared, not copied.
  With ``tune_rows`` it first times the kernel's configs against ``F.linear`` per weight shape and keeps
  ``F.linear`` where that is faster.

Both keep greedy outputs equal to the untransformed model's up to fp32 summation order in the GEMMs
(tested on CPU through ``StaticDecoder``, eager and compiled).

:func:`prepare_for_decode` is the entry point for users: both transforms on any loaded decoder model
(in-repo converted, an exported ``auto_map`` or native ``deepseek_v3`` checkpoint, a stock teacher), then
transformers' ``generate(..., cache_implementation="static")`` as usual. It refuses a model in training
mode or with parameters that require grad, and a model with fused projections refuses ``state_dict()``
(hence ``save_pretrained`` and the project's export) with one line instead of writing a wrong layout.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ascend_edit.attention.gate_swa import GateSWAAttention, kernel_covers
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.hf.bundle import flat_file_stem

log = logging.getLogger(__name__)

__all__ = ["GROUPS", "DecodeLinear", "DecodeOnlyError", "DecodePreparation", "FusedInputLinear", "OutputSlice",
           "choose_gemv", "decode_linear_label", "fuse_decode_projections", "prepare_for_decode", "use_gemv_linears",
           "set_swa_decode_attention"]

KERNEL_DEVICES = ("cuda",)
MAX_ROWS = 8  # kernels/triton/gemv.py MAX_ROWS; a test checks they agree (that module imports Triton)


class DecodeOnlyError(RuntimeError):
    """A decode-only transform met training, gradients or saving (the transformed layout is for decode)."""


def _is_package_class(module: nn.Module, cls: type) -> bool:
    """``cls``, or its copy shipped in an ``auto_map`` checkpoint: the same class name in the flat file that
    ``ascend_edit.hf.bundle`` names after ``cls``'s module (loaded by transformers under its own package)."""
    kind = type(module)
    return isinstance(module, cls) or (kind.__name__ == cls.__name__
                                       and kind.__module__.rsplit(".", 1)[-1] == flat_file_stem(cls.__module__))


def _is_mla(module: nn.Module) -> bool:
    # the package's MLA (in-repo or auto_map) or transformers' DeepseekV3Attention (a native deepseek_v3
    # export): both project hidden_states with the query projection and kv_a_proj_with_mqa
    return _is_package_class(module, MLAAttention) or (
        type(module).__name__.endswith("Attention") and type(module).__module__.startswith("transformers.")
        and isinstance(getattr(module, "kv_a_proj_with_mqa", None), nn.Linear))


def _is_gate_swa(module: nn.Module) -> bool:
    return _is_package_class(module, GateSWAAttention)


def _is_stock_attention(module: nn.Module) -> bool:
    # transformers' Llama-family attentions (Llama, Qwen2, Qwen3, Mistral, ...) project hidden_states
    # with q/k/v_proj; the project's own attentions are matched above.
    return (type(module).__name__.endswith("Attention") and type(module).__module__.startswith("transformers.")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")))


def _is_gated_mlp(module: nn.Module) -> bool:
    # Llama/Qwen MLPs: down_proj(act(gate_proj(x)) * up_proj(x)).
    return (type(module).__name__.endswith("MLP")
            and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


# (which modules, the name of the fused child, the sibling linears that read the same input in forward)
GROUPS = (
    (_is_mla, "q_kv_a_proj", ("q_proj", "kv_a_proj_with_mqa")),
    (_is_mla, "q_a_kv_a_proj", ("q_a_proj", "kv_a_proj_with_mqa")),
    (_is_gate_swa, "qkv_gate_proj", ("q_proj", "k_proj", "v_proj", "gate_proj")),
    (_is_stock_attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    (_is_gated_mlp, "gate_up_proj", ("gate_proj", "up_proj")),
)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  kernel_devices: Sequence[str], torch_rows: frozenset[int] = frozenset()) -> torch.Tensor:
    """The GEMV kernel for a few rows on a device it serves, without grad; F.linear otherwise, and for the
    row counts in ``torch_rows`` (where tuning measured F.linear faster for this weight's shape)."""
    rows = _rows(x)
    if (kernel_devices and x.device.type in kernel_devices and not torch.is_grad_enabled()
            and 0 < rows <= MAX_ROWS and rows not in torch_rows):
        return torch.ops.ascend_edit.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class DecodeLinear(nn.Module):
    """An ``nn.Linear``'s parameters (the same objects: tying and memory unchanged) behind
    :func:`decode_linear`."""

    def __init__(self, linear: nn.Linear, kernel_devices: Sequence[str] = KERNEL_DEVICES):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kernel_devices = tuple(kernel_devices)
        self.torch_rows: frozenset[int] = frozenset()  # set by use_gemv_linears(tune_rows=...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias, self.kernel_devices, self.torch_rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel_devices={self.kernel_devices}"


class FusedInputLinear(nn.Module):
    """The concatenated weights of linears reading one input, and their biases when every member has one
    (otherwise the members' own biases stay on their :class:`OutputSlice`: no zero padding is stored)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        first = linears[0]
        if any(lin.in_features != first.in_features for lin in linears):
            raise ValueError("fused linears must share in_features")
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
            all_bias = all(lin.bias is not None for lin in linears)
            self.bias = (nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
                         if all_bias else None)
        self.widths = tuple(lin.out_features for lin in linears)
        self.offsets = tuple(sum(self.widths[:i]) for i in range(len(self.widths)))
        self.kernel_devices: tuple[str, ...] = ()  # set by use_gemv_linears
        self.torch_rows: frozenset[int] = frozenset()
        # (input, fused output) of the current forward of the owning module, set by its forward pre-hook
        # and cleared by its forward hook: the members' slices read it instead of recomputing.
        self._primed: tuple[torch.Tensor, torch.Tensor] | None = None
        # The members' weights live here under a new name: a state dict of this layout would save a model
        # nothing can load (and transformers' save_pretrained would write it without complaint).
        self.register_state_dict_pre_hook(_refuse_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias, self.kernel_devices, self.torch_rows)

    def output_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s columns of ``forward(x)``: the primed output when ``x`` is the primed input
        (one GEMM for the whole group), else computed here (correct, not shared)."""
        primed = self._primed
        full = primed[1] if primed is not None and primed[0] is x else self(x)
        start = self.offsets[index]
        return full[..., start:start + self.widths[index]]

    def extra_repr(self) -> str:
        return f"widths={self.widths}, in_features={self.weight.shape[1]}, kernel_devices={self.kernel_devices}"


def _refuse_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise DecodeOnlyError(
        f"refusing to build a state dict: {prefix.rstrip('.') or 'the model'} holds projections fused for decode "
        "(prepare_for_decode / fuse_decode_projections change the parameter layout), so save_pretrained or export "
        "would write weights nothing can load; save the model before preparing it, or reload it from its checkpoint")


class OutputSlice(nn.Module):
    """Stands in for one fused member: its columns of the group's output. Holds no weight (the fused
    module is registered once, on the parent), only the member's bias when the fused linear has none."""

    def __init__(self, fused: FusedInputLinear, index: int, bias: nn.Parameter | None = None):
        super().__init__()
        self._fused = (fused,)  # a tuple: not a registered child, so the weights are owned once
        self.index = index
        self.in_features, self.out_features = fused.weight.shape[1], fused.widths[index]
        # the member's own bias (the original parameter) where the fused linear carries none
        self.bias = bias if fused.bias is None else None

    @property
    def weight(self) -> torch.Tensor:
        """A view of this member's rows of the fused weight (for code that reads ``.weight``)."""
        fused = self._fused[0]
        start = fused.offsets[self.index]
        return fused.weight[start:start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._fused[0].output_for(x, self.index)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"member {self.index} of the fused projection, out_features={self.out_features}"


class _Prime:
    """Forward pre-hook: the fused GEMM on the module's input (its first argument, or ``hidden_states``)."""

    def __init__(self, fused: FusedInputLinear):
        self.fused = fused

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if isinstance(x, torch.Tensor):
            self.fused._primed = (x, self.fused(x))


class _Release:
    def __init__(self, fused: FusedInputLinear):
        self.fused = fused

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        self.fused._primed = None


@torch.no_grad()
def fuse_decode_projections(model: nn.Module) -> int:
    """Fuse each :data:`GROUPS` group present on a module into one linear; returns the number fused.

    Decode only: the state-dict layout changes, so never save, train or export the result."""
    fused_count = 0
    for module in list(model.modules()):
        for matches, fused_name, members in GROUPS:
            if not matches(module):
                continue
            linears = [getattr(module, n, None) for n in members]
            present = [(n, lin) for n, lin in zip(members, linears, strict=True) if isinstance(lin, nn.Linear)]
            if len(present) < 2 or present[0][0] != members[0]:
                continue
            if len({(lin.weight.dtype, lin.weight.device) for _, lin in present}) != 1:
                continue  # mixed dtypes or devices: leave them
            fused = FusedInputLinear([lin for _, lin in present])
            setattr(module, fused_name, fused)
            for index, (name, lin) in enumerate(present):
                setattr(module, name, OutputSlice(fused, index, lin.bias))  # the original Linear is dropped
            module.register_forward_pre_hook(_Prime(fused), with_kwargs=True)
            module.register_forward_hook(_Release(fused), always_call=True)
            fused_count += 1
    log.info("decode fusion: %d groups of linears reading one input fused", fused_count)
    return fused_count


@torch.no_grad()
def use_gemv_linears(model: nn.Module, kernel_devices: Sequence[str] = KERNEL_DEVICES,
                     tune_rows: Sequence[int] = ()) -> int:
    """Run every linear (fused ones included) through the GEMV kernel for inputs of at most ``MAX_ROWS``
    rows on ``kernel_devices``; returns the number of modules switched. Parameters are shared, not copied.

    ``tune_rows`` (CUDA): for each of these row counts and each distinct weight shape, time the kernel's
    candidate configs against ``F.linear`` once (``gemv.tune``, outside any graph capture), use the fastest
    config, and keep ``F.linear`` for the shapes where it was faster. Decisions are logged."""
    return len(_switch_to_gemv(model, kernel_devices, tune_rows)[0])


def _switch_to_gemv(model: nn.Module, kernel_devices: Sequence[str], tune_rows: Sequence[int]
                    ) -> tuple[list[DecodeLinear | FusedInputLinear], list[tuple[int, int, int]]]:
    """:func:`use_gemv_linears`; returns the switched modules and the ``(rows, out, in)`` shapes tuning kept
    on ``F.linear``."""
    from ascend_edit.kernels.triton import gemv  # registers ascend_edit::gemv (imports Triton if present)

    devices = tuple(kernel_devices)
    modules: list[DecodeLinear | FusedInputLinear] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                child = DecodeLinear(child, devices)
                setattr(parent, name, child)
            if isinstance(child, (DecodeLinear, FusedInputLinear)):
                child.kernel_devices = devices
                modules.append(child)
    log.info("decode linears: %d modules run the gemv kernel for <= %d rows on %s", len(modules), MAX_ROWS,
             ", ".join(devices))
    kept: list[tuple[int, int, int]] = []
    rows_to_tune = sorted({r for r in tune_rows if 0 < r <= MAX_ROWS})
    if not rows_to_tune or not gemv.triton_available():
        return modules, kept
    # the kernel is timed on the device the weights live on, so only CUDA weights are tuned
    shapes = {(tuple(m.weight.shape), m.weight.dtype, m.weight.device) for m in modules
              if m.weight.device.type == "cuda"}
    for rows in rows_to_tune:
        for (n, k), dtype, device in sorted(shapes, key=lambda s: (s[0], str(s[1]), str(s[2]))):
            config, kernel_ms, torch_ms = gemv.tune(rows, n, k, dtype, device)
            gemv.set_config(rows, n, k, config)
            if config is None:
                kept.append((rows, n, k))
                for module in modules:
                    if tuple(module.weight.shape) == (n, k):
                        module.torch_rows = module.torch_rows | {rows}
            log.info("gemv tuning: %d rows x [%d, %d]: kernel %.1f us (%s), F.linear %.1f us -> %s", rows, n, k,
                     kernel_ms * 1e3, "-" if config is None else config.label(), torch_ms * 1e3,
                     "F.linear" if config is None else "kernel")
    return modules, sorted(set(kept))


SWA_DECODE_ATTENTION = ("sdpa", "reductions", "kernel")


def set_swa_decode_attention(model: nn.Module, how: str) -> int:
    """Choose how every GateSWA layer attends its decode steps (attention/gate_swa.py ``decode_attention``);
    returns the number of layers set. ``"reductions"``: ``reduction_decode_attention`` inside compiled graphs,
    which inductor spreads over the whole GPU (fused SDPA runs one program per KV head for a decode query);
    ``"kernel"``: the split-K Triton op ``ascend_edit::gqa_decode`` on CUDA (registered here), for the layers whose
    shape it covers (``gate_swa.kernel_covers``; the others keep SDPA: checked here too, because an exported
    checkpoint's own copy of the class may predate that check); ``"sdpa"``. Returns the number of layers set
    to ``how``."""
    if how not in SWA_DECODE_ATTENTION:
        raise ValueError(f"GateSWA decode attention {how!r} is not one of {list(SWA_DECODE_ATTENTION)}")
    if how == "kernel":
        from ascend_edit.kernels.triton import gqa_decode  # noqa: F401  (registers the op; imports Triton)
    layers = [m for m in model.modules() if _is_gate_swa(m)]
    set_to_how = 0
    for layer in layers:  # exported auto_map checkpoints carry their own copy of the class
        covered = how != "kernel" or kernel_covers(*_packed_decode_shape(layer))
        layer.decode_attention = how if covered else "sdpa"  # type: ignore[assignment]  # a plain attribute
        set_to_how += covered
    if set_to_how < len(layers):
        log.info("decode attention: %d GateSWA layers have a shape the GQA kernel does not cover; they keep SDPA",
                 len(layers) - set_to_how)
    log.info("decode attention: %d GateSWA layers attend decode steps through %s", set_to_how, how)
    return set_to_how


def auto_swa_attention(device_types: set[str], triton_available: bool) -> str:
    """``prepare_for_decode(swa_attention="auto")``: the split-K kernel on CUDA with Triton (faster than SDPA in every
    shape measured on an H200, docs/benchmarks.md); SDPA otherwise (the reductions need inductor's GPU code, i.e.
    Triton too, and were slower than SDPA at batch 8)."""
    return "kernel" if "cuda" in device_types and triton_available else "sdpa"


def _packed_decode_shape(layer: nn.Module) -> tuple[int, int, int]:
    """A GateSWA layer's (query heads per KV head, key head dim, value head dim): what kernel_covers checks."""
    attn = cast(GateSWAAttention, layer)  # this package's class or an export's copy of it: the same attributes
    return attn.num_key_value_groups, attn.head_dim, attn.v_proj.out_features // attn.num_kv_heads


@dataclass(frozen=True)
class DecodePreparation:
    """What :func:`prepare_for_decode` changed."""

    groups_fused: int  # groups of linears reading one input now computed by one GEMM
    gemv_linears: int  # modules that run the GEMV kernel for <= MAX_ROWS rows on CUDA
    cublas_shapes: tuple[tuple[int, int, int], ...]  # (rows, out, in) that tuning kept on F.linear (cuBLAS)
    gemv_reason: str  # why the kernel is or is not used
    swa_attention_layers: int = 0  # GateSWA layers whose decode attention is not SDPA (see swa_attention)

    def summary(self) -> str:
        kept = ", ".join(f"{r}x[{n}, {k}]" for r, n, k in self.cublas_shapes) or "none"
        return (f"decode: {self.groups_fused} projection groups fused; gemv kernel on {self.gemv_linears} linears "
                f"({self.gemv_reason}); shapes kept on cuBLAS after tuning: {kept}; GateSWA layers off SDPA for decode: "
                f"{self.swa_attention_layers}")


def choose_gemv(gemv: bool | str, device_types: set[str], triton_available: bool) -> tuple[bool, str]:
    """Whether :func:`prepare_for_decode` runs the GEMV kernel, and why. ``gemv``: ``"auto"`` (the kernel where
    it can run: weights on CUDA and Triton importable), ``True`` (required: refused where it cannot run) or
    ``False``. Raises ValueError for any other value and for ``True`` where the kernel cannot run."""
    if gemv not in ("auto", True, False) or not isinstance(gemv, (bool, str)):
        raise ValueError(f"prepare_for_decode: gemv={gemv!r} is not one of 'auto', True, False")
    if gemv is False:
        return False, "gemv=False"
    blocker = ("the weights are not on CUDA (" + ", ".join(sorted(device_types)) + ")"
               if "cuda" not in device_types else None if triton_available else "Triton is not installed")
    if blocker is None:
        return True, "CUDA, Triton available"
    if gemv is True:
        raise ValueError(f"prepare_for_decode: gemv=True but the kernel cannot run: {blocker}; use gemv='auto'")
    return False, blocker


def _check_inference_only(model: nn.Module) -> None:
    training = next((name or "the model" for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise DecodeOnlyError(f"prepare_for_decode: {training} is in training mode; the decode transforms are "
                              "inference-only: call model.eval().requires_grad_(False) first")
    grad = next((name for name, p in model.named_parameters() if p.requires_grad), None)
    if grad is not None:
        raise DecodeOnlyError(f"prepare_for_decode: parameter {grad} requires grad; the decode transforms are "
                              "inference-only (fused weights get no gradient): call model.requires_grad_(False) first")


def prepare_for_decode(model: nn.Module, *, fuse: bool = True, gemv: bool | str = "auto",
                       tune_rows: Sequence[int] = (1,), swa_attention: str = "auto") -> DecodePreparation:
    """Make ``model`` (any loaded decoder: converted in-repo, exported ``auto_map`` or native ``deepseek_v3``,
    a stock teacher) decode faster, in place, for inference only; then call ``generate`` as usual.

    ``fuse``: :func:`fuse_decode_projections`. ``gemv``: :func:`use_gemv_linears` on CUDA (see
    :func:`choose_gemv`). ``tune_rows``: the batch sizes (rows per decode step, <= ``MAX_ROWS``) to tune the
    kernel for against cuBLAS now, outside any graph capture. ``swa_attention``: GateSWA decode attention,
    ``"reductions"`` / ``"kernel"`` / ``"sdpa"`` (:func:`set_swa_decode_attention`), or ``"auto"``
    (:func:`auto_swa_attention`: the kernel on CUDA with Triton). Refuses (:class:`DecodeOnlyError`) a model in
    training mode or with parameters that require grad. Afterwards, when projections were fused, building
    the state dict (``save_pretrained``, the project's export) is refused: save before preparing."""
    _check_inference_only(model)
    device_types = {p.device.type for p in model.parameters()}
    from ascend_edit.kernels.triton import gemv as gemv_kernel

    if swa_attention not in ("auto", *SWA_DECODE_ATTENTION):
        raise ValueError(f"prepare_for_decode: swa_attention={swa_attention!r} is not one of "
                         f"{['auto', *SWA_DECODE_ATTENTION]}")
    use_kernel, reason = choose_gemv(gemv, device_types, gemv_kernel.triton_available())
    fused = fuse_decode_projections(model) if fuse else 0
    modules, kept = _switch_to_gemv(model, KERNEL_DEVICES, tune_rows) if use_kernel else ([], [])
    if swa_attention == "auto":
        swa_attention = auto_swa_attention(device_types, gemv_kernel.triton_available())
    swa_layers = set_swa_decode_attention(model, swa_attention) if swa_attention != "sdpa" else 0
    result = DecodePreparation(fused, len(modules), tuple(kept), reason, swa_layers)
    log.info("%s", result.summary())
    return result


def decode_linear_label(linears: str, fuse_projections: bool) -> str:
    """The row label of a benchmark variant: ``cublas`` / ``gemv``, ``+fused`` when projections are fused."""
    return linears + ("+fused" if fuse_projections else "")
