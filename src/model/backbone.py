"""ResNet / ResNeXt backbones in torchvision's layout, returning C3, C4, C5 (strides 8, 16, 32).

Layout as torchvision.models.resnet: 7x7/2 stem conv (no bias) + BN + ReLU + 3x3/2 max-pool,
four stages of residual blocks, the stride on the 3x3 conv of a bottleneck (or, with
stride_in_1x1, on its first 1x1 conv: the MSRA/caffe ResNet of the FCOS authors' R-50/R-101),
downsample = 1x1 conv with stride + BN. Parameter names follow torchvision's module paths (conv1, bn1,
layer1.0.conv1, layer2.0.downsample.0, ...) with MindSpore's BatchNorm leaf names, so that
tools/convert_weights.py maps torchvision checkpoints by renaming leaves only.
"""
import functools
from typing import Callable, List, Tuple

from mindspore import nn, ops
from mindspore.common.initializer import HeNormal

from .norm import FrozenBatchNorm2d, backbone_norm


def _conv(in_channels, out_channels, kernel_size, stride=1, groups=1):
    """Bias-free conv with torch's symmetric padding k//2 and torchvision's ResNet init."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=kernel_size // 2, group=groups, has_bias=False,
                     weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


class BasicBlock(nn.Cell):
    """Two 3x3 convs (ResNet-18/34). (B, in, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, norm: Callable[[int], nn.Cell], groups: int = 1,
                 width_per_group: int = 64, stride_in_1x1: bool = False) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = norm(planes)
        self.relu1 = nn.ReLU()
        self.relu = nn.ReLU()  # after the residual sum
        self.downsample = _downsample(in_channels, planes, stride, norm)

    def construct(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Cell):
    """1x1 -> 3x3 (groups) -> 1x1 expanding by 4 (ResNet-50+, ResNeXt); the stride on the 3x3, or
    on the first 1x1 with stride_in_1x1.

    (B, in, H, W) -> (B, 4 * planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, norm: Callable[[int], nn.Cell], groups: int = 1,
                 width_per_group: int = 64, stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, width, 1, stride_1x1)
        self.bn1 = norm(width)
        self.conv2 = _conv(width, width, 3, stride_3x3, groups)
        self.bn2 = norm(width)
        self.conv3 = _conv(width, out_channels, 1)
        self.bn3 = norm(out_channels)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.relu = nn.ReLU()  # after the residual sum
        self.downsample = _downsample(in_channels, out_channels, stride, norm)

    def construct(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_channels, out_channels, stride, norm):
    """The projection shortcut (1x1 conv + BN) where the block changes shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.SequentialCell([_conv(in_channels, out_channels, 1, stride),
                              norm(out_channels)])


# name -> (block, blocks per stage, groups, width_per_group), as torchvision.models.
ARCHITECTURES = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": (Bottleneck, (3, 4, 23, 3), 64, 4),
}


class StemMaxPool(nn.Cell):
    """torch's MaxPool2d(3, stride=2, padding=1) on the stem's ReLU output; (B, C, H, W) ->
    (B, C, ceil(H/2), ceil(W/2)).

    torch pads with -inf; on non-negative inputs zero padding gives the same maxima. Only the
    padding a 'valid' pool reads is added (top/left, bottom/right only for odd sizes), by
    concatenating zeros: MindSpore's CPU Pad kernel took 420 ms here on an 800x1216 input, the
    concatenation ~7 ms, and pad_mode='pad' (MaxPoolWithArgmax) does not export to ONNX.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")

    def construct(self, x):
        b, c, h, w = x.shape
        rows = (ops.zeros((b, c, 1, w), x.dtype), x) + ((ops.zeros((b, c, 1, w), x.dtype),) if h % 2 else ())
        x = ops.concat(rows, axis=2)
        h = x.shape[2]
        cols = (ops.zeros((b, c, h, 1), x.dtype), x) + ((ops.zeros((b, c, h, 1), x.dtype),) if w % 2 else ())
        return self.pool(ops.concat(cols, axis=3))


class ResNet(nn.Cell):
    """A torchvision ResNet without its classifier; construct(x) -> (C3, C4, C5).

    x (B, 3, H, W) -> C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32, W/32),
    sizes rounded up; the channel counts are in ``out_channels``.

    freeze_bn: FrozenBatchNorm2d instead of nn.BatchNorm2d everywhere.
    norm: "BN" (BatchNorm, frozen with freeze_bn) or "GN" (trained GroupNorm, 32 groups).
    freeze_stage_1: the stem and layer1 get requires_grad=False (no gradient, no update).
    stride_in_1x1: bottlenecks stride on their first 1x1 conv (MSRA/caffe ResNet) instead of the 3x3.
    frozen_bn_eps: epsilon of the frozen BatchNorms (1e-5 torchvision; 0 maskrcnn-benchmark's).
    """

    def __init__(self, name: str = "resnet50", freeze_bn: bool = True, freeze_stage_1: bool = True, norm: str = "BN",
                 stride_in_1x1: bool = False, frozen_bn_eps: float = 1e-5) -> None:
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(ARCHITECTURES)}")
        if norm == "GN" and freeze_bn:
            raise ValueError("freeze_bn freezes BatchNorm; a GroupNorm backbone needs freeze_bn False")
        norm = "frozen_BN" if norm == "BN" and freeze_bn else norm
        block, depths, groups, width_per_group = ARCHITECTURES[name]
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError(f"stride_in_1x1 concerns bottleneck blocks; {name} has basic blocks")
        norm = functools.partial(backbone_norm, kind=norm, eps=frozen_bn_eps)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, pad_mode="pad", padding=3, has_bias=False,
                               weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
        self.bn1 = norm(64)
        self.relu1 = nn.ReLU()
        self.maxpool = StemMaxPool()
        in_channels = 64
        stages = []
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(in_channels, planes, stride if block_index == 0 else 1, norm,
                                    groups, width_per_group, stride_in_1x1))
                in_channels = planes * block.expansion
            stages.append(nn.SequentialCell(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = tuple(planes * block.expansion for planes in (128, 256, 512))
        if freeze_stage_1:
            for cell in (self.conv1, self.bn1, self.layer1):
                for param in cell.get_parameters():
                    param.requires_grad = False

    def frozen_norm_pairs(self) -> List[Tuple[nn.Cell, FrozenBatchNorm2d]]:
        """-> [(conv, FrozenBatchNorm2d applied right after it)]: the stem's, each block's convN/bnN
        and each downsample's; empty unless freeze_bn. What a convolution can fold in."""
        pairs = []
        for _, cell in self.cells_and_names():
            children = cell.name_cells()
            if isinstance(cell, nn.SequentialCell) and len(children) == 2:  # a downsample
                pairs.append((cell[0], cell[1]))
            for name, child in children.items():
                if name.startswith("bn") and f"conv{name[2:]}" in children:
                    pairs.append((children[f"conv{name[2:]}"], child))
        return [(conv, norm) for conv, norm in pairs if isinstance(norm, FrozenBatchNorm2d)]

    def norm_relu_pairs(self) -> List[Tuple[nn.Cell, nn.Cell]]:
        """-> [(bnN, the ReLU reluN that takes only its output)]: the stem's and each block's, not the
        ReLUs after a residual sum. What a normalisation can apply itself."""
        pairs = []
        for _, cell in self.cells_and_names():
            children = cell.name_cells()
            for name, child in children.items():
                if name.startswith("bn") and f"relu{name[2:]}" in children:
                    pairs.append((child, children[f"relu{name[2:]}"]))
        return pairs

    def construct(self, x):
        x = self.maxpool(self.relu1(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c3, c4, c5
