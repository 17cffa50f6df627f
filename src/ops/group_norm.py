"""GroupNorm computed by C++ custom ops on CPU (src/ops/group_norm.cc).

NativeGroupNormFunction has the contract of src/model/norm.py's GroupNormFunction (x, gamma, beta
-> y, biased variance, float32), so the backend (src/ops/backend.py) swaps it into every GroupNorm of a
network whose convolutions run on the custom ops; GroupNorm's Parameters and checkpoint names do
not change. Two kernels a call (forward, backward) instead of about 30 MatMul, BatchNorm and
element-wise kernels (docs/performance.md).
"""
from typing import List, Sequence

import numpy as np
from mindspore import Tensor, nn, ops

from src.ops.build import library


class NativeGroupNormFunction(nn.Cell):
    """construct(x (B, C, H, W), gamma (C,), beta (C,)) -> y (B, C, H, W), float32; channels_last:
    x and y in channels-last storage (src/ops/backend.py).

    The forward op also returns each (image, group)'s mean and 1/sqrt(var + eps), (B, G) each,
    which only the backward op reads.
    """

    def __init__(self, num_groups: int, eps: float, channels_last: bool = False) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.attrs = Tensor(np.array([num_groups, eps, float(channels_last)], np.float64))
        so = library()
        backward = ops.Custom(f"{so}:FcosGroupNormBackward", out_shape=lambda x, g, m, r, dy, a: (x, g, g),
                              out_dtype=lambda x, g, m, r, dy, a: (x, g, g), func_type="aot")
        zeros_like = ops.ZerosLike()

        def bprop(x, gamma, beta, attrs, out, dout):
            dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0], attrs)
            return dx, dgamma, dbeta, zeros_like(attrs)

        def stats_shape(x: Sequence[int]) -> List[int]:
            return [x[0], num_groups]

        self.forward = ops.Custom(f"{so}:FcosGroupNormForward",
                                  out_shape=lambda x, g, b, a: (x, stats_shape(x), stats_shape(x)),
                                  out_dtype=lambda x, g, b, a: (x, x, x), func_type="aot", bprop=bprop)
        # MindSpore reuses an inferred output shape for the same op name, attributes and input
        # shapes (see src/ops/conv.py): the statistics' shape depends on the groups.
        for op in (self.forward, backward):
            op.add_prim_attr("groups", num_groups)

    def construct(self, x, gamma, beta):
        return self.forward(x, gamma, beta, self.attrs)[0]
