"""Normalisation layers: frozen BatchNorm for the backbone, an exportable GroupNorm for the head
(and for a backbone trained from scratch).

Both keep MindSpore's parameter names (gamma, beta, moving_mean, moving_variance) so that a
checkpoint saved with frozen BatchNorm loads into a network with nn.BatchNorm2d and back.
"""
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops


class ChannelAffine(nn.Cell):
    """construct(x, mean, var, gamma, beta) -> (x - mean) * gamma / sqrt(var + eps) + beta per channel
    of x (B, C, H, W), on the inference BatchNorm kernel; the other arguments are (C,) constants.

    Its backward, dx = dy * gamma / sqrt(var + eps), is the same kernel on dy and does not read x:
    MindSpore's own BatchNorm gradient takes x, which kept every backbone convolution's output
    alive until the backward pass (an extra activation per layer: R50-FPN 800x1216 training
    peaked at 3.6 GB with it; see docs/performance.md). The constants get zero gradients.
    """

    def __init__(self, eps: float) -> None:
        super().__init__()
        # MindSpore's BatchNorm wants eps in (0, 1]; 1e-30 is lost next to any variance above 1e-23
        self.normalize = ops.BatchNorm(is_training=False, epsilon=max(float(eps), 1e-30))
        self.zeros_like = ops.ZerosLike()

    def construct(self, x, mean, var, gamma, beta):
        return self.normalize(x, gamma, beta, mean, var)[0]

    def bprop(self, x, mean, var, gamma, beta, out, dout):
        zeros = self.zeros_like(mean)
        return self.normalize(dout, gamma, zeros, zeros, var)[0], zeros, zeros, zeros, zeros


