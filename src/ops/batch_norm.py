"""Trained BatchNorm computed by C++ custom ops on CPU (src/ops/batch_norm.cc).

NativeBatchNorm2d is an nn.BatchNorm2d (same Parameters and checkpoint names); in training it
normalises with the batch's statistics through two kernels (forward, backward),
optionally applying the ReLU that follows it, and moves the running statistics by MindSpore's
rule (momentum, unbiased variance) with two Assigns; out of training a third kernel normalises
with the running statistics. The backend (src/ops/backend.py) swaps it into a network whose convolutions
run on the custom ops.
"""
import numpy as np
from mindspore import Tensor, nn, ops

from src.ops.build import library


class NativeBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training forward and backward are custom ops: x (B, C, H, W) -> same
    shape; relu: the output is max(0, BatchNorm(x)), in training and in inference; channels_last:
    x and y in channels-last storage (src/ops/backend.py).

    The forward op also returns the batch's per-channel mean and 1/sqrt(var + eps), (C,) each, which
    only the backward op reads, and the new running mean and variance, (C,) each, assigned here.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9, relu: bool = False,
                 channels_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.relu = relu
        self.channels_last = channels_last
        # nn.BatchNorm2d keeps 1 - momentum: the batch's weight in the running statistics
        self.attrs = Tensor(np.array([eps, self.momentum, float(relu), float(channels_last)], np.float64))
        so = library()
        backward = ops.Custom(f"{so}:FcosBatchNormBackward", out_shape=lambda x, g, b, m, r, dy, a: (x, g, g),
                              out_dtype=lambda x, g, b, m, r, dy, a: (x, g, g), func_type="aot")
        zeros_like = ops.ZerosLike()

        def bprop(x, gamma, beta, moving_mean, moving_variance, attrs, out, dout):
            dx, dgamma, dbeta = backward(x, gamma, beta, out[1], out[2], dout[0], attrs)
            return dx, dgamma, dbeta, zeros_like(moving_mean), zeros_like(moving_variance), zeros_like(attrs)

        # MindSpore's BatchNorm on channels-last storage read as (B*H*W, C, 1, 1) took the small
        # configuration's inference from 0.14 to 0.25 s
        self.inference = ops.Custom(f"{so}:FcosBatchNormInference", out_shape=lambda x, g, b, mm, mv, a: x,
                                    out_dtype=lambda x, g, b, mm, mv, a: x, func_type="aot")
        self.forward = ops.Custom(f"{so}:FcosBatchNormForward",
                                  out_shape=lambda x, g, b, mm, mv, a: (x, g, g, g, g),
                                  out_dtype=lambda x, g, b, mm, mv, a: (x, x, x, x, x), func_type="aot", bprop=bprop)

    def construct(self, x):
        if not self.training:
            return self.inference(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.attrs)
        y, _, _, new_mean, new_variance = self.forward(x, self.gamma, self.beta, self.moving_mean,
                                                       self.moving_variance, self.attrs)
        y = ops.depend(y, ops.assign(self.moving_mean, ops.stop_gradient(new_mean)))
        return ops.depend(y, ops.assign(self.moving_variance, ops.stop_gradient(new_variance)))
