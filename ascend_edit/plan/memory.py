"""Per-rank memory and throughput model of one distillation stage (what `ascend-edit plan` prints).

Everything here is arithmetic on shapes and counts; no tensor is allocated. The inputs are the model's
shape (`ModelShape`, read from an HF config), the parameter counts of the edited model (counted on the
meta device by the task) and the run settings (`RunSettings`).

Memory parts (bytes per rank):
* frozen weights   — teacher attentions + every shared weight, in the model dtype; ZeRO-3 partitions them.
* teacher copy     — stage 2 with `trainable=target+norms|all` only: a frozen copy of the weights the stage trains
                     outside the targets (the norms; for `all` every shared weight), in the model dtype; frozen
                     weights are shared with it (distill/model_level.frozen_teacher; ZeRO-3 is refused for it).
* target weights   — torch engine: fp32 (they are the master copy), offloaded (train/offload.py) the model
                     dtype; DeepSpeed: the module dtype.
* fp32 masters     — DeepSpeed bf16/fp16 only (inside its optimizer; ZeRO >= 1 partitions them).
* optimizer states — AdamW exp_avg + exp_avg_sq, fp32 (ZeRO >= 1 partitions; offload moves them off).
* gradients        — of the targets: fp32 (torch engine) or the module dtype (DeepSpeed; ZeRO >= 2 partitions).
* activations      — what backward keeps, per token and layer, from the layer's shapes (see `_layer_bytes`),
                     with and without activation checkpointing, plus one layer of transient working memory.
* KD loss chunk    — stage 2: a few fp32 [chunk, vocab] tensors (16-bit ones when compiled), and the student
                     hidden-state gradient the chunked loss stores in forward.
* comm buffers     — DeepSpeed buckets (reduce / all-gather) and, under ZeRO-3, gathered layer weights.

Activation bytes model what autograd saves (bf16 tensors, fp32 norm inputs, flash-style attention that keeps
q, k, v, output and the log-sum-exp): eager PyTorch, or regional compilation (`RunSettings.compiled`), whose
partitioner recomputes the pointwise ops of norms and SwiGLU instead of saving them. The GPU benchmark
(benchmarks/mission_scale.py) prints the prediction beside the measured peak.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ascend_edit.train.offload import CHUNK_ELEMENTS as OFFLOAD_CHUNK
from ascend_edit.train.offload import SLOTS as OFFLOAD_SLOTS

GIB = 1024**3
FP32 = 4
# DeepSpeed's default bucket sizes (elements): reduce_bucket_size and allgather_bucket_size.
DS_BUCKET_ELEMENTS = 500_000_000
ADAM_STATES = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # dense MLP width (unused by MoE layers)
    experts: int = 0  # 0 = dense
    experts_per_token: int = 0
    expert_intermediate: int = 0

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   head_dim=head_dim, vocab=config.vocab_size, intermediate=config.intermediate_size,
                   experts=getattr(config, "num_experts", 0) or 0,
                   experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0,
                   expert_intermediate=getattr(config, "moe_intermediate_size", 0) or 0)

    @property
    def moe(self) -> bool:
        return self.experts > 0


@dataclass(frozen=True)
class TargetShape:
    """The converted attention's shape: MLA dims, or GateSWA's window and gate."""

    kind: str  # mla | gate_swa | identity
    converted_layers: int
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    window: int = 0  # gate_swa: sliding window (0 = full attention)
    swa_layers: int = 0  # gate_swa: how many converted layers slide


@dataclass(frozen=True)
class ParamCounts:
    frozen: int  # every parameter that is not trained (teacher attentions, shared weights)
    target: int  # trainable target parameters
    largest_layer: int  # parameters of the largest decoder layer (ZeRO-3 gathers one at a time)
    target_attention: int = 0  # parameters of the target attentions (part of `target`; a teacher copy has none)


@dataclass(frozen=True)
class RunSettings:
    stage: str  # layerwise | model_level
    seq_len: int
    micro_batch: int
    engine: str = "torch"  # torch | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    world_size: int = 1
    weight_bytes: int = 2  # bytes per frozen weight (model.dtype)
    checkpoint_every: int = 0  # 0 = no activation checkpointing; k = every k-th layer (1 = all)
    kd_chunk: int = 512  # distill.model_level.chunk_size
    compiled: str = "off"  # engine.compile as resolved for the cluster's device: layers | blocks | off
    kd_kind: str = "forward"  # distill.model_level.kl
    kd_fused: bool = False  # the KD chunk math compiled (chunked_kd.use_fused_kd: CUDA, full vocabulary, compile on)
    teacher_copy: bool = False  # stage 2 trains shared weights: a frozen copy of the teacher path is the teacher
    feature_layers: int = 0  # stage 2's feature matching: layers whose teacher states are kept for the loss
    reduce_bucket: int = DS_BUCKET_ELEMENTS  # engine.zero_options.reduce_bucket_size (elements)
    allgather_bucket: int = DS_BUCKET_ELEMENTS  # engine.zero_options.allgather_bucket_size (ZeRO-1/2)
    experts: str = "grouped_mm"  # engine.experts_implementation (auto runs grouped_mm): grouped_mm | eager | batched_mm


@dataclass
class Plan:
    parts: dict[str, float]  # bytes per rank, by part (the configured checkpointing policy)
    activations_without_ckpt: float
    activations_with_ckpt: float  # every layer checkpointed
    per_sequence: float  # bytes each extra sequence of micro-batch adds
    flops_per_token: float  # model FLOPs (no recompute) of one training token
    recompute_flops_per_token: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def largest_micro_batch(self, usable_bytes: float, micro_batch: int) -> int:
        """Largest micro-batch whose total fits `usable_bytes` (0: not even one sequence)."""
        fixed = self.total - micro_batch * self.per_sequence
        return max(0, int((usable_bytes - fixed) // self.per_sequence))

    def tokens_per_s(self, peak_flops: float, efficiency: float) -> float:
        return peak_flops * efficiency / (self.flops_per_token + self.recompute_flops_per_token)


# ----------------------------------------------------------------------------------------------------
# Activations: bytes autograd keeps per token of one layer (b = bytes of an activation, bf16 = 2)
# ----------------------------------------------------------------------------------------------------


def _norm_bytes(h: int, b: int) -> int:
    """RMSNorm in eager: the fp32 upcast input and the normalised output the next matmul saves."""
    return FP32 * h + b * h


def _attention_core_bytes(heads: int, kv_heads: int, d_qk: int, d_v: int, b: int) -> int:
    """Flash-style attention: q, k, v (after RoPE), output, log-sum-exp (fp32 per head)."""
    return b * (heads * d_qk + kv_heads * d_qk + kv_heads * d_v + heads * d_v) + FP32 * heads


def teacher_attention_bytes(m: ModelShape, b: int) -> int:
    """GQA with per-head q/k RMSNorm (Qwen3): projections, norm upcasts, RoPE, core, o_proj input."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    projections = b * (q + 2 * kv)  # q, k, v projection outputs
    qk_norms = FP32 * (q + kv)
    return projections + qk_norms + _attention_core_bytes(m.heads, m.kv_heads, m.head_dim, m.head_dim, b) + b * q


