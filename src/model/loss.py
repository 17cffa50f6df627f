"""FCOS losses: sigmoid focal classification, GIoU/IoU box regression, centreness BCE.

Each loss is a sum divided by the number of positive points of the batch (at least 1), as
torchvision's FCOSHead.compute_loss. Everything is masked arithmetic on fixed shapes, so the
Cell compiles once per input size in GRAPH_MODE and behaves the same in PYNATIVE_MODE.
"""
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import get_group_size

from src.model.points import PointCoder
from src.model.targets import assign_targets


def sigmoid_focal_loss(logits, targets, alpha, gamma):
    """Elementwise sigmoid focal loss (Lin et al. 2017), unreduced.

    Args:
        logits, targets: same shape, targets in {0, 1} (float).
        alpha (float): weight of positives; negative disables the alpha balance.
        gamma (float): focusing exponent.
    Returns:
        loss of the shape of logits.
    """
    # reduction='none': the 'mean' reduction reuses a stale element count in PyNative backward.
    ce = ops.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = ops.sigmoid(logits)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ops.pow(1 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def box_overlap_terms(pred, target):
    """Areas of two boxes sharing the same point, given as ltrb distances from it.

    Args:
        pred, target: (..., 4) l, t, r, b, non-negative, in the same unit.
    Returns:
        intersection, union, enclosing area: each (...,).
    """
    pl, pt, pr, pb = pred[..., 0], pred[..., 1], pred[..., 2], pred[..., 3]
    tl, tt, tr, tb = target[..., 0], target[..., 1], target[..., 2], target[..., 3]
    # Both boxes contain the point, so their overlap is the sum of the smaller side distances;
    # the clamp keeps a negative (invalid) prediction from creating a negative overlap.
    inter_w = ops.relu(ops.minimum(pl, tl) + ops.minimum(pr, tr))
    inter_h = ops.relu(ops.minimum(pt, tt) + ops.minimum(pb, tb))
    inter = inter_w * inter_h
    union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
    enclose = (ops.maximum(pl, tl) + ops.maximum(pr, tr)) * (ops.maximum(pt, tt) + ops.maximum(pb, tb))
    return inter, union, enclose


def giou_loss(pred, target, eps=1e-7):
    """1 - generalised IoU of ltrb box pairs (eps as torchvision's generalized_box_iou_loss).

    Args:
        pred, target: (..., 4) l, t, r, b.
    Returns:
        (...,) loss in [0, 2].
    """
    inter, union, enclose = box_overlap_terms(pred, target)
    iou = inter / (union + eps)
    return 1 - (iou - (enclose - union) / (enclose + eps))


def iou_loss(pred, target, eps=1e-7):
    """-ln(IoU) of ltrb box pairs (UnitBox, the FCOS paper's regression loss).

    Args:
        pred, target: (..., 4) l, t, r, b.
    Returns:
        (...,) non-negative loss.
    """
    inter, union, _ = box_overlap_terms(pred, target)
    return -ops.log(ops.clamp(inter / (union + eps), min=eps))


class FCOSLoss(nn.Cell):
    """Assigns targets to every point and computes the three FCOS losses.

    Args:
        coder (PointCoder): the model's points and box coding (FCOS.point_coder).
        limit_range (tuple[tuple[float, float]]): per level open range of max(l,t,r,b) in pixels.
        center_sampling_radius (float): in strides; 0 disables centre sampling.
        focal_alpha, focal_gamma (float): focal loss parameters.
        reg_loss (str): 'giou' or 'iou'.
        centerness_weighted_reg (bool): weight each positive's regression loss by its
            centreness target and normalise by the sum of those weights (FCOS improvements).
        add_centerness (bool): train the centreness branch; False makes loss_ctr 0.
        distributed (bool): normalise by the mean over devices of the positive count. With
            data parallel gradient averaging this gives every positive of the global batch the
            same weight, sum_d S_d / sum_d N_d, whatever its device. Needs
            mindspore.communication.init() before construction.
    Inputs:
        images: (B, 3, H, W), only its static shape is used.
        cls_logits: (B, P, C); bbox_reg: (B, P, 4); centerness: (B, P, 1).
        gt_boxes: (B, M, 4) float32; gt_labels: (B, M) int32; gt_mask: (B, M) bool.
    Outputs:
        loss_total, loss_cls, loss_reg, loss_ctr: float32 scalars.
    """

    def __init__(self, coder: PointCoder, limit_range: Sequence[Sequence[float]], center_sampling_radius: float = 1.5,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, reg_loss: str = "giou",
                 centerness_weighted_reg: bool = False, add_centerness: bool = True, distributed: bool = False) -> None:
        super().__init__()
        if reg_loss not in ("giou", "iou"):
            raise ValueError(f"reg_loss must be 'giou' or 'iou', got {reg_loss!r}")
        if len(limit_range) != len(coder.strides):
            raise ValueError(f"limit_range has {len(limit_range)} levels, strides {len(coder.strides)}")
        self.coder = coder
        self.limit_range = tuple((float(lo), float(hi)) for lo, hi in limit_range)
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.use_giou = reg_loss == "giou"
        self.centerness_weighted_reg = centerness_weighted_reg
        self.add_centerness = add_centerness
        self.distributed = distributed
        if distributed:
            self.all_reduce = ops.AllReduce()
            self.group_size = float(get_group_size())

    def _mean_over_devices(self, value):
        """Mean of a scalar over the devices of data parallel training (identity otherwise)."""
        value = ops.stop_gradient(value)
        if self.distributed:
            value = self.all_reduce(value) / self.group_size
        return value

    def construct(self, images, cls_logits, bbox_reg, centerness, gt_boxes, gt_labels, gt_mask):
        points, point_strides, sizes = self.coder.points(images.shape[2], images.shape[3])
        point_limits = self.coder.per_point(sizes, self.limit_range)
        cls_targets, reg_targets, ctr_targets, pos_mask = assign_targets(
            self.coder, points, point_strides, point_limits, gt_boxes, gt_labels, gt_mask,
            self.center_sampling_radius)
        pos = pos_mask.astype(ms.float32)
        normaliser = ops.maximum(self._mean_over_devices(pos.sum()), 1.0)

        classes = ops.arange(cls_logits.shape[-1], dtype=ms.int32)
        one_hot = (ops.expand_dims(cls_targets, -1) == classes).astype(cls_logits.dtype)
        loss_cls = sigmoid_focal_loss(cls_logits, one_hot, self.focal_alpha,
                                      self.focal_gamma).sum() / normaliser

        # A unit box on background rows keeps the loss and its gradient finite there.
        pos4 = ops.expand_dims(pos_mask, -1)
        safe_targets = ops.where(pos4, reg_targets, ops.ones_like(reg_targets))
        if self.use_giou:
            box_loss = giou_loss(bbox_reg, safe_targets)
        else:
            box_loss = iou_loss(bbox_reg, safe_targets)
        box_loss = ops.where(pos_mask, box_loss, ops.zeros_like(box_loss))
        if self.centerness_weighted_reg:
            reg_norm = ops.maximum(self._mean_over_devices(ctr_targets.sum()), 1e-6)
            loss_reg = (box_loss * ctr_targets).sum() / reg_norm
        else:
            loss_reg = box_loss.sum() / normaliser

        if self.add_centerness:
            ctr_logits = centerness[..., 0]
            ctr_loss = ops.binary_cross_entropy_with_logits(ctr_logits, ctr_targets,
                                                            reduction="none")
            loss_ctr = ops.where(pos_mask, ctr_loss, ops.zeros_like(ctr_loss)).sum() / normaliser
        else:
            loss_ctr = ops.zeros((), ms.float32)
        loss_total = loss_cls + loss_reg + loss_ctr
        return loss_total, loss_cls, loss_reg, loss_ctr
