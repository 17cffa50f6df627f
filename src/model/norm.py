"""Normalisation layers: frozen BatchNorm for the backbone, an exportable GroupNorm for the head.

Both keep MindSpore's parameter names (gamma, beta, moving_mean, moving_variance) so that a
checkpoint saved with frozen BatchNorm loads into a network with nn.BatchNorm2d and back.
"""
import numpy as np
from mindspore import nn, ops, Parameter, Tensor


class FrozenBatchNorm2d(nn.Cell):
    """BatchNorm2d with fixed statistics and affine: y = (x - moving_mean) * gamma /
    sqrt(moving_variance + eps) + beta, torchvision's FrozenBatchNorm2d to float32 round-off.

    The inference BatchNorm kernel computes it. Written as x * scale + shift with (1, C, 1, 1)
    tensors, it made MindSpore's CPU backend keep an index workspace of 4x the activation per
    broadcasting op for good (R50 inference at 800x1216 peaked at 10.5 GB). The four tensors are
    Parameters with requires_grad=False: they travel in checkpoints but receive no gradient and
    are left out of trainable_params().

    Input and output (B, C, H, W).
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = Parameter(Tensor(np.ones(num_features, np.float32)), name="gamma", requires_grad=False)
        self.beta = Parameter(Tensor(np.zeros(num_features, np.float32)), name="beta", requires_grad=False)
        self.moving_mean = Parameter(Tensor(np.zeros(num_features, np.float32)), name="moving_mean",
                                     requires_grad=False)
        self.moving_variance = Parameter(Tensor(np.ones(num_features, np.float32)), name="moving_variance",
                                         requires_grad=False)

    def construct(self, x):
        return ops.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                              training=False, eps=self.eps)


class GroupNorm(nn.Cell):
    """GroupNorm over (C/G, H, W) per group with biased variance, as torch.nn.GroupNorm.

    Written with reshape/mean/sqrt because nn.GroupNorm does not export to ONNX; needs static
    shapes (true in GRAPH_MODE and for export). Input and output (B, C, H, W).
    """

    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.gamma = Parameter(Tensor(np.ones(num_channels, np.float32)), name="gamma")
        self.beta = Parameter(Tensor(np.zeros(num_channels, np.float32)), name="beta")

    def construct(self, x):
        b, c, h, w = x.shape
        grouped = x.reshape(b, self.num_groups, -1)
        mean = grouped.mean(axis=2, keep_dims=True)
        centred = grouped - mean
        var = ops.square(centred).mean(axis=2, keep_dims=True)
        normed = (centred / ops.sqrt(var + self.eps)).reshape(b, c, h, w)
        return normed * self.gamma.reshape(1, -1, 1, 1) + self.beta.reshape(1, -1, 1, 1)


def batch_norm(num_features, frozen):
    """A backbone BatchNorm: FrozenBatchNorm2d, or nn.BatchNorm2d with torch's momentum 0.1."""
    if frozen:
        return FrozenBatchNorm2d(num_features)
    # MindSpore's momentum weighs the running value (torch's 0.1 weighs the batch value).
    return nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.9)

