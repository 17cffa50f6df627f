"""Learning-rate schedules as per-step arrays (the optimiser indexes them by its global step)."""
import math

import numpy as np


def scaled_lr(base_lr, base_batch, global_batch):
    """Linear scaling rule: base_lr is the rate for base_batch images per step."""
    return base_lr * global_batch / base_batch


def build_lr_schedule(lr, steps_per_epoch, epochs, schedule="step", lr_steps=(8, 11), gamma=0.1,
                      warmup_iters=500, warmup_ratio=1.0 / 3):
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
