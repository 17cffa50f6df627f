"""The FCOS head, shared by all pyramid levels: classification and regression towers, the
class logits, the l,t,r,b regression with a learnable scale per level, and centreness."""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import Normal, Constant

from .norm import GroupNorm


def _conv(in_channels, out_channels, bias=0.0):
    """3x3 conv, torch padding 1, weights N(0, 0.01), constant bias (torchvision's FCOS head init)."""
    return nn.Conv2d(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=True,
                     weight_init=Normal(sigma=0.01), bias_init=Constant(bias))


def _tower(channels, num_convs, use_gn):
    """num_convs x (conv3x3 [+ GroupNorm(32)] + ReLU); (B, C, H, W) -> (B, C, H, W).

    With GroupNorm the indices (conv 3k, norm 3k+1) are torchvision's, which keeps conversion
    a rename.
    """
    layers = []
    for _ in range(num_convs):
        layers.append(_conv(channels, channels))
        if use_gn:
            layers.append(GroupNorm(32, channels))
        layers.append(nn.ReLU())
    return nn.SequentialCell(layers)


def _flatten(x):
    """(B, A, H, W) -> (B, H*W, A), locations row-major (y then x)."""
    b, a, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(b, h * w, a)


class Scale(nn.Cell):
    """A learnable scalar multiplier (one per level for the regression), initialised to 1."""

    def __init__(self):
        super().__init__()
        self.scale = Parameter(Tensor(1.0, ms.float32), name="scale")

    def construct(self, x):
        return x * self.scale


class FCOSHead(nn.Cell):
    """construct((P3, ..., P7)) -> (cls_logits (B, P, C), bbox_reg (B, P, 4), centerness (B, P, 1)).

    P = sum of H_l * W_l, levels concatenated in order. bbox_reg is l,t,r,b: ReLU(scale_l * x)
    in units of the level stride (norm_reg_targets) or exp(scale_l * x) in pixels (the paper).
    Without add_centerness the centerness output is zeros and the branch has no parameters.
    """

    def __init__(self, in_channels, num_classes, num_levels=5, num_convs=4, use_gn=True, prior=0.01,
                 add_centerness=True, cnt_on_reg=True, norm_reg_targets=True):
        super().__init__()
        self.cls_tower = _tower(in_channels, num_convs, use_gn)
        self.reg_tower = _tower(in_channels, num_convs, use_gn)
        self.cls_logits = _conv(in_channels, num_classes, bias=-math.log((1 - prior) / prior))
        self.bbox_reg = _conv(in_channels, 4)
        self.add_centerness = add_centerness
        self.cnt_on_reg = cnt_on_reg
        if add_centerness:
            self.centerness = _conv(in_channels, 1)
        self.scales = nn.CellList([Scale() for _ in range(num_levels)])
        self.norm_reg_targets = norm_reg_targets
        self.relu = nn.ReLU()

    def construct(self, features):
        cls_out, reg_out, ctr_out = (), (), ()
        for feature, scale in zip(features, self.scales):
            cls_feat = self.cls_tower(feature)
            reg_feat = self.reg_tower(feature)
            cls_out += (_flatten(self.cls_logits(cls_feat)),)
            reg = scale(self.bbox_reg(reg_feat))
            reg = self.relu(reg) if self.norm_reg_targets else ops.exp(reg)
            reg_out += (_flatten(reg),)
            if self.add_centerness:
                ctr_out += (_flatten(self.centerness(reg_feat if self.cnt_on_reg else cls_feat)),)
        bbox_reg = ops.concat(reg_out, axis=1)
        if self.add_centerness:
            centerness = ops.concat(ctr_out, axis=1)
        else:
            centerness = ops.zeros_like(bbox_reg[:, :, :1])
        return ops.concat(cls_out, axis=1), bbox_reg, centerness
