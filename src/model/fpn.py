"""Feature pyramid: C3, C4, C5 -> P3..P5 (+ P6, P7 by strided convs), as torchvision's FPN
with LastLevelP6P7."""
from typing import Sequence

from mindspore import nn, ops
from mindspore.common.initializer import HeUniform


def _conv(in_channels, out_channels, kernel_size, stride=1):
    """Conv with bias and torch padding k//2; kaiming_uniform(a=1) weights, zero bias (torchvision)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=kernel_size // 2, has_bias=True,
                     weight_init=HeUniform(negative_slope=1), bias_init="zeros")


class FPN(nn.Cell):
    """construct((C3, C4, C5)) -> (P3, ..., P_{3+num_levels-1}), each (B, out_channels, H_l, W_l).

    P5..P3 come from lateral 1x1 convs plus the nearest-upsampled coarser map, then a 3x3 conv.
    P6 = 3x3/2 conv on P5 (use_p5, FCOS improved) or on C5 (the paper); P7 = 3x3/2 conv on
    relu(P6). num_levels is 3, 4 or 5 (P3-P5, P3-P6, P3-P7).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, use_p5: bool = True, num_levels: int = 5) -> None:
        super().__init__()
        if num_levels not in (3, 4, 5):
            raise ValueError(f"FPN: num_levels must be 3, 4 or 5 (P3..P7), got {num_levels}")
        self.lateral = nn.CellList([_conv(c, out_channels, 1) for c in in_channels])
        self.output = nn.CellList([_conv(out_channels, out_channels, 3) for _ in in_channels])
        self.use_p5 = use_p5
        self.num_extra = num_levels - 3
        p6_in = out_channels if use_p5 else in_channels[-1]
        self.extra = nn.CellList([_conv(p6_in, out_channels, 3, 2),
                                  _conv(out_channels, out_channels, 3, 2)][:self.num_extra])
        self.relu = nn.ReLU()
        self.merge = UpsampleAdd()

    def construct(self, features):
        c3, c4, c5 = features
        inner5 = self.lateral[2](c5)
        inner4 = self.merge(self.lateral[1](c4), inner5)
        inner3 = self.merge(self.lateral[0](c3), inner4)
        p3 = self.output[0](inner3)
        p4 = self.output[1](inner4)
        p5 = self.output[2](inner5)
        outs = (p3, p4, p5)
        if self.num_extra > 0:
            p6 = self.extra[0](p5 if self.use_p5 else c5)
            outs += (p6,)
            if self.num_extra > 1:
                outs += (self.extra[1](self.relu(p6)),)
        return outs


class UpsampleAdd(nn.Cell):
    """The top-down merge: construct(lateral (B, C, H, W), top (B, C, h, w)) -> lateral + top
    nearest-upsampled to (H, W). A cell, so that CPU runs with the custom ops swap in src/ops'
    fused kernel (src/ops/upsample.py; unlike the forms below, the 2-rank test passes with it)."""

    def construct(self, lateral, top):
        return lateral + _upsample_like(top, lateral)


def _upsample_like(x, reference):
    """Nearest-upsample x (B, C, h, w) to reference's (H, W).

    ResizeNearestNeighbor (align_corners False) reads source index floor(dst * h / H), as torch's
    'nearest', also for odd sizes; unlike ops.interpolate it exports to ONNX.
    """
    # faster forms broke 2-rank data-parallel equivalence or ONNX export (docs/performance.md, the FPN merge)
    return ops.ResizeNearestNeighbor(reference.shape[2:])(x)
