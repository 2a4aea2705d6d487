"""The learning rate as a pure function of the step (nothing to save, so resuming cannot drift): linear
warmup from 0 to the peak over `warmup` steps, then cosine, linear or constant decay to
`min_lr_ratio` x peak at the last step."""

from __future__ import annotations

import math

from llamalab.train.config import ScheduleConfig


def learning_rate(step: int, total: int, peak: float, cfg: ScheduleConfig) -> float:
    """The rate for optimizer step `step` (0-based) of `total`."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    if cfg.decay == "constant" or total <= cfg.warmup + 1:
        return peak
    progress = (step - cfg.warmup) / (total - 1 - cfg.warmup)
    floor = peak * cfg.min_lr_ratio
    if cfg.decay == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
