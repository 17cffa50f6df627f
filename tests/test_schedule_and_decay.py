"""The learning-rate schedules against their closed forms, and weight decay on the right
parameters through a real optimiser step of a real FCOS (hand-computed SGD with momentum)."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.engine.lr_schedule import build_lr_schedule, scaled_lr
from src.engine.train_step import build_optimizer, split_decay_params
from src.model.fcos import FCOS


def test_cosine_schedule_is_a_half_cosine_over_the_whole_run_after_warmup():
    """Mutation caught: a cosine with the wrong period (per epoch, or over twice the steps)."""
    lr, steps, epochs, warmup = 0.02, 7, 5, 6
    rates = build_lr_schedule(lr, steps, epochs, "cosine", warmup_iters=warmup, warmup_ratio=0.25)
    total = steps * epochs
    assert rates.shape == (total,) and rates.dtype == np.float32
    for t in range(total):
        cosine = 0.5 * lr * (1 + math.cos(math.pi * t / total))
        alpha = min(t / warmup, 1.0)
        assert rates[t] == pytest.approx(cosine * (0.25 * (1 - alpha) + alpha), rel=1e-6)
    assert rates[warmup] == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * warmup / total)), rel=1e-6)
    assert rates[-1] < 1e-2 * lr  # ends near zero, not back at the top


def test_step_schedule_decays_at_the_epoch_boundaries():
    rates = build_lr_schedule(0.01, 4, 12, "step", lr_steps=(8, 11), gamma=0.1, warmup_iters=0)
    np.testing.assert_allclose(rates[[0, 31, 32, 43, 44, 47]], [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-6)
    assert scaled_lr(0.01, 16, 4) == pytest.approx(0.0025)


def test_weight_decay_reaches_weights_only_and_follows_sgd_by_hand():
    """One optimiser step on a real FCOS with constant gradients: a conv weight moves by
    lr * (g + wd * w), a bias and a norm scale by lr * g only. Mutation caught: weight decay on
    norms and biases (the split by ndim inverted)."""
    network = FCOS(backbone="resnet18", class_num=3, fpn_out_channels=32, num_head_convs=1, freeze_bn=False)
    params = network.trainable_params()
    decay, no_decay = split_decay_params(params)
    assert all(p.ndim > 1 for p in decay) and all(p.ndim <= 1 for p in no_decay)
    assert any("gamma" in p.name for p in no_decay) and any(p.name.endswith("bias") for p in no_decay)
    assert {p.name for p in split_decay_params(params, decay_norm_bias=True)[0]} == {p.name for p in params}

    lr, wd = 0.1, 0.01
    optimizer = build_optimizer(params, np.full(4, lr, np.float32), momentum=0.9, weight_decay=wd)
    before = {p.name: p.asnumpy().copy() for p in params}
    grads = tuple(Tensor(np.full(p.shape, 0.5, np.float32)) for p in optimizer.parameters)  # the groups' order
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        optimizer(grads)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for p in params:
        decayed = p.ndim > 1
        want = before[p.name] - lr * (0.5 + (wd * before[p.name] if decayed else 0.0))
        np.testing.assert_allclose(p.asnumpy(), want, rtol=1e-5, atol=1e-6, err_msg=p.name)


def test_cosine_schedule_drives_the_optimiser_step_by_step():
    """The optimiser reads the schedule at its global step (a 1-parameter SGD without momentum)."""
    rates = build_lr_schedule(0.5, 3, 2, "cosine", warmup_iters=0)
    weight = ms.Parameter(Tensor(np.zeros(2, np.float32)), name="w")
    optimizer = nn.SGD([weight], learning_rate=Tensor(rates))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for _ in range(len(rates)):
            optimizer((Tensor(np.ones(2, np.float32)),))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(weight.asnumpy(), -rates.astype(np.float64).sum(), rtol=1e-5)
