"""Channels-last storage: how activations travel between the custom ops of src/ops on CPU.

oneDNN's CPU convolutions run on channels-last (N, H, W, C) data directly, while MindSpore's
tensors are NCHW: with NCHW tensors every convolution reorders its input, its output and, in the
backward, the gradients, to and from oneDNN's layout (on the quick start's layer set at 320x320
those reorders were 11% of the convolutions' time; docs/performance.md). So where every layer
between two convolutions is a custom op or element-wise, the network keeps its activations in
channels-last storage: a tensor keeps its (N, C, H, W) shape in the graph but holds its values in
(N, H, W, C) order. Only two kinds of op may touch such a tensor: the custom ops, each built with
a channels_last flag (convolutions, trained BatchNorm, GroupNorm, the stem's max-pool, the FPN
merge), and element-wise ops (ReLU, the residual Add, their gradients, AddN), for which the order
of the values does not matter. The network's edges convert: its first convolution reads the NCHW
image and its output convolutions write NCHW (FCOS.layout_edges()).

check_channels_last refuses a network that still holds a layer which would read the storage as
NCHW (a MindSpore convolution, norm, pool or upsample that no custom op replaced).
"""
from mindspore import nn

from src.model.backbone import StemMaxPool
from src.model.fpn import UpsampleAdd
from src.model.norm import FrozenBatchNorm2d, GroupNorm
from src.ops.batch_norm import NativeBatchNorm2d
from src.ops.conv import OneDNNConv2d
from src.ops.group_norm import NativeGroupNormFunction


def _reads_nchw(cell):
    """Whether cell would compute on its input as NCHW (a portable layer no custom op replaced)."""
    if isinstance(cell, nn.Conv2d):
        return not isinstance(cell, OneDNNConv2d)
    if isinstance(cell, nn.BatchNorm2d):
        return not isinstance(cell, NativeBatchNorm2d)
    if isinstance(cell, FrozenBatchNorm2d):
        return not cell.folded
    if isinstance(cell, GroupNorm):
        return not isinstance(cell.function, NativeGroupNormFunction)
    return isinstance(cell, (StemMaxPool, UpsampleAdd, nn.MaxPool2d, nn.AvgPool2d, nn.GroupNorm))


def check_channels_last(network):
    """ValueError naming the layers of network that would read channels-last storage as NCHW."""
    wrong = [name for name, cell in network.cells_and_names() if _reads_nchw(cell)]
    if wrong:
        raise ValueError(f"channels-last storage needs every layer on the custom ops; these are not: {wrong[:5]}")