class FrozenBatchNorm2d(nn.Cell):
    """BatchNorm2d with fixed statistics and affine: y = (x - moving_mean) * gamma /
    sqrt(moving_variance + eps) + beta, torchvision's FrozenBatchNorm2d to float32 round-off.

    ChannelAffine computes it. Written as x * scale + shift with (1, C, 1, 1) tensors, it made
    MindSpore's CPU backend keep an index workspace of 4x the activation per broadcasting op for
    good (R50 inference at 800x1216 peaked at 10.5 GB). The four tensors are Parameters with
    requires_grad=False: they travel in checkpoints but receive no gradient and are left out of
    trainable_params(). With ``folded`` set, the convolution before it applies scale_shift()
    (src/ops/conv.py OneDNNConv2d) and this layer passes its input through.

    Input and output (B, C, H, W).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = Parameter(Tensor(np.ones(num_features, np.float32)), name="gamma", requires_grad=False)
        self.beta = Parameter(Tensor(np.zeros(num_features, np.float32)), name="beta", requires_grad=False)
        self.moving_mean = Parameter(Tensor(np.zeros(num_features, np.float32)), name="moving_mean",
                                     requires_grad=False)
        self.moving_variance = Parameter(Tensor(np.ones(num_features, np.float32)), name="moving_variance",
                                         requires_grad=False)
        self.affine = ChannelAffine(eps)
        self.rsqrt = ops.Rsqrt()
        self.folded = False

    def scale_shift(self):
        """-> (scale, shift), each (C,): this layer is y = x * scale + shift per channel."""
        scale = self.gamma * self.rsqrt(self.moving_variance + self.eps)
        return scale, self.beta - self.moving_mean * scale

    def construct(self, x):
        if self.folded:
            return x
        return self.affine(x, self.moving_mean, self.moving_variance, self.gamma, self.beta)


class GroupNormFunction(nn.Cell):
    """GroupNorm as a function with its own backward: construct(x, gamma, beta) -> y.

    x (B, C, H, W) is viewed as R = B*C rows: per-row sums and dot products are matrix products
    (MindSpore's CPU reductions are ~10x slower than its sgemm), every per-row shift and scale is
    one BatchNorm-kernel call, and the backward pass is written out (bprop) instead of being
    differentiated through reductions and broadcasting element-wise ops, which are slow on
    MindSpore's CPU backend (they made GroupNorm ~25% of an R50 FCOS training step) and keep an
    index workspace of several activations. Each group's variance is taken about its mean (two
    passes), so large means do not cancel digits. It computes in float32 whatever the input type
    (mixed precision keeps normalisation in float32). Primitives are made once here: functional
    ops fail inside a bprop graph. Measured on CPU, forward+backward of a 256x100x152 map: 99 ms
    through nn.GroupNorm-style ops, 16 ms here.
    """

    def __init__(self, num_groups: int, eps: float) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.matmul = ops.MatMul()
        self.bmm = ops.BatchMatMul()
        # MindSpore's BatchNorm wants eps in (0, 1]; 1e-30 is lost next to any variance above 1e-23
        self.normalize = ops.BatchNorm(is_training=False, epsilon=max(float(eps), 1e-30))
        self.tile = ops.Tile()
        self.zeros_like = ops.ZerosLike()
        self.ones_like = ops.OnesLike()
        self.ones = ops.Ones()
        self.rsqrt = ops.Rsqrt()

    def _row_sums(self, rows):
        """(R, N) -> (R,)."""
        return self.matmul(rows, self.ones((rows.shape[1], 1), rows.dtype)).reshape(-1)

    def _row_dots(self, a, b):
        """(R, N), (R, N) -> (R,) row-wise dot products."""
        count, length = a.shape
        return self.bmm(a.reshape(count, 1, length), b.reshape(count, length, 1)).reshape(-1)

    def _group_means(self, row_values, shape):
        """(B*C,) per-channel totals -> (B*C,) the mean over each channel's group, per channel."""
        b, c, h, w = shape
        per_group = c // self.num_groups
        group = row_values.reshape(b, self.num_groups, per_group).sum(axis=2, keepdims=True)
        return self.tile(group / (per_group * h * w), (1, 1, per_group)).reshape(-1)

    def _affine(self, x, mean, var, scale, shift):
        """x (1, R, H, W) -> (x - mean) / sqrt(var + eps) * scale + shift per row, on the
        BatchNorm kernel; the other arguments are (R,)."""
        return self.normalize(x, scale, shift, mean, var)[0]

    def _centre(self, x):
        """x (B, C, H, W) -> (x - mean as (1, B*C, H, W), var (B*C,)): group statistics per
        channel, biased variance as torch."""
        b, c, h, w = x.shape
        mean = self._group_means(self._row_sums(x.reshape(b * c, h * w)), x.shape)
        ones = self.ones_like(mean)
        # var = 1 - eps makes the kernel's scale 1. Not BiasAdd: MindSpore exports it to ONNX as
        # an Add broadcasting over the wrong axis.
        centred = self._affine(x.reshape(1, b * c, h, w), mean, ones - self.eps, ones, self.zeros_like(mean))
        centred_rows = centred.reshape(b * c, h * w)
        return centred, self._group_means(self._row_dots(centred_rows, centred_rows), x.shape)

    def construct(self, x, gamma, beta):
        b = x.shape[0]
        centred, var = self._centre(x.astype(ms.float32))
        y = self._affine(centred, self.zeros_like(var), var, self.tile(gamma.astype(ms.float32), (b,)),
                         self.tile(beta.astype(ms.float32), (b,)))
        return y.reshape(x.shape).astype(x.dtype)

    def bprop(self, x, gamma, beta, out, dout):
        """With xhat = (x - mean) * rstd per group:
        dx = rstd * (gamma * dy - mean_g(gamma * dy) - xhat * mean_g(gamma * dy * xhat)),
        dgamma = sum over B, H, W of dy * xhat, dbeta = sum of dy."""
        b, c, h, w = x.shape
        centred, var = self._centre(x.astype(ms.float32))
        rstd = self.rsqrt(var + self.eps)
        dout = dout.astype(ms.float32)
        dy_rows = dout.reshape(b * c, h * w)
        sum_dy = self._row_sums(dy_rows)
        sum_dy_xhat = self._row_dots(dy_rows, centred.reshape(b * c, h * w)) * rstd
        gamma_rows = self.tile(gamma.astype(ms.float32), (b,))
        mean_dy = self._group_means(gamma_rows * sum_dy, x.shape)
        mean_dy_xhat = self._group_means(gamma_rows * sum_dy_xhat, x.shape)
        zeros = self.zeros_like(var)
        dx = (self._affine(dout.reshape(1, b * c, h, w), zeros, var, gamma_rows, -rstd * mean_dy)
              + self._affine(centred, zeros, var, -rstd * mean_dy_xhat, zeros))
        return (dx.reshape(x.shape).astype(x.dtype), sum_dy_xhat.reshape(b, c).sum(axis=0).astype(gamma.dtype),
                sum_dy.reshape(b, c).sum(axis=0).astype(beta.dtype))


class GroupNorm(nn.Cell):
    """GroupNorm over (C/G, H, W) per group with biased variance, as torch.nn.GroupNorm.

    Not nn.GroupNorm: that does not export to ONNX and is ~4x slower on CPU; this one is built
    from MatMul and BatchNorm (inference) kernels, which export, with an explicit
    backward pass (GroupNormFunction). Needs static shapes (true in GRAPH_MODE and for export).
    Input and output (B, C, H, W).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.gamma = Parameter(Tensor(np.ones(num_channels, np.float32)), name="gamma")
        self.beta = Parameter(Tensor(np.zeros(num_channels, np.float32)), name="beta")
        self.function = GroupNormFunction(num_groups, eps)

    def construct(self, x):
        return self.function(x, self.gamma, self.beta)


def backbone_norm(num_features: int, kind: str, eps: float = 1e-5) -> nn.Cell:
    """A backbone normalisation layer: kind "frozen_BN" (FrozenBatchNorm2d with epsilon eps), "BN"
    (nn.BatchNorm2d with torch's momentum 0.1) or "GN" (GroupNorm, 32 groups)."""
    if kind == "frozen_BN":
        return FrozenBatchNorm2d(num_features, eps)
    if kind == "GN":
        return GroupNorm(32, num_features)
    if kind != "BN":
        raise ValueError(f"unknown backbone normalisation '{kind}'; choose BN or GN")
    # MindSpore's momentum weighs the running value (torch's 0.1 weighs the batch value).
    return nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.9)
