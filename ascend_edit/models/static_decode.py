"""Greedy decoding through a transformers `StaticCache` with the decode step run as one fixed-shape graph.

`generate(..., cache_implementation="static")` compiles its decode step only on CUDA; this loop does the
same on any device, and is what the decode benchmark and the CPU tests drive:

* the prompt is prefilled eagerly (the bounded cache layers of converted models install themselves then);
* every decode step calls the model with fixed shapes — one token per row, its position, and a padding
  mask over all `max_cache_len` slots (future slots are hidden by causality) — so the step is one graph;
* `mode` picks how the step runs: "eager"; "compile" (`torch.compile(fullgraph=True)`: inductor fuses the
  step's small ops — norms, rotary, residuals, casts, cache bookkeeping — into a few generated kernels;
  `compile_mode` "reduce-overhead" on CUDA — CUDA graphs — and "default" elsewhere; "max-autotune" also lets
  inductor benchmark its own GEMM templates against the vendor library for the step's matmuls, and
  "max-autotune-gemm" that alone, with CUDA graphs);
  "cuda_graph" (the eager step captured with `torch.cuda.CUDAGraph` after two eager steps — autotuning must
  not run inside a capture — and replayed: no compile time, the same launch savings, no fusion).
* One decoder serves many prompts: `prefill` empties the cache in place first (`reset`), so its buffers
  keep their addresses and a compiled step or captured graph is reused, not rebuilt — the step's graph
  depends on the batch and `max_cache_len` only.

Works for any decoder-only transformers model: the teacher, the in-repo converted model, exported ones.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, StaticCache

MODES = ("eager", "compile", "cuda_graph")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "max-autotune-gemm")
# "max-autotune-gemm": CUDA graphs plus inductor's GEMM autotuning alone (its Triton templates against the vendor
# library for every matmul), without "max-autotune"'s coordinate-descent tuning of every fused kernel, which
# costs compile time for kernels that take a microsecond or two at decode.
GEMM_AUTOTUNE_OPTIONS = {"max_autotune_gemm": True, "triton.cudagraphs": True}
EAGER_STEPS_BEFORE_CAPTURE = 2


class StaticDecoder:
    def __init__(self, model: PreTrainedModel, batch: int, max_cache_len: int, *, mode: str = "compile",
                 compile_mode: str | None = None, backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} is not one of {COMPILE_MODES}")
        self.model = model
        self.batch = batch
        self.max_cache_len = max_cache_len
        self.mode = mode
        self.device = next(model.parameters()).device
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("mode='cuda_graph' needs a CUDA device")
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.mask = torch.ones(batch, max_cache_len, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._step: Callable[[], torch.Tensor] = self._eager_step
        self._holds_tokens = False  # whether the cache was fed since the last reset
        self.compile_mode: str | None = None
        if mode == "compile":
            compile_mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
            self.compile_mode = compile_mode
            if compile_mode == "max-autotune-gemm":
                self._compiled = torch.compile(self._forward, fullgraph=True, backend=backend,
                                               options=dict(GEMM_AUTOTUNE_OPTIONS))
            else:
                self._compiled = torch.compile(self._forward, fullgraph=True, mode=compile_mode, backend=backend)
            self._step = self._compiled_step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None
        self._eager_steps = 0
        self._stream = torch.cuda.Stream(self.device) if mode == "cuda_graph" else None

    # ----------------------------------------------------------------------------------------------
    def _forward(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, attention_mask=mask, cache=self.cache,
                         use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _eager_step(self) -> torch.Tensor:
        return self._forward(self.token, self.position, self.mask)

    def _compiled_step(self) -> torch.Tensor:
        return self._compiled(self.token, self.position, self.mask).clone()  # graph outputs are reused

    def _graph_step(self) -> torch.Tensor:
        assert self._graph is not None and self._graph_out is not None  # set by capture()
        self._graph.replay()
        return self._graph_out.clone()

    def capture(self) -> None:
        """mode='cuda_graph': record one decode step (it runs: the cache advances by one token)."""
        side = self._stream
        assert side is not None, "capture() is for mode='cuda_graph'"
        side.wait_stream(torch.cuda.current_stream())
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(self._graph, stream=side):
            self._graph_out = self._forward(self.token, self.position, self.mask)
        torch.cuda.current_stream().wait_stream(side)
        self._graph.replay()  # the capture itself does not run the work
        self._step = self._graph_step

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache in place (same buffers: compiled steps and captured graphs stay valid)."""
        self.cache.reset()
        self.mask.fill_(1)
        self.position.zero_()
        self.token.zero_()
        self._holds_tokens = False

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                chunk: int | None = None) -> torch.Tensor:
        """Feed the (left-padded) prompt eagerly; returns the first greedy token [b, 1]."""
        b, n = input_ids.shape
        if b != self.batch or n >= self.max_cache_len:
            raise ValueError(f"prompt {tuple(input_ids.shape)} does not fit batch {self.batch} and "
                             f"max_cache_len {self.max_cache_len}")
        if self._holds_tokens:  # a new prompt: the previous one's states go, the buffers stay
            self.reset()
        self._holds_tokens = True
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        self.mask[:, :n] = mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate: padding gets position 1
        chunk = chunk or n
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            out = self.model(input_ids=input_ids[:, start:end], position_ids=positions[:, start:end],
                             attention_mask=self.mask[:, :end], cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.position.copy_(positions[:, -1:] + 1)
        self.token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        return self.token.clone()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step: feeds the last token, returns the next one [b, 1]."""
        if self.mode == "cuda_graph" and self._graph is None and self._eager_steps >= EAGER_STEPS_BEFORE_CAPTURE:
            self.capture()
            assert self._graph_out is not None  # set by capture()
            nxt = self._graph_out.clone()
        elif self.mode == "cuda_graph" and self._graph is None:
            # Kernel autotuning and library workspaces happen outside the capture, on the capture's stream.
            side = self._stream
            assert side is not None  # made in __init__ for mode='cuda_graph'
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                nxt = self._eager_step()
            torch.cuda.current_stream().wait_stream(side)
            self._eager_steps += 1
        else:
            nxt = self._step()
        self.token.copy_(nxt)
        self.position.add_(1)
        return nxt

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 check_every: int = 16) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` greedy tokens, like `generate(do_sample=False)`.

        With `eos_token_id`, a row that has produced it continues with `pad_token_id` (fed back, as transformers
        does), and decoding stops once every row has ended: the same tokens as transformers' `generate`. Unlike
        transformers, the loop looks at the host only every `check_every` steps (each look waits for the GPU);
        the steps decoded past the end are trimmed off, so the result does not depend on `check_every`.
        """
        if input_ids.shape[1] + max_new_tokens > self.max_cache_len:
            raise ValueError(f"{input_ids.shape[1]} + {max_new_tokens} tokens exceed max_cache_len "
                             f"{self.max_cache_len}")
        if eos_token_id is not None and pad_token_id is None:
            raise ValueError("generate: eos_token_id needs pad_token_id (the token a row continues with once ended)")
        if check_every < 1:
            raise ValueError(f"generate: check_every={check_every} must be >= 1")
        tokens = [self.prefill(input_ids, attention_mask)]
        if eos_token_id is None:
            tokens += [self.step() for _ in range(max_new_tokens - 1)]
            return torch.cat([input_ids, *tokens], dim=1)
        assert pad_token_id is not None  # checked above
        ended = tokens[0] == eos_token_id  # [b, 1]
        for index in range(1, max_new_tokens):
            if index % check_every == 0 and bool(ended.all()):
                break
            token = self.step().masked_fill(ended, pad_token_id)
            self.token.copy_(token)  # an ended row feeds the padding token, as transformers' loop does
            ended = ended | (token == eos_token_id)
            tokens.append(token)
        new = torch.cat(tokens, dim=1)
        # Trim the steps decoded after the last row ended (transformers stops right there).
        ends = torch.where(new == eos_token_id, torch.arange(new.shape[1], device=new.device), new.shape[1])
        last = int(ends.min(dim=1).values.max())  # one look at the host, at the end
        return torch.cat([input_ids, new[:, : last + 1]], dim=1)
