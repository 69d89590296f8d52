"""AdamW whose fp32 state lives in host memory and is stepped on the device, chunk by chunk.

`engine.kind=torch engine.offload_optimizer=true`. At one device the 8B recipes' stage 2 fits in ~60 % of
the plain baseline's memory only if the fp32 masters and the AdamW moments (12 B per trainable parameter:
20 GiB for the 1.75 B MLA targets) leave the device. DeepSpeed's ZeRO offload steps them on the host
(1.6 s for 1.75 B parameters with torch's fused CPU AdamW on 16 threads, docs/scaling.md run E3). Here
they stay in pinned host memory, but each chunk travels to the device, is stepped there by the fused
AdamW kernel and travels back: the link carries 12 B per parameter each way, overlapped with the update
through three chunk buffers (0.44 s for the same 1.75 B, run E3).

What lives where:

* device: each parameter in the model's own dtype (bf16 for the large recipes: what the forward reads,
  so autocast keeps no second copy), and one fp32 gradient accumulator per parameter — every
  micro-batch's gradient is added into it by a post-accumulate hook, so 64 micro-batches are summed in
  fp32, not rounded to bf16 at each addition;
* host (pinned where there is an accelerator): each parameter's fp32 master and its two moments.

The update is torch's fused AdamW with `make_optimizer`'s hyper-parameters; the parameter becomes the
rounding of its updated master. On the CPU (tests) the same math runs in place, without streams.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

# 16 M elements: three fp32 buffers per slot, three slots = 0.56 GiB of device memory, kept for the stage;
# 64 MB copies, large enough to run at the link's full rate (run E3 streamed 32 M-element chunks).
CHUNK_ELEMENTS = 1 << 24
SLOTS = 3


class StreamedOffloadAdamW(torch.optim.Optimizer):
    """AdamW with fp32 masters and moments in host memory and fp32 gradient accumulators on the device
    (see the module docstring). `grads` are the accumulators, in parameter order: clip them, then `step`.
    The masters are not part of `state_dict` (the engine saves them as the trainable weights, in fp32);
    `load_masters` puts them back."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8, chunk_elements: int = CHUNK_ELEMENTS):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.device = params[0].device
        self.chunk_elements = chunk_elements
        self.fused = self.device.type in ("cuda", "cpu")  # torch's fused AdamW kernels
        pin = self.device.type != "cpu"
        with torch.no_grad():
            self.grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for p in params:
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["master"] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
        self._grad_of = {id(p): g for p, g in zip(params, self.grads)}
        self._touched: set[int] = set()  # parameters that got a gradient since the last step
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in params]
        self._copies: tuple | None = None  # (module, copy-in stream, copy-out stream), made at the first step
        self._slots: list[tuple[Tensor, Tensor, Tensor]] = []
        self._freed: list = [None] * SLOTS

    def _accumulate(self, param: nn.Parameter) -> None:
        """Move this micro-batch's gradient into the fp32 accumulator; the parameter keeps none."""
        if param.grad is not None:
            self._grad_of[id(param)].add_(param.grad)
            self._touched.add(id(param))
            param.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for grad in self.grads:
            grad.zero_()
        self._touched.clear()
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def close(self) -> None:
        """Remove the hooks and let the device buffers go (the engine's stage is over)."""
        self.synchronize()
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._slots, self.grads, self._grad_of = [], [], [], {}

    def synchronize(self) -> None:
        """Wait until the host holds the last step's states (before reading them: checkpoints)."""
        if self._copies is not None:
            self._copies[2].synchronize()

    def masters(self) -> list[Tensor]:
        self.synchronize()
        return [self.state[p]["master"] for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def load_masters(self, values: list[Tensor]) -> None:
        """Masters in parameter order (fp32 values of a checkpoint); the parameters become their rounding."""
        self.synchronize()
        params = [p for group in self.param_groups for p in group["params"]]
        for p, value in zip(params, values, strict=True):
            self.state[p]["master"].copy_(value)
            p.copy_(value)

    def state_dict(self) -> dict:
        self.synchronize()
        packed = super().state_dict()
        packed["state"] = {index: {k: v for k, v in entry.items() if k != "master"}
                           for index, entry in packed["state"].items()}
        return packed

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Step counts and moments copied into the pinned host buffers (the base class would move them to
        the parameters' device and dtype: the moments would be rounded to bf16 on the device)."""
        self.synchronize()
        params = [p for group in self.param_groups for p in group["params"]]
        kept = {p: self.state[p] for p in params}
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # hyper-parameters only
        ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        for index, p in zip(ids, params, strict=True):
            entry = saved.get(index, saved.get(str(index)))
            state = kept[p]
            if entry is not None:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    state[key].copy_(entry[key])
            self.state[p] = state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("StreamedOffloadAdamW takes no closure")
        # as torch's AdamW: a parameter that got no gradient this step is not stepped (no decay, no momentum)
        stepped = [(group, p) for group in self.param_groups for p in group["params"] if id(p) in self._touched]
        chunks = [(group, p, self._grad_of[id(p)], start, min(start + self.chunk_elements, p.numel()))
                  for group, p in stepped for start in range(0, p.numel(), self.chunk_elements)]
        if self.device.type == "cpu":
            for group, p, grad, start, stop in chunks:
                state = self.state[p]
                self._adamw(group, state["master"].view(-1)[start:stop], grad.view(-1)[start:stop],
                            state["exp_avg"].view(-1)[start:stop], state["exp_avg_sq"].view(-1)[start:stop],
                            state["step"].clone(), self.fused)
                p.view(-1)[start:stop].copy_(state["master"].view(-1)[start:stop])
        else:
            self._streamed(chunks)
        for _, p in stepped:
            self.state[p]["step"] += 1
        return None

    def _streamed(self, chunks: list) -> None:
        """Each chunk: host -> device (copy-in stream), AdamW and the parameter's rounding (compute stream),
        device -> host (copy-out stream); a slot is refilled only once its states are back on the host."""
        if self._copies is None:
            module = torch.get_device_module(self.device)
            self._copies = (module, module.Stream(self.device), module.Stream(self.device))
            self._slots = [tuple(torch.empty(self.chunk_elements, dtype=torch.float32, device=self.device)
                                 for _ in range(3)) for _ in range(SLOTS)]  # type: ignore[misc]
        module, copy_in, copy_out = self._copies
        compute = module.current_stream(self.device)
        copy_in.wait_stream(copy_out)  # the last step's states are on the host before they are read again
        copy_in.wait_stream(compute)  # and nothing queued before this step still uses the slots' memory
        for index, (group, p, grad, start, stop) in enumerate(chunks):
            slot, size, state = index % SLOTS, stop - start, self.state[p]
            host = [state[key].view(-1)[start:stop] for key in ("master", "exp_avg", "exp_avg_sq")]
            device = [buffer[:size] for buffer in self._slots[slot]]
            with module.stream(copy_in):
                if self._freed[slot] is not None:
                    copy_in.wait_event(self._freed[slot])
                for dst, src in zip(device, host):
                    dst.copy_(src, non_blocking=True)
                arrived = copy_in.record_event()
            compute.wait_event(arrived)
            # the count before this update; the fused kernel wants it on the device (it advances this copy),
            # the single-tensor AdamW (other devices) on the host. A fill, not a copy of the host value: a copy
            # from pageable memory would wait for the device.
            step = (torch.full((), float(state["step"]), dtype=torch.float32, device=self.device)
                    if self.fused else state["step"].clone())
            self._adamw(group, device[0], grad.view(-1)[start:stop], device[1], device[2], step, self.fused)
            p.view(-1)[start:stop].copy_(device[0])
            stepped = compute.record_event()
            with module.stream(copy_out):
                copy_out.wait_event(stepped)
                for dst, src in zip(host, device):
                    dst.copy_(src, non_blocking=True)
                self._freed[slot] = copy_out.record_event()

    @staticmethod
    def _adamw(group: dict, master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
               fused: bool = True) -> None:
        """torch's AdamW on one flat chunk — fused where torch ships the kernel (CUDA, CPU), its single-tensor
        form elsewhere (an NPU); `step` (the count before this update) is advanced in place."""
        beta1, beta2 = group["betas"]
        adamw([master], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True if fused else None,
              foreach=None if fused else False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def clip_gradients(grads: list[Tensor], max_norm: float | None) -> float:
    """Global-norm clipping of gradient tensors (torch's clip_grad_norm_ reads `.grad`, which the offloaded
    optimizer keeps empty); returns the norm before clipping, non-finite when a gradient is."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    value = float(norm)
    if max_norm and value > max_norm and value == value and value != float("inf"):
        scale = max_norm / (value + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return value
