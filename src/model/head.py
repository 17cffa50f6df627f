"""The FCOS head, shared by all pyramid levels: classification and regression towers, the
class logits, the l,t,r,b regression with a learnable scale per level, and centreness."""
import math
from typing import Sequence, Tuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Constant, Normal

from .norm import GroupNorm, GroupNormFunction


def _conv(in_channels, out_channels, bias=0.0):
    """3x3 conv, torch padding 1, weights N(0, 0.01), constant bias (torchvision's FCOS head init)."""
    return nn.Conv2d(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=True,
                     weight_init=Normal(sigma=0.01), bias_init=Constant(bias))


GN_GROUPS = 32


def _tower(channels, num_convs, use_gn):
    """num_convs x (conv3x3 [+ GroupNorm(32)] + ReLU) as a CellList, applied in order.

    With GroupNorm the indices (conv 3k, norm 3k+1) are torchvision's, which keeps conversion
    a rename.
    """
    layers = []
    for _ in range(num_convs):
        layers.append(_conv(channels, channels))
        if use_gn:
            layers.append(GroupNorm(GN_GROUPS, channels))
        layers.append(nn.ReLU())
    return nn.CellList(layers)


class StackedConv(nn.Cell):
    """Several 3x3 convs (nn.Conv2d with bias, padding 1) of one input run as a single conv with
    their output channels stacked, optionally followed by a GroupNorm per conv.

    MindSpore's CPU convolution unrolls its input (im2col) before a matrix product; stacking
    unrolls it once instead of once per conv (measured on R50 at P3, 2 x 256 channels:
    forward+backward 506 -> 410 ms). The parameters stay in the convs' (and norms') own cells,
    so names and checkpoints do not change.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], norms: Sequence[GroupNorm] = ()) -> None:
        super().__init__()
        self.out_channels = tuple(conv.out_channels for conv in convs)
        self.conv = ops.Conv2D(sum(self.out_channels), (3, 3), pad_mode="pad", pad=(1, 1, 1, 1))  # tuples: ONNX
        self.bias_add = ops.BiasAdd()
        # Stacked, each norm's groups stay within its conv's channels.
        self.norm = (GroupNormFunction(sum(norm.function.num_groups for norm in norms), norms[0].function.eps)
                     if norms else None)

    def construct(self, x, params):
        """x (B, C, H, W), params from stack_params -> one (B, O_i, H, W) per conv."""
        weight, bias, gamma, beta = params
        out = self.bias_add(self.conv(x, weight), bias)
        if self.norm is not None:
            out = self.norm(out, gamma, beta)
        parts, start = (), 0
        for channels in self.out_channels:
            parts += (out[:, start:start + channels],)
            start += channels
        return parts


def stack_params(convs, norms=()):
    """The stacked weight, bias (and GroupNorm gamma, beta, else None) of StackedConv.

    Called once per forward pass, not per pyramid level: a parameter read at every level for a
    concatenation makes MindSpore insert TensorMove copies, which do not export to ONNX.
    """
    gamma = ops.concat([norm.gamma for norm in norms], 0) if norms else None
    beta = ops.concat([norm.beta for norm in norms], 0) if norms else None
    return (ops.concat([conv.weight for conv in convs], 0), ops.concat([conv.bias for conv in convs], 0),
            gamma, beta)


def _flatten(x):
    """(B, A, H, W) -> (B, H*W, A), locations row-major (y then x)."""
    b, a, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(b, h * w, a)


class Scale(nn.Cell):
    """A learnable scalar multiplier (one per level for the regression), initialised to 1."""

    def __init__(self) -> None:
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

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, num_convs: int = 4,
                 use_gn: bool = True, prior: float = 0.01, add_centerness: bool = True, cnt_on_reg: bool = True,
                 norm_reg_targets: bool = True) -> None:
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
        # Convs that read the same input run stacked: the towers' first layers (with their
        # GroupNorms), and the box regression with centreness when that sits on the regression
        # tower. set_stacking(False) runs them one by one (same values).
        self.cells_per_layer = 3 if use_gn else 2  # conv, [GroupNorm,] ReLU
        self.tower_start = StackedConv(*self._tower_start_cells()) if num_convs else None
        self.box_outputs = StackedConv(self._box_convs()) if add_centerness and cnt_on_reg else None
        self.set_stacking(True)

    def set_stacking(self, enabled: bool) -> None:
        """Stack convs that share an input (default) or not. Mixed precision (amp O2/O3) needs
        them unstacked: MindSpore then converts parameters that are read outside their own cell
        to float16 for good (observed with 2.10), and the float32 optimiser refuses them."""
        self.stack_towers = enabled and self.tower_start is not None
        self.stack_box = enabled and self.box_outputs is not None

    def _tower_start_cells(self):
        """-> (the towers' first convs, their GroupNorms or ())."""
        convs = (self.cls_tower[0], self.reg_tower[0])
        return convs, ((self.cls_tower[1], self.reg_tower[1]) if self.cells_per_layer == 3 else ())

    def output_convs(self) -> Tuple[nn.Conv2d, ...]:
        """-> the convolutions whose outputs leave the head (class logits, boxes, centerness)."""
        return (self.cls_logits, self.bbox_reg) + ((self.centerness,) if self.add_centerness else ())

    def _box_convs(self):
        """-> the convs on the regression tower's output, in stacking order."""
        return self.bbox_reg, self.centerness

    def _towers(self, feature, start_params):
        """(B, C, H, W) -> (cls_feat, reg_feat), each (B, C, H, W)."""
        cls_feat, reg_feat, first = feature, feature, 0
        if self.stack_towers:
            cls_feat, reg_feat = self.tower_start(feature, start_params)
            cls_feat, reg_feat = self.relu(cls_feat), self.relu(reg_feat)
            first = self.cells_per_layer
        for index in range(first, len(self.cls_tower)):
            cls_feat = self.cls_tower[index](cls_feat)
            reg_feat = self.reg_tower[index](reg_feat)
        return cls_feat, reg_feat

    def construct(self, features):
        start_params = stack_params(*self._tower_start_cells()) if self.stack_towers else None
        box_params = stack_params(self._box_convs()) if self.stack_box else None
        cls_out, reg_out, ctr_out = (), (), ()
        for feature, scale in zip(features, self.scales):
            cls_feat, reg_feat = self._towers(feature, start_params)
            cls_out += (_flatten(self.cls_logits(cls_feat)),)
            if self.stack_box:
                box, ctr = self.box_outputs(reg_feat, box_params)
            else:
                box = self.bbox_reg(reg_feat)
                if self.add_centerness:
                    ctr = self.centerness(reg_feat if self.cnt_on_reg else cls_feat)
            reg = scale(box)
            reg = self.relu(reg) if self.norm_reg_targets else ops.exp(reg)
            reg_out += (_flatten(reg),)
            if self.add_centerness:
                ctr_out += (_flatten(ctr),)
        bbox_reg = ops.concat(reg_out, axis=1)
        if self.add_centerness:
            centerness = ops.concat(ctr_out, axis=1)
        else:
            centerness = ops.zeros_like(bbox_reg[:, :, :1])
        return ops.concat(cls_out, axis=1), bbox_reg, centerness
