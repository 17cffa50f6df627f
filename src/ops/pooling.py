"""The stem's max-pool computed by C++ custom ops on CPU (src/ops/pooling.cc).

NativeStemMaxPool has StemMaxPool's contract (torch's MaxPool2d(3, 2, padding=1)); the backend
(src/ops/backend.py) swaps it into a network whose convolutions run on the custom ops.
"""
from mindspore import nn, ops

from src.ops.build import library


class NativeStemMaxPool(nn.Cell):
    """(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)): the maximum of each 3x3 window at stride 2,
    padding -inf; its gradient goes to the window's first maximum (row-major). channels_last: x
    and y in channels-last storage (src/ops/backend.py)."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        so = library()
        suffix = "ChannelsLast" if channels_last else ""
        backward = ops.Custom(f"{so}:FcosMaxPoolBackward{suffix}", out_shape=lambda x, dy: x,
                              out_dtype=lambda x, dy: x, func_type="aot")

        def bprop(x, out, dout):
            return (backward(x, dout),)

        self.forward = ops.Custom(f"{so}:FcosMaxPoolForward{suffix}",
                                  out_shape=lambda x: [x[0], x[1], (x[2] + 1) // 2, (x[3] + 1) // 2],
                                  out_dtype=lambda x: x, func_type="aot", bprop=bprop)

    def construct(self, x):
        return self.forward(x)