def target_attention_bytes(m: ModelShape, t: TargetShape, b: int) -> int:
    if t.kind == "mla":
        h, dqk, dv = m.heads, t.qk_nope_head_dim + t.qk_rope_head_dim, t.v_head_dim
        kv_b = b * h * (t.qk_nope_head_dim + dv)  # decompressed keys and values (v is a view of it)
        q_k = 2 * b * h * dqk  # q and k after the RoPE concatenation
        out = 2 * b * h * dv  # attention output and the o_proj input (heads transposed back)
        latent = FP32 * t.kv_lora_rank + b * t.kv_lora_rank + 2 * b * t.qk_rope_head_dim  # latent norm, rope key
        return kv_b + q_k + out + latent + FP32 * h  # + log-sum-exp
    base = teacher_attention_bytes(m, b)
    if t.kind == "gate_swa":
        # head-wise gate: its logits and sigmoid, and the gated output kept for o_proj
        return base + 2 * b * m.heads + b * m.heads * m.head_dim
    return base


def gathered_expert_weights(m: ModelShape, b: int) -> int:
    """Bytes per token that `batched_mm` gathers: the gate/up and down weights of each of its k experts (kept for
    backward, and made during every forward, no-grad ones too)."""
    return m.experts_per_token * 3 * m.hidden * m.expert_intermediate * b if m.moe else 0


