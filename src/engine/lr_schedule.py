"""Learning-rate schedules as per-step arrays (the optimiser indexes them by its global step)."""
import math
from typing import Sequence

import numpy as np


def scaled_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the rate for base_batch images per step."""
    return base_lr * global_batch / base_batch


def build_lr_schedule(lr: float, steps_per_epoch: int, epochs: int, schedule: str = "step",
                      lr_steps: Sequence[int] = (8, 11), gamma: float = 0.1, warmup_iters: int = 500,
                      warmup_ratio: float = 1.0 / 3) -> np.ndarray:
    """Return float32 (epochs*steps_per_epoch,) learning rates.

    step: lr * gamma**(number of lr_steps epochs passed); cosine: half cosine from lr to 0.
    Both start with a linear warmup from warmup_ratio*lr to the scheduled value over
    warmup_iters steps (as mmdetection / the FCOS reference).
    """
    total = steps_per_epoch * epochs
    step = np.arange(total, dtype=np.float64)
    if schedule == "step":
        epoch = step // steps_per_epoch
        decays = np.zeros_like(step)
        for boundary in lr_steps:
            decays += epoch >= boundary
        rates = lr * gamma ** decays
    elif schedule == "cosine":
        rates = 0.5 * lr * (1.0 + np.cos(math.pi * step / max(total, 1)))
    else:
        raise ValueError(f"unknown lr schedule '{schedule}'")
    if warmup_iters > 0:
        alpha = np.minimum(step / warmup_iters, 1.0)
        rates *= warmup_ratio * (1.0 - alpha) + alpha
    return rates.astype(np.float32)
