"""The FPN's top-down merge computed by C++ custom ops on CPU (src/ops/upsample.cc).

NativeUpsampleAdd has UpsampleAdd's contract (src/model/fpn.py); the backend (src/ops/backend.py) swaps it
into a network whose convolutions run on the custom ops (no Parameters involved).
"""
from mindspore import nn, ops

from src.ops.build import library


class NativeUpsampleAdd(nn.Cell):
    """construct(lateral (B, C, H, W), top (B, C, h, w)) -> lateral + top nearest-upsampled to
    (H, W), source index floor(dst * h / H). channels_last: the three tensors in channels-last
    storage (src/ops/backend.py)."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        so = library()
        suffix = "ChannelsLast" if channels_last else ""
        backward = ops.Custom(f"{so}:FcosUpsampleAddBackward{suffix}", out_shape=lambda top, dy: top,
                              out_dtype=lambda top, dy: top, func_type="aot")

        def bprop(lateral, top, out, dout):
            return dout, backward(top, dout)

        self.forward = ops.Custom(f"{so}:FcosUpsampleAdd{suffix}", out_shape=lambda lateral, top: lateral,
                                  out_dtype=lambda lateral, top: lateral, func_type="aot", bprop=bprop)

    def construct(self, lateral, top):
        return self.forward(lateral, top)
