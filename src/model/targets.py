"""FCOS target assignment on padded ground truth (static shapes, no dynamic indexing).

A point is positive for a GT box when it lies strictly inside the box, (optionally) within
center_sampling_radius * stride of the box centre in both x and y, and the largest of its four
side distances falls in the open range of its level. Among several matching boxes the one of
smallest area wins. Padded GT rows (gt_mask False) and rows with a non-finite coordinate never
match. Rules as torchvision's FCOS.compute_loss, but the tie break is a true argmin over areas, so boxes of any size work.
"""
import mindspore as ms
from mindspore import ops


def _pairwise_distances(points, gt_boxes):
    """Side distances of every point to every box.

    Args:
        points: (P, 2) x, y.
        gt_boxes: (B, M, 4) x1, y1, x2, y2.
    Returns:
        l, t, r, b: each (B, P, M), in pixels.
    """
    x = points[:, 0].reshape(1, -1, 1)
    y = points[:, 1].reshape(1, -1, 1)
    x1 = ops.expand_dims(gt_boxes[..., 0], 1)
    y1 = ops.expand_dims(gt_boxes[..., 1], 1)
    x2 = ops.expand_dims(gt_boxes[..., 2], 1)
    y2 = ops.expand_dims(gt_boxes[..., 3], 1)
    return x - x1, y - y1, x2 - x, y2 - y


def _centre_window(points, point_strides, gt_boxes, radius):
    """Whether each point lies within radius * stride of each box centre (Chebyshev distance).

    Returns:
        (B, P, M) bool.
    """
    x = points[:, 0].reshape(1, -1, 1)
    y = points[:, 1].reshape(1, -1, 1)
    cx = ops.expand_dims((gt_boxes[..., 0] + gt_boxes[..., 2]) / 2, 1)
    cy = ops.expand_dims((gt_boxes[..., 1] + gt_boxes[..., 3]) / 2, 1)
    window = (point_strides * radius).reshape(1, -1, 1)
    return ops.maximum(ops.abs(x - cx), ops.abs(y - cy)) < window


def centerness_target(ltrb, pos_mask):
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) on positives, 0 elsewhere.

    Args:
        ltrb: (B, P, 4) regression targets (any positive unit; the ratio is scale free).
        pos_mask: (B, P) bool.
    Returns:
        (B, P) float32. Denominators are kept above zero so non-positive rows give no NaN.
    """
    left, top, right, bottom = ltrb[..., 0], ltrb[..., 1], ltrb[..., 2], ltrb[..., 3]
    tiny = 1e-12
    ratio_x = ops.minimum(left, right) / ops.maximum(ops.maximum(left, right), tiny)
    ratio_y = ops.minimum(top, bottom) / ops.maximum(ops.maximum(top, bottom), tiny)
    ctr = ops.sqrt(ops.clamp(ratio_x * ratio_y, min=0.0))
    return ops.where(pos_mask, ctr, ops.zeros_like(ctr))


def assign_targets(coder, points, point_strides, point_limits, gt_boxes, gt_labels, gt_mask,
                   center_sampling_radius):
    """Classification, regression and centreness targets of every point.

    Args:
        coder: the model's PointCoder (src.model.points), which encodes the matched boxes.
        points: (P, 2) float32 x, y of every location (PointCoder.points).
        point_strides: (P,) float32 nominal stride of each point's level.
        point_limits: (P, 2) float32 (lower, upper) open range of max(l,t,r,b) per point.
        gt_boxes: (B, M, 4) float32 x1, y1, x2, y2.
        gt_labels: (B, M) int32 0-based class indices.
        gt_mask: (B, M) bool, True for real boxes.
        center_sampling_radius (float): in strides; 0 disables centre sampling.
    Returns:
        cls_targets: (B, P) int32 class index, -1 for background.
        reg_targets: (B, P, 4) float32 l, t, r, b of the matched box (coder.encode), 0 on background.
        ctr_targets: (B, P) float32 centreness target, 0 on background.
        pos_mask: (B, P) bool.
    """
    left, top, right, bottom = _pairwise_distances(points, gt_boxes)
    min_side = ops.minimum(ops.minimum(left, top), ops.minimum(right, bottom))
    max_side = ops.maximum(ops.maximum(left, top), ops.maximum(right, bottom))
    lower = point_limits[:, 0].reshape(1, -1, 1)
    upper = point_limits[:, 1].reshape(1, -1, 1)
    match = (min_side > 0) & (max_side > lower) & (max_side < upper)
    # a NaN coordinate would otherwise drop out of minimum/maximum and let the row match
    usable = gt_mask & ops.isfinite(gt_boxes).all(axis=-1)
    match = match & ops.expand_dims(usable, 1)
    if center_sampling_radius > 0:
        match = match & _centre_window(points, point_strides, gt_boxes, center_sampling_radius)

    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
    areas = ops.broadcast_to(ops.expand_dims(areas, 1), match.shape)
    cost = ops.where(match, areas, ops.full_like(areas, float("inf")))
    matched_idx = ops.argmin(cost, axis=2)  # (B, P); first index wins equal areas
    pos_mask = match.any(axis=2)

    batch, num_points = matched_idx.shape
    box_idx = ops.broadcast_to(ops.expand_dims(matched_idx, -1), (batch, num_points, 4))
    matched_boxes = ops.gather_elements(gt_boxes, 1, box_idx)
    matched_labels = ops.gather_elements(gt_labels, 1, matched_idx).astype(ms.int32)

    reg_targets = coder.encode(points, matched_boxes, point_strides)
    pos4 = ops.expand_dims(pos_mask, -1)
    reg_targets = ops.where(pos4, reg_targets, ops.zeros_like(reg_targets))
    cls_targets = ops.where(pos_mask, matched_labels, ops.full_like(matched_labels, -1))
    ctr_targets = centerness_target(reg_targets, pos_mask)
    return (ops.stop_gradient(cls_targets), ops.stop_gradient(reg_targets),
            ops.stop_gradient(ctr_targets), ops.stop_gradient(pos_mask))
