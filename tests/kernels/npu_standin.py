"""STAND-INS (test doubles) for the torch_npu / MindSpeed operators the project calls.

Nothing here is Ascend hardware, and nothing here proves anything about the real kernels'
numerics or speed. Each stand-in is plain PyTorch written from the operator's *documented
contract* (torch_npu API reference on hiascend.com, MindSpeed's ops documentation), never from
the project's adapters, so that an adapter test asks one question: does the adapter speak the
documented contract? Where the documentation leaves something open, the stand-in takes the
strictest reading and says so (``NotImplementedError`` / ``AssertionError``), so the adapters are
pushed towards inputs every documented release accepts.

Every call is recorded in ``NpuStandIn.calls`` (op name + the arguments that matter), which lets
tests assert *how* an adapter called an op -- e.g. that no dense ``[s, t]`` mask was sent.

Ops covered:

* ``npu_fusion_attention`` / ``npu_fusion_attention_grad`` (training / prefill flash attention)
* ``npu_fused_infer_attention_score`` (inference flash attention, incl. MLA ``query_rope`` / ``key_rope``)
* ``npu_rms_norm``, ``npu_rotary_mul``, ``npu_swiglu``
* MindSpeed ``mindspeed.ops.npu_rotary_position_embedding.npu_rotary_position_embedding``
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import torch

UNLIMITED = 2147483647
COMPRESSED = 2048
STAT_WIDTH = 8


def compressed_triu(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool, device=device), diagonal=1)


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec works on it
    return module


class NpuStandIn:
    """TEST DOUBLE of torch_npu (and MindSpeed's rotary op), written from their documented contracts.

    Contract points emulated (strictest reading where the docs are loose):

    ``npu_fusion_attention``
      * layouts BNSD and TND (``actual_seq_qlen`` / ``actual_seq_kvlen`` cumulative, masks per
        sequence); ``head_num`` = query heads; key/value heads divide it (GQA);
      * one head dim D for query, key and value (the older releases' contract), D <= 512;
      * ``atten_mask`` bool, True = masked out; shapes SS / 11SS / B1SS / BNSS;
      * sparse_mode 0: the given mask (plus the band ``-pre <= j - i <= next``; both ignored
        without a mask); 1: the given mask; 2: causal aligned top-left (``j > i`` masked);
        3: causal aligned bottom-right (``j - i > Skv - Sq`` masked); 4: band
        ``-pre <= j - i <= next`` (Sq == Skv only: the alignment for Sq != Skv is not pinned down
        by the sources read). Modes 2-4 require the compressed 2048 x 2048 ``triu(1)`` mask;
      * a fully masked row yields NaN (worst case: an adapter must never send one);
      * returns ``(out, softmax_max, softmax_sum, softmax_out, seed, offset, numel)`` with the
        statistics fp32 ``[B, N, S, 8]`` / ``[T, N, 8]``: row max of the scaled, masked scores and
        the row sum of ``exp(score - max)``.

    ``npu_fusion_attention_grad``
      * recomputes the probabilities from the *given* ``softmax_max`` / ``softmax_sum``
        (``P = exp(score - max) / sum``) and takes ``D = rowsum(dy * attention_in)`` from the
        *given* forward output -- which is what lets block-wise (ring / two-pass) attention feed
        it merged statistics and the merged output;
      * ``keep_prob == 1`` only.

    ``npu_fused_infer_attention_score`` (v1 names; ``softmax_lse_flag`` returns the LSE)
      * layouts BNSD / BSND; ``num_heads`` query heads, ``num_key_value_heads`` (0 = same);
      * ``atten_mask`` bool True = masked, ``[B, 1, Sq, Skv]`` / ``[B, Skv]`` (Sq = 1) / ``[Sq, Skv]``;
        sparse_mode 0 (given mask; pre/next must stay default) or 3 (bottom-right causal,
        compressed mask); ``actual_seq_lengths_kv``: per batch, keys beyond it are masked;
      * MLA (``query_rope`` / ``key_rope`` given): D = 512, rope D = 64, one KV head, query heads in
        {32, 64, 128}, key and value the same latent tensor, fp16/bf16 only, Sq <= 16;
        scores = (q . k + q_rope . k_rope) * scale.

    ``npu_rms_norm(x, gamma, epsilon)`` -> ``(y, rstd)``: gamma's dtype must equal x's; rstd fp32.
    ``npu_rotary_mul(x, r1, r2, rotary_mode="half")`` (torch_npu API reference, A2 / A3 constraints,
      plus the older releases' BNSD limit): 4-D x / r1 / r2 of x's dtype (fp16 / bf16 / fp32); x in
      layout BNSD, BSND or SBND, told apart by r1's shape, which must be one of the documented
      broadcasts (BNSD: 11SD, B1SD, BNSD; BSND: 1S1D, BS1D, BSND; SBND: S11D, SB1D, SBND); r1 / r2
      within [-1, 1]; D even and < 896; B, N < 1000; B * N <= 1024 when r1 / r2 need a gradient; in
      BNSD not B * N > 8 * S (older releases). Strictest reading where the docs are silent: x
      contiguous (the docs name layouts, not strides). ``half`` and ``interleave`` modes.
    ``npu_swiglu(x, dim=-1)``: x contiguous, size along ``dim`` even; ``silu(A) * B``.
    MindSpeed ``npu_rotary_position_embedding(x, cos, sin, mode=0)`` (MindSpeed docs/ops): the same
      layouts, broadcasts and limits (its D limit, < 2000, is looser; the stand-in keeps 896),
      mode 0 = half, 1 = interleave.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    # -- installation ---------------------------------------------------------------------------
    def torch_npu_module(self) -> types.ModuleType:
        module = _module("torch_npu")
        for name in ("npu_fusion_attention", "npu_fusion_attention_grad", "npu_fused_infer_attention_score",
                     "npu_rms_norm", "npu_rotary_mul", "npu_swiglu"):
            setattr(module, name, getattr(self, name))
        return module

    def mindspeed_modules(self) -> dict[str, types.ModuleType]:
        rope = _module("mindspeed.ops.npu_rotary_position_embedding")
        rope.npu_rotary_position_embedding = self.npu_rotary_position_embedding
        ops = _module("mindspeed.ops")
        ops.npu_rotary_position_embedding = rope
        root = _module("mindspeed")
        root.ops = ops
        return {"mindspeed": root, "mindspeed.ops": ops, "mindspeed.ops.npu_rotary_position_embedding": rope}

    def install(self, monkeypatch, *, mindspeed: bool = False) -> NpuStandIn:
        monkeypatch.setitem(sys.modules, "torch_npu", self.torch_npu_module())
        if mindspeed:
            for name, module in self.mindspeed_modules().items():
                monkeypatch.setitem(sys.modules, name, module)
        return self

    def ops_called(self) -> list[str]:
        return [c["op"] for c in self.calls]

    # ==========================================================================================
    # npu_fusion_attention / _grad
    # ==========================================================================================
    def npu_fusion_attention(
        self, query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
        scale=1.0, keep_prob=1.0, pre_tockens=UNLIMITED, next_tockens=UNLIMITED, inner_precise=0,
        prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
        sync=False, softmax_layout="",
    ):  # fmt: skip
        self._record("npu_fusion_attention", query, key, value, head_num, input_layout, atten_mask, sparse_mode,
                     pre_tockens, next_tockens, actual_seq_qlen, actual_seq_kvlen, scale, softmax_layout=softmax_layout)
        assert pse is None and padding_mask is None and prefix is None, "not covered by the stand-in"
        self._check_fa_dims(query, key, value)
        out, row_max, row_sum = self._per_layout(
            self._fa_forward_bnsd, (query, key, value), input_layout, actual_seq_qlen, actual_seq_kvlen,
            head_num=head_num, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob, pre=pre_tockens,
            nxt=next_tockens, mode=sparse_mode,
        )  # fmt: skip
        if input_layout == "TND" and softmax_layout != "TND":  # the documented default: head-major per sequence
            row_max, row_sum = (self._stats_layout(x, actual_seq_qlen, to_head_major=True) for x in (row_max, row_sum))
        return out, row_max, row_sum, query.new_empty(0), 0, 0, 0

    def npu_fusion_attention_grad(
        self, query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None, atten_mask=None,
        softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None, scale_value=1.0,
        keep_prob=1.0, pre_tockens=UNLIMITED, next_tockens=UNLIMITED, inner_precise=0, seed=0, offset=0,
        numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False, softmax_layout="",
    ):  # fmt: skip
        self._record("npu_fusion_attention_grad", query, key, value, head_num, input_layout, atten_mask,
                     sparse_mode, pre_tockens, next_tockens, actual_seq_qlen, actual_seq_kvlen, scale_value,
                     softmax_layout=softmax_layout)
        assert keep_prob == 1.0, "the stand-in's backward covers keep_prob == 1 only"
        assert softmax_max is not None and softmax_sum is not None and attention_in is not None
        assert softmax_max.dtype == torch.float32 and softmax_sum.dtype == torch.float32
        if input_layout == "TND" and softmax_layout != "TND":  # read as the default layout describes them
            softmax_max, softmax_sum = (self._stats_layout(x, actual_seq_qlen, to_head_major=False)
                                        for x in (softmax_max, softmax_sum))
        dq, dk, dv = self._per_layout(
            self._fa_grad_bnsd, (query, key, value, dy, softmax_max, softmax_sum, attention_in), input_layout,
            actual_seq_qlen, actual_seq_kvlen, head_num=head_num, atten_mask=atten_mask, scale=scale_value,
            pre=pre_tockens, nxt=next_tockens, mode=sparse_mode,
        )  # fmt: skip
        return dq, dk, dv, query.new_empty(0)

    @staticmethod
    def _stats_layout(stats, cum_q, to_head_major: bool):
        """TND statistics in a ``[T, N, 8]`` buffer: token-major (``softmax_layout="TND"``) or, the documented
        default ("NTD"), each sequence's block laid out head-major ``[N, s, 8]`` in the same buffer (how MindSpeed's
        ``flatten_softmax`` reads it)."""
        blocks = []
        for q0, q1 in zip([0, *cum_q[:-1]], cum_q):
            block, (s, n, w) = stats[q0:q1], stats[q0:q1].shape
            blocks.append(block.transpose(0, 1).reshape(s, n, w) if to_head_major
                          else block.reshape(n, s, w).transpose(0, 1))
        return torch.cat(blocks).contiguous()

    @staticmethod
    def _check_fa_dims(q, k, v) -> None:
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], (
            f"one head dim for query, key and value (got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]})"
        )
        assert q.shape[-1] <= 512, "head dim must be <= 512"
        assert q.dtype == k.dtype == v.dtype

    @staticmethod
    def _per_layout(fn, tensors, layout, cum_q, cum_kv, **kwargs):
        """Run ``fn`` on BNSD views: tensors[1:3] are key-like, every other one is query-like."""
        if layout == "TND":
            assert cum_q is not None and cum_kv is not None, "TND needs actual_seq_qlen / actual_seq_kvlen"
            assert len(cum_q) == len(cum_kv), "one kv length per query sequence"
            assert cum_q[-1] == tensors[0].shape[0] and cum_kv[-1] == tensors[1].shape[0]
            assert all(b > a for a, b in zip([0, *cum_q], cum_q)), "empty query sequences are not covered"
            assert all(b > a for a, b in zip([0, *cum_kv], cum_kv)), "empty kv sequences are not covered"
            pieces = []
            for q0, q1, k0, k1 in zip([0, *cum_q[:-1]], cum_q, [0, *cum_kv[:-1]], cum_kv):
                seq = [x[k0:k1] if i in (1, 2) else x[q0:q1] for i, x in enumerate(tensors)]
                seq = [x.transpose(0, 1)[None] for x in seq]  # [T, N, D] -> [1, N, S, D]
                pieces.append([r[0].transpose(0, 1) for r in fn(*seq, **kwargs)])
            return tuple(torch.cat(parts) for parts in zip(*pieces))
        assert layout == "BNSD", f"layout {layout} not covered by the stand-in"
        return fn(*tensors, **kwargs)

    def _fa_scores(self, q, k, head_num, atten_mask, scale, pre, nxt, mode):
        n1, s1, n2, s2 = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        assert head_num == n1, f"head_num {head_num} != query heads {n1}"
        assert n1 % n2 == 0, "key/value heads must divide query heads"
        masked = self._fa_masked(atten_mask, mode, pre, nxt, s1, s2, q.device)
        k = k.repeat_interleave(n1 // n2, dim=1)
        scores = torch.einsum("bnsd,bntd->bnst", q.float(), k.float()) * scale
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        return scores

    def _fa_forward_bnsd(self, q, k, v, *, head_num, atten_mask, scale, keep_prob, pre, nxt, mode):
        b, n1, s1, _ = q.shape
        scores = self._fa_scores(q, k, head_num, atten_mask, scale, pre, nxt, mode)
        row_max = scores.amax(dim=-1, keepdim=True)  # -inf on a fully masked row -> NaN below
        row_sum = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
        probs = torch.exp(scores - row_max) / row_sum
        if keep_prob < 1.0:
            probs = torch.nn.functional.dropout(probs, p=1.0 - keep_prob)
        v = v.repeat_interleave(n1 // v.shape[1], dim=1)
        out = torch.einsum("bnst,bntd->bnsd", probs, v.float()).to(q.dtype)
        stat = (b, n1, s1, STAT_WIDTH)
        return out, row_max.expand(stat).contiguous(), row_sum.expand(stat).contiguous()

    def _fa_grad_bnsd(self, q, k, v, dy, softmax_max, softmax_sum, attention_in, *, head_num, atten_mask,
                      scale, pre, nxt, mode):  # fmt: skip
        n1, n2 = q.shape[1], k.shape[1]
        group = n1 // n2
        scores = self._fa_scores(q, k, head_num, atten_mask, scale, pre, nxt, mode)
        probs = torch.exp(scores - softmax_max[..., :1]) / softmax_sum[..., :1]  # from the GIVEN statistics
        k_rep = k.repeat_interleave(group, dim=1).float()
        v_rep = v.repeat_interleave(group, dim=1).float()
        dy = dy.float()
        d_probs = torch.einsum("bnsd,bntd->bnst", dy, v_rep)
        delta = (dy * attention_in.float()).sum(dim=-1, keepdim=True)  # from the GIVEN forward output
        d_scores = probs * (d_probs - delta)
        dq = torch.einsum("bnst,bntd->bnsd", d_scores, k_rep) * scale
        dk = torch.einsum("bnst,bnsd->bntd", d_scores, q.float()) * scale
        dv = torch.einsum("bnst,bnsd->bntd", probs, dy)
        b, _, t, _ = k.shape
        dk = dk.reshape(b, n2, group, t, -1).sum(dim=2)
        dv = dv.reshape(b, n2, group, t, -1).sum(dim=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    def _fa_masked(atten_mask, mode, pre, nxt, s1, s2, device):
        i = torch.arange(s1, device=device)[:, None]
        j = torch.arange(s2, device=device)[None, :]
        band_out = (j - i > nxt) | (i - j > pre)
        if mode in (2, 3, 4):
            assert atten_mask is not None and atten_mask.dtype == torch.bool
            assert torch.equal(atten_mask, compressed_triu(device)), "modes 2-4 take the compressed triu mask"
            if mode == 2:
                return j > i
            if mode == 3:
                return j - i > s2 - s1
            if s1 != s2:
                raise NotImplementedError("band alignment for Sq != Skv is not covered by the stand-in")
            return band_out
        assert mode in (0, 1), f"sparse_mode {mode} not covered by the stand-in"
        if atten_mask is None:
            return None
        assert atten_mask.dtype == torch.bool, "atten_mask must be bool (True = masked out)"
        assert atten_mask.dim() in (2, 4) and atten_mask.shape[-2:] == (s1, s2), tuple(atten_mask.shape)
        return atten_mask if mode == 1 else atten_mask | band_out

    # ==========================================================================================
    # npu_fused_infer_attention_score
    # ==========================================================================================
    def npu_fused_infer_attention_score(
        self, query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
        actual_seq_lengths_kv=None, query_rope=None, key_rope=None, num_heads=1, scale=1.0,
        pre_tokens=UNLIMITED, next_tokens=UNLIMITED, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, softmax_lse_flag=False, block_table=None, **unused,
    ):  # fmt: skip
        self._record("npu_fused_infer_attention_score", query, key, value, num_heads, input_layout, atten_mask,
                     sparse_mode, pre_tokens, next_tokens, actual_seq_lengths, actual_seq_lengths_kv, scale,
                     query_rope=None if query_rope is None else tuple(query_rope.shape),
                     key_rope=None if key_rope is None else tuple(key_rope.shape))
        assert pse_shift is None and block_table is None and actual_seq_lengths is None
        assert not any(v is not None for v in unused.values()), f"not covered: {sorted(unused)}"
        assert input_layout in ("BNSD", "BSND"), f"layout {input_layout} not covered by the stand-in"
        assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous(), "no non-contiguous input"
        to_bnsd = (lambda x: x) if input_layout == "BNSD" else (lambda x: x.transpose(1, 2))
        q, k, v = to_bnsd(query), to_bnsd(key), to_bnsd(value)
        b, n1, s1, d = q.shape
        n2, s2 = k.shape[1], k.shape[2]
        assert num_heads == n1, f"num_heads {num_heads} != query heads {n1}"
        assert (num_key_value_heads or n1) == n2 and n1 % n2 == 0
        scores = torch.einsum("bnsd,bntd->bnst", q.float(), k.repeat_interleave(n1 // n2, 1).float())
        if query_rope is not None or key_rope is not None:
            assert query_rope is not None and key_rope is not None, "query_rope and key_rope come together"
            assert d == 512 and query_rope.shape[-1] == 64, "MLA: D = 512 and rope D = 64"
            assert n2 == 1 and n1 in (32, 64, 128), "MLA: one KV head, 32 / 64 / 128 query heads"
            assert key is value or torch.equal(key, value), "MLA: key and value are the same latent"
            assert query.dtype in (torch.float16, torch.bfloat16), "MLA: fp16 / bf16 only"
            assert s1 <= 16, "MLA: at most 16 query tokens"
            qr, kr = to_bnsd(query_rope), to_bnsd(key_rope)
            assert qr.shape[:3] == (b, n1, s1) and kr.shape[:3] == (b, 1, s2)
            scores = scores + torch.einsum("bnsr,btr->bnst", qr.float(), kr[:, 0].float())
        else:
            assert query.dtype in (torch.float16, torch.bfloat16), "the fused inference op takes fp16 / bf16 only"
        scores = scores * scale
        masked = torch.zeros(b, 1, s1, s2, dtype=torch.bool, device=q.device)
        if sparse_mode == 3:
            assert torch.equal(atten_mask, compressed_triu(q.device)), "sparse_mode 3 takes the compressed mask"
            i = torch.arange(s1, device=q.device)[:, None]
            j = torch.arange(s2, device=q.device)[None, :]
            masked = masked | (j - i > s2 - s1)
        else:
            assert sparse_mode == 0, f"sparse_mode {sparse_mode} not covered by the stand-in"
            assert pre_tokens == UNLIMITED and next_tokens == UNLIMITED, "mode 0: band not covered"
            if atten_mask is not None:
                assert atten_mask.dtype == torch.bool, "atten_mask must be bool (True = masked out)"
                if atten_mask.dim() == 2 and s1 == 1 and atten_mask.shape == (b, s2):
                    masked = masked | atten_mask[:, None, None, :]
                else:
                    assert atten_mask.shape in ((b, 1, s1, s2), (s1, s2)), tuple(atten_mask.shape)
                    masked = masked | atten_mask
        if actual_seq_lengths_kv is not None:
            lens = torch.as_tensor(list(actual_seq_lengths_kv), device=q.device)
            assert lens.shape == (b,) and bool((lens >= 1).all()) and bool((lens <= s2).all())
            masked = masked | (torch.arange(s2, device=q.device)[None, None, None, :] >= lens[:, None, None, None])
        scores = scores.masked_fill(masked, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf row -> NaN output below
        probs = torch.exp(scores - lse)
        out = torch.einsum("bnst,bntd->bnsd", probs, v.repeat_interleave(n1 // n2, 1).float()).to(query.dtype)
        out = out if input_layout == "BNSD" else out.transpose(1, 2).contiguous()
        return out, (lse if softmax_lse_flag else query.new_empty(0).float())

    # ==========================================================================================
    # Fused decoder-layer ops (differentiable torch code: the real ops ship their own backward)
    # ==========================================================================================
    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append({"op": "npu_rms_norm", "shape": tuple(x.shape), "dtype": x.dtype, "epsilon": epsilon})
        assert x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert gamma.dtype == x.dtype, f"gamma dtype {gamma.dtype} must equal the input's {x.dtype}"
        assert 2 <= x.dim() <= 8 and gamma.shape == x.shape[x.dim() - gamma.dim():]
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half"):
        self.calls.append({"op": "npu_rotary_mul", "shape": tuple(x.shape), "r_shape": tuple(r1.shape),
                           "mode": rotary_mode})
        self._check_rotary(x, r1, r2)
        return _rotate(x, r1, r2, interleaved={"half": False, "interleave": True}[rotary_mode])

    def npu_rotary_position_embedding(self, x, cos, sin, mode=0):
        self.calls.append({"op": "npu_rotary_position_embedding", "shape": tuple(x.shape),
                           "r_shape": tuple(cos.shape), "mode": mode})
        self._check_rotary(x, cos, sin)
        return _rotate(x, cos, sin, interleaved={0: False, 1: True}[mode])

    def npu_swiglu(self, x, dim=-1):
        self.calls.append({"op": "npu_swiglu", "shape": tuple(x.shape), "dim": dim})
        assert x.is_contiguous(), "npu_swiglu: no non-contiguous input"
        assert x.numel() > 0 and x.shape[dim] % 2 == 0, "split dim must be even"
        a, b = x.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def _check_rotary(x, r1, r2) -> None:
        assert x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "rotary ops take 4-D tensors"
        assert x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert r1.shape == r2.shape and r1.dtype == r2.dtype == x.dtype, "cos / sin: one shape, x's dtype"
        assert x.is_contiguous(), "strictest reading: a contiguous x in one of the documented layouts"
        layouts = rotary_layouts(tuple(x.shape), tuple(r1.shape))
        assert layouts, f"cos / sin {tuple(r1.shape)} is no documented broadcast for x {tuple(x.shape)}"
        d = x.shape[-1]
        assert d % 2 == 0 and d < 896, f"head dim {d} must be even and < 896"
        assert bool((r1.abs() <= 1).all()) and bool((r2.abs() <= 1).all()), "cos / sin must lie in [-1, 1]"
        grad = r1.requires_grad or r2.requires_grad
        problems = {name: _rotary_limit_problem(name, b, n, s, grad) for name, (b, n, s) in layouts.items()}
        # cos / sin of x's full shape fit several layouts; which reading the kernel takes is not
        # documented and the result is the same elementwise, so one reading within the limits suffices.
        assert any(p is None for p in problems.values()), f"rotary limits: {problems}"

    # -- recording --------------------------------------------------------------------------
    def _record(self, op, q, k, v, heads, layout, atten_mask, sparse_mode, pre, nxt, cum_q, cum_kv, scale,
                **extra):  # fmt: skip
        self.calls.append({
            "op": op, "q_shape": tuple(q.shape), "k_shape": tuple(k.shape), "v_shape": tuple(v.shape),
            "heads": heads, "layout": layout, "sparse_mode": sparse_mode, "pre_tokens": pre, "next_tokens": nxt,
            "atten_mask": atten_mask, "mask_shape": None if atten_mask is None else tuple(atten_mask.shape),
            "actual_seq_qlen": None if cum_q is None else list(cum_q),
            "actual_seq_kvlen": None if cum_kv is None else list(cum_kv), "scale": scale, **extra,
        })  # fmt: skip


def _rotate(x, cos, sin, *, interleaved: bool):
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def rotary_layouts(x_shape: tuple, r_shape: tuple) -> dict[str, tuple[int, int, int]]:
    """The documented layouts of the rotary ops ``r_shape`` fits, each with x's (B, N, S) read in it."""
    a, b, c, d = x_shape
    documented = {
        "BNSD": ([(1, 1, c, d), (a, 1, c, d), (a, b, c, d)], (a, b, c)),
        "BSND": ([(1, b, 1, d), (a, b, 1, d), (a, b, c, d)], (a, c, b)),
        "SBND": ([(a, 1, 1, d), (a, b, 1, d), (a, b, c, d)], (b, c, a)),
    }
    return {name: bns for name, (shapes, bns) in documented.items() if r_shape in shapes}


def _rotary_limit_problem(layout: str, b: int, n: int, s: int, grad: bool) -> str | None:
    if b >= 1000 or n >= 1000:
        return "B, N < 1000"
    if grad and b * n > 1024:
        return "B*N <= 1024 when cos / sin need a gradient"
    if layout == "BNSD" and b * n > 8 * s:
        return "layout BNSD: B*N > 8*S is not supported (older releases)"
    return None