def mlp_bytes(m: ModelShape, b: int, compiled: bool = False, experts: str = "grouped_mm") -> int:
    if not m.moe:
        # gate out (SiLU input), SiLU out and up out (the product is recomputed); a compiled block recomputes
        # the SiLU output too (the partitioner keeps matmul outputs and recomputes pointwise ops)
        return (2 if compiled else 3) * b * m.intermediate
    k, e = m.experts_per_token, m.expert_intermediate
    router = FP32 * m.experts  # routing probabilities
    # grouped experts: each of the k copies of a token keeps its gathered input, its gate/up output and
    # the product fed to down_proj; plus its routing weight and int64 indices
    grouped = router + k * (b * (m.hidden + 3 * e) + b + 3 * 8)
    # eager (a loop over the experts hit) also keeps each copy's selected input; batched_mm keeps the weights it
    # gathered per token: 75.5 MB per token and layer at Qwen3-30B-A3B's widths (measured to 0.1 % for grouped_mm,
    # within a few % for the others: docs/scaling.md)
    extra = {"eager": k * b * m.hidden, "batched_mm": gathered_expert_weights(m, b)}.get(experts, 0)
    return grouped + extra


def layer_bytes(m: ModelShape, t: TargetShape, b: int, stage: str, compiled: str = "off",
                experts: str = "grouped_mm") -> int:
    """Bytes per token one decoder layer keeps for backward in `stage`.

    `compiled="layers"` (whole layers under torch.compile): each RMSNorm keeps only its bf16 input (the fp32
    upcast and the normalised output are recomputed in backward) and the dense MLP its two matmul outputs;
    `"blocks"` (dense MLP blocks only) changes the MLP alone. Checked against peaks measured on an H200
    (docs/scaling.md): the eager model over-predicted compiled whole-layer runs by 22-28 %.
    """
    if stage == "layerwise":
        # Only the target attention trains; the teacher path runs without gradients. The target's output
        # stays for the layer's loss until the summed loss is backpropagated (measured on the CPU: the
        # loss keeps little else).
        return target_attention_bytes(m, t, b) + b * m.hidden
    norms = 2 * (b * m.hidden if compiled == "layers" else _norm_bytes(m.hidden, b))
    return norms + target_attention_bytes(m, t, b) + mlp_bytes(m, b, compiled in ("layers", "blocks"), experts)


def activation_bytes(m: ModelShape, t: TargetShape, s: RunSettings, checkpoint_every: int) -> float:
    """Activations of one micro-batch, with every `checkpoint_every`-th layer checkpointed (0 = none)."""
    tokens = s.micro_batch * s.seq_len
    b = 2  # activations are bf16 under autocast
    per_layer = layer_bytes(m, t, b, s.stage, s.compiled, s.experts)
    if s.stage == "layerwise" or checkpoint_every == 0:
        kept = m.layers * per_layer
    else:
        checkpointed = len(range(0, m.layers, checkpoint_every))
        # A checkpointed layer keeps its input; backward recomputes one layer at a time.
        kept = checkpointed * b * m.hidden + (m.layers - checkpointed) * per_layer + per_layer
    transient = b * (4 * m.hidden + 3 * max(m.intermediate if not m.moe else m.experts_per_token
                                            * m.expert_intermediate, m.hidden))
    if s.experts == "batched_mm":  # every forward of a layer gathers its tokens' expert weights, teacher's too
        transient += gathered_expert_weights(m, b)
    head = _norm_bytes(m.hidden, b) if s.stage == "model_level" else 0
    return tokens * (kept + transient + head)


