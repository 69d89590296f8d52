"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Steps 0 .. warmup_steps-1 ramp linearly up to 1 (step 0 already trains, at 1/warmup_steps); then
    the multiplier follows half a cosine from 1 down to `min_lr_ratio`, reached at `total_steps` and
    held after it.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"total_steps={total_steps} and warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
