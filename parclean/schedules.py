"""Learning-rate schedules shared by the trainers (cleaning/train.py, toyworld/train_clip.py)."""

from __future__ import annotations

import math


def warmup_cosine(peak: float, warmup: int, step: int, total: int, end: float = 0.0) -> float:
    """The lr of step `step` (0-based): a linear warm-up over `warmup` steps to `peak`, then cosine from `peak` to
    `end` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(peak, end, step - warmup, total - warmup)


def cosine(top: float, end: float, step: int, length: int) -> float:
    """Half a cosine from `top` (step 0) to `end` (step `length` and after)."""
    progress = min(1.0, step / max(1, length))
    return end + 0.5 * (top - end) * (1 + math.cos(math.pi * progress))
