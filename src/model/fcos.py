"""FCOS = ResNet backbone + FPN + shared head (Tian et al. 2019)."""
from typing import Sequence, Tuple

import mindspore as ms
from mindspore import nn

from .backbone import ResNet
from .fpn import FPN
from .head import FCOSHead
from .norm import GroupNorm
from .points import PointCoder

DEFAULT_STRIDES = (8, 16, 32, 64, 128)


class FCOS(nn.Cell):
    """construct(images (B, 3, H, W)) -> (cls_logits (B, P, C), bbox_reg (B, P, 4), centerness (B, P, 1)).

    H and W should be multiples of 32 (the data pipeline pads to that); level l has
    ceil(H / stride_l) x ceil(W / stride_l) locations, flattened row-major, levels concatenated.
    Parameters are named backbone.*, fpn.* and head.* (see the modules); the arguments are the
    configuration keys of the same names. strides must be the first 3 to 5 of 8, 16, 32, 64, 128
    (P3-P5, P3-P6 or P3-P7). point_coder (src.model.points.PointCoder: where the points of each
    level sit and how boxes are coded relative to them) is the one the loss and the decoder use.
    """

    def __init__(self, backbone: str = "resnet50", class_num: int = 80, fpn_out_channels: int = 256,
                 use_p5: bool = True, use_GN_head: bool = True, num_head_convs: int = 4, prior: float = 0.01,
                 add_centerness: bool = True, cnt_on_reg: bool = True, norm_reg_targets: bool = True,
                 freeze_bn: bool = True, freeze_stage_1: bool = True, strides: Sequence[int] = DEFAULT_STRIDES,
                 point_offset: float = 0.0, point_strides: str = "torchvision", backbone_norm: str = "BN",
                 stride_in_1x1: bool = False, frozen_bn_eps: float = 1e-5) -> None:
        super().__init__()
        strides = tuple(strides)
        if strides != DEFAULT_STRIDES[:len(strides)] or len(strides) < 3:
            raise ValueError(f"strides must be the first 3 to 5 of {list(DEFAULT_STRIDES)}, got {list(strides)}")
        self.strides = strides
        self.point_coder = PointCoder(strides, point_offset, norm_reg_targets, point_strides)
        self.backbone = ResNet(backbone, freeze_bn=freeze_bn, freeze_stage_1=freeze_stage_1, norm=backbone_norm,
                               stride_in_1x1=stride_in_1x1, frozen_bn_eps=frozen_bn_eps)
        self.fpn = FPN(self.backbone.out_channels, fpn_out_channels, use_p5=use_p5, num_levels=len(strides))
        self.head = FCOSHead(fpn_out_channels, class_num, num_levels=len(strides), num_convs=num_head_convs,
                             use_gn=use_GN_head, prior=prior, add_centerness=add_centerness,
                             cnt_on_reg=cnt_on_reg, norm_reg_targets=norm_reg_targets)

    def features(self, images):
        """images (B, 3, H, W) -> FPN outputs (P3, ..., P7), each (B, fpn_out_channels, H_l, W_l)
        (in channels-last storage where build_model chose it, src/ops/backend.py)."""
        return self.fpn(self.backbone(images))

    def layout_edges(self) -> Tuple[Tuple[nn.Cell, ...], Tuple[nn.Cell, ...]]:
        """-> (the convolutions reading the network's input, those writing its outputs): where
        channels-last storage between the layers (src/ops/backend.py) starts and ends."""
        return (self.backbone.conv1,), self.head.output_convs()

    def construct(self, images):
        return self.head(self.features(images))

    def mixed_precision(self, amp_level: str) -> nn.Cell:
        """This network under MindSpore's auto mixed precision amp_level (O2/O3) -> the cell to train.

        Head convs run unstacked: with O2/O3 MindSpore 2.10 turns parameters read outside their
        own cell into float16 for good on the first call (seen: the stacked parameters, which
        ApplyMomentum then refused). GroupNorm statistics and their backward stay float32, as
        MindSpore does for its own norm layers.
        """
        self.head.set_stacking(False)
        network = ms.amp.auto_mixed_precision(self, amp_level)
        for _, cell in network.cells_and_names():
            if isinstance(cell, GroupNorm):
                cell.to_float(ms.float32)
        return network