# ----------------------------------------------------------------------------------------------------
# FLOPs per token
# ----------------------------------------------------------------------------------------------------


def _attention_context(seq_len: int, window: int) -> float:
    """Mean number of keys a causal query attends to (with an optional sliding window)."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    return window - window * (window - 1) / (2 * seq_len)


def flops_per_token(m: ModelShape, t: TargetShape, target_params: int, stage: str, seq_len: int,
                    checkpoint_every: int) -> tuple[float, float]:
    """(model FLOPs of one training token, extra FLOPs of activation recomputation)."""
    h = m.hidden
    teacher_attn = h * m.heads * m.head_dim * 2 + 2 * h * m.kv_heads * m.head_dim
    mlp = 3 * h * m.intermediate if not m.moe else m.experts_per_token * 3 * h * m.expert_intermediate + h * m.experts
    full_ctx = _attention_context(seq_len, 0)
    teacher_core = 2 * m.heads * (2 * m.head_dim) * full_ctx  # QK^T and AV per layer
    if t.kind == "mla":
        target_core = 2 * m.heads * (t.qk_nope_head_dim + t.qk_rope_head_dim + t.v_head_dim) * full_ctx
    else:
        slide = _attention_context(seq_len, t.window) if t.window else full_ctx
        mean_ctx = (t.swa_layers * slide + (t.converted_layers - t.swa_layers) * full_ctx) / max(t.converted_layers, 1)
        target_core = 2 * m.heads * (2 * m.head_dim) * mean_ctx
    target_per_layer = target_params / max(t.converted_layers, 1)
    teacher_fwd = m.layers * (2 * (teacher_attn + mlp) + teacher_core)
    if stage == "layerwise":
        # the targets' forward and backward (2x forward) on the teacher's hidden states
        return teacher_fwd + t.converted_layers * 3 * (2 * target_per_layer + target_core), 0.0
    head = 2 * h * m.vocab
    student_fwd = m.layers * (2 * mlp) + t.converted_layers * (2 * target_per_layer + target_core) + head
    # backward: input gradients through everything (= one forward) + weight gradients of the targets
    backward = student_fwd + t.converted_layers * (2 * target_per_layer + target_core)
    model_flops = teacher_fwd + head + student_fwd + backward
    recomputed = len(range(0, m.layers, checkpoint_every)) if checkpoint_every else 0
    recompute = (student_fwd - head) * recomputed / m.layers
    return model_flops, recompute


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------


def plan_stage(m: ModelShape, t: TargetShape, counts: ParamCounts, s: RunSettings) -> Plan:
    w, world, z = s.weight_bytes, s.world_size, s.zero_stage
    ds = s.engine == "deepspeed"
    notes: list[str] = []
    frozen = counts.frozen * w / (world if ds and z == 3 else 1)
    if ds and s.offload_params:
        frozen, notes = 0.0, notes + ["offload_params: frozen and target weights live in host memory"]
    if ds:
        target_weights = counts.target * w / (world if z == 3 else 1) * (0 if s.offload_params else 1)
        masters = 0.0 if w == FP32 else counts.target * FP32 / (world if z >= 1 else 1)
        # ZeRO-1/2 accumulate 16-bit models' gradients in fp32 (train/engine.deepspeed_config): partitioned
        # under ZeRO-2 and under offload, whole under plain ZeRO-1 (DeepSpeed's bf16 optimizer)
        accum = FP32 if w < FP32 and z in (1, 2) else w
        gradients = counts.target * accum / (world if z >= 2 or (z == 1 and s.offload_optimizer) else 1)
    elif s.offload_optimizer:
        # train/offload.py: the weights keep the model's dtype, their gradients accumulate in fp32 here
        target_weights, masters, gradients = counts.target * w, 0.0, counts.target * FP32
    else:
        # the fp32 master copy itself (train/precision.py), plus the bf16 copies autocast makes of it and
        # keeps for backward
        target_weights = counts.target * (FP32 + (w if w < FP32 else 0))
        masters = 0.0
        gradients = counts.target * FP32
    optimizer = counts.target * FP32 * ADAM_STATES / (world if ds and z >= 1 else 1)
    if ds and s.offload_optimizer:
        masters, optimizer = 0.0, 0.0
        # DeepSpeed's host copies: the fp32 master partition, its two AdamW states and its fp32 gradient
        host = counts.target * FP32 * (2 + ADAM_STATES) / (world if z >= 1 else 1)
        notes.append(f"offload_optimizer: fp32 masters, AdamW states and gradients live in host memory "
                     f"({host / GIB:.1f} GiB per rank)")
    elif s.offload_optimizer:
        # the fp32 masters and both moments in pinned host memory; on the device only the chunk buffers
        # they are streamed through while the optimizer steps
        host = counts.target * FP32 * (1 + ADAM_STATES)
        masters, optimizer = 0.0, float(OFFLOAD_SLOTS * 3 * OFFLOAD_CHUNK * FP32)
        notes.append(f"offload_optimizer: fp32 masters and AdamW states live in host memory ({host / GIB:.1f} "
                     f"GiB), streamed through {optimizer / GIB:.2f} GiB of device buffers at each step")
    if s.compiled != "off" and s.stage == "model_level":
        notes.append(f"activations as saved by regionally compiled {s.compiled} (engine.compile)")
    act_none = activation_bytes(m, t, s, 0)
    act_all = activation_bytes(m, t, s, 1)
    act = activation_bytes(m, t, s, s.checkpoint_every)
    kd = 0.0
    if s.stage == "model_level":
        # eager chunk math: ~3.5 fp32 [chunk, vocab] tensors; compiled: the two logits and the gradient in
        # the weights' dtype, and for reverse KL / JSD one fp32 tensor more (chunked_kd.kd_chunk_from_logits;
        # at Qwen3's head 0.47 / 0.76 GiB against 1.05 eager, docs/benchmarks.md). Plus the student
        # hidden-state gradient stored in forward.
        per_element = (3 * w + (FP32 if s.kd_kind != "forward" else 0)) if s.kd_fused else 3.5 * FP32
        kd = per_element * min(s.kd_chunk, s.micro_batch * s.seq_len) * m.vocab + 2 * s.micro_batch * s.seq_len * m.hidden
    comm = 0.0
    if ds and z >= 1:
        comm += min(s.reduce_bucket, counts.target) * w + (min(s.allgather_bucket, counts.target) * w if z <= 2 else 0)
    if ds and z == 3:
        comm += 2 * counts.largest_layer * w  # the gathered layer and the prefetched next one
    # made before the stage moves the trainable weights to fp32, in the model dtype: the weights the stage trains
    # outside the target attentions (every frozen weight is shared with the copy; distill/model_level.py)
    copied = counts.target - counts.target_attention
    teacher_copy = copied * w if s.teacher_copy and s.stage == "model_level" else 0.0
    # feature matching (distill.model_level.feature_weight > 0): the teacher's output states of every matched
    # layer, kept from the teacher pass until the loss; the student's are activations already counted, and the
    # loss recomputes its fp32 math in backward (distill/losses.feature_cosine_loss)
    feature = s.feature_layers * s.micro_batch * s.seq_len * m.hidden * w if s.stage == "model_level" else 0.0
    parts = {"frozen weights": frozen, "teacher copy": teacher_copy, "target weights": target_weights,
             "fp32 masters": masters,
             "optimizer states": optimizer, "gradients": gradients, "activations": act, "KD loss chunk": kd,
             "feature states": feature, "comm buffers": comm}
    per_sequence = (act + feature + (2 * s.seq_len * m.hidden if s.stage == "model_level" else 0)) / s.micro_batch
    model_flops, recompute = flops_per_token(m, t, counts.target, s.stage, s.seq_len, s.checkpoint_every)
    return Plan(parts, act_none, act_all, per_sequence, model_flops, recompute, notes)
