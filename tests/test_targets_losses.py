"""Target assignment and losses against a plain NumPy reference, plus the edge cases.

Small images (64x96, five levels, 129 points) keep every graph tiny; 96 does not divide by 64,
so P6's torchvision point step (96 // 2 = 48) differs from its stride and both point rules count.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.model.loss import FCOSLoss, giou_loss, iou_loss
from src.model.points import PointCoder
from src.model.targets import assign_targets

STRIDES = (8, 16, 32, 64, 128)
LIMITS = ((-1.0, 16.0), (16.0, 32.0), (32.0, 64.0), (64.0, 128.0), (128.0, float("inf")))
IMAGE_HW = (64, 96)
NUM_CLASSES = 4


@pytest.fixture
def pynative():
    """Eager mode for tests that call the loss many times on one shape."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)


class AssignNet(nn.Cell):
    """Points, per-point limits and assign_targets in one Cell (compiles in GRAPH_MODE)."""

    def __init__(self, point_offset=0.0, radius=1.5, norm_reg_targets=True, limits=LIMITS,
                 point_strides="torchvision"):
        super().__init__()
        self.coder = PointCoder(STRIDES, point_offset, norm_reg_targets, point_strides)
        self.radius = radius
        self.limits = limits

    def construct(self, images, gt_boxes, gt_labels, gt_mask):
        points, point_strides, sizes = self.coder.points(images.shape[2], images.shape[3])
        point_limits = self.coder.per_point(sizes, self.limits)
        return assign_targets(self.coder, points, point_strides, point_limits, gt_boxes, gt_labels,
                              gt_mask, self.radius)


def images(batch=2):
    return Tensor(np.zeros((batch, 3) + IMAGE_HW, np.float32))


def numpy_points(point_offset, point_strides="torchvision"):
    """(P, 2) points, (P,) strides and (P, 2) limits, written independently of src.model.points.

    torchvision's step of a level is, per axis, padded size // feature map size; nominal: stride.
    """
    points, strides, limits = [], [], []
    for s, limit in zip(STRIDES, LIMITS):
        h, w = -(-IMAGE_HW[0] // s), -(-IMAGE_HW[1] // s)
        step_y, step_x = (IMAGE_HW[0] // h, IMAGE_HW[1] // w) if point_strides == "torchvision" else (s, s)
        for i in range(h):
            for j in range(w):
                points.append(((j + point_offset) * step_x, (i + point_offset) * step_y))
                strides.append(s)
                limits.append(limit)
    return (np.asarray(points, np.float32), np.asarray(strides, np.float32),
            np.asarray(limits, np.float32))


def reference_assign(gt_boxes, gt_labels, gt_mask, point_offset, radius, norm_reg_targets,
                     point_strides="torchvision"):
    """Loop-per-point FCOS assignment (smallest matching area wins).

    Returns:
        cls (B, P) class or -1, reg (B, P, 4), ctr (B, P), matched GT index (B, P) or -1.
    """
    points, strides, limits = numpy_points(point_offset, point_strides)
    batch, num_points = len(gt_boxes), len(points)
    matched = np.full((batch, num_points), -1, np.int64)
    cls = np.full((batch, num_points), -1, np.int64)
    reg = np.zeros((batch, num_points, 4), np.float32)
    ctr = np.zeros((batch, num_points), np.float32)
    for b in range(batch):
        for p, (x, y) in enumerate(points):
            best_area = np.inf
            for m in np.flatnonzero(gt_mask[b]):
                x1, y1, x2, y2 = gt_boxes[b, m]
                dist = np.array([x - x1, y - y1, x2 - x, y2 - y], np.float32)
                centre_ok = radius == 0 or max(abs(x - (x1 + x2) / 2),
                                               abs(y - (y1 + y2) / 2)) < radius * strides[p]
                area = (x2 - x1) * (y2 - y1)
                if (dist.min() > 0 and limits[p, 0] < dist.max() < limits[p, 1] and centre_ok
                        and area < best_area):
                    matched[b, p], best_area = m, area
            if matched[b, p] >= 0:
                x1, y1, x2, y2 = gt_boxes[b, matched[b, p]]
                dist = np.array([x - x1, y - y1, x2 - x, y2 - y], np.float32)
                cls[b, p] = gt_labels[b, matched[b, p]]
                reg[b, p] = dist / (strides[p] if norm_reg_targets else 1.0)
                ctr[b, p] = np.sqrt(min(dist[0], dist[2]) / max(dist[0], dist[2])
                                    * min(dist[1], dist[3]) / max(dist[1], dist[3]))
    return cls, reg, ctr, matched


def random_ground_truth(seed, batch=2, max_gt=6, min_side=4.0):
    """Random overlapping boxes (some reaching outside the image) plus padding rows."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(-10, IMAGE_HW[1] - 8, (batch, max_gt))
    y1 = rng.uniform(-10, IMAGE_HW[0] - 8, (batch, max_gt))
    w = rng.uniform(min_side, 90, (batch, max_gt))
    h = rng.uniform(min_side, 70, (batch, max_gt))
    boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=-1).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (batch, max_gt)).astype(np.int32)
    mask = np.zeros((batch, max_gt), bool)
    mask[0, :max_gt - 2] = True
    mask[1, :max_gt - 1] = True
    boxes[~mask] = 0
    labels[~mask] = 0
    return boxes, labels, mask


def run_assign(net, boxes, labels, mask):
    outputs = net(images(len(boxes)), Tensor(boxes), Tensor(labels), Tensor(mask))
    return [o.asnumpy() for o in outputs]


@pytest.mark.parametrize("point_offset,radius,norm,point_strides", [
    (0.0, 1.5, True, "torchvision"), (0.5, 0.0, False, "torchvision"), (0.5, 1.5, False, "nominal"),
    (0.0, 1.5, True, "nominal")])
def test_assignment_matches_numpy_reference(mode, point_offset, radius, norm, point_strides):
    net = AssignNet(point_offset, radius, norm, point_strides=point_strides)
    for seed in range(3):
        boxes, labels, mask = random_ground_truth(seed)
        cls, reg, ctr, pos = run_assign(net, boxes, labels, mask)
        ref_cls, ref_reg, ref_ctr, _ = reference_assign(boxes, labels, mask, point_offset, radius,
                                                        norm, point_strides)
        assert pos.sum() > 0
        np.testing.assert_array_equal(cls, ref_cls)
        np.testing.assert_array_equal(pos, ref_cls >= 0)
        np.testing.assert_allclose(reg, ref_reg, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ctr, ref_ctr, rtol=1e-5, atol=1e-6)
        assert cls.dtype == np.int32 and np.isfinite(ctr).all()


def test_smallest_area_wins_in_any_order(pynative):
    big = [8.0, 8.0, 90.0, 60.0]
    small = [20.0, 20.0, 36.0, 36.0]
    net = AssignNet(radius=0.0, limits=((-1.0, float("inf")),) * 5)
    point = (24.0, 24.0)  # a P3 point inside both boxes
    index = 3 * 12 + 3
    for order in ([big, small], [small, big]):
        labels = np.array([[0, 1]] if order[0] is big else [[1, 0]], np.int32)
        cls, reg, _, _ = run_assign(net, np.array([order], np.float32), labels,
                                    np.ones((1, 2), bool))
        assert cls[0, index] == 1
        np.testing.assert_allclose(reg[0, index] * 8,
                                   [point[0] - 20, point[1] - 20, 36 - point[0], 36 - point[1]])


def test_limit_ranges_pick_the_level(pynative):
    # A 40x40 box centred on (48, 32): the centre's max side distance is 20, inside P4's
    # (16, 32) range, so the centre is positive on P4 and negative on P3.
    boxes = np.array([[[28.0, 12.0, 68.0, 52.0]]], np.float32)
    _, _, _, pos = run_assign(AssignNet(radius=0.0), boxes, np.zeros((1, 1), np.int32),
                              np.ones((1, 1), bool))
    points, strides, limits = numpy_points(0.0)
    dist = np.stack([points[:, 0] - 28, points[:, 1] - 12, 68 - points[:, 0], 52 - points[:, 1]], 1)
    expected = (dist.min(1) > 0) & (dist.max(1) > limits[:, 0]) & (dist.max(1) < limits[:, 1])
    np.testing.assert_array_equal(pos[0], expected)
    at_centre = (points == [48.0, 32.0]).all(1)
    assert not pos[0][at_centre & (strides == 8)].any()
    assert pos[0][at_centre & (strides == 16)].all()
    assert not pos[0][strides == 8].any() and not pos[0][strides >= 64].any()


def test_centre_sampling_radius(pynative):
    boxes = np.array([[[2.0, 2.0, 94.0, 62.0]]], np.float32)
    wide_open = ((-1.0, float("inf")),) * 5
    _, _, _, pos_off = run_assign(AssignNet(radius=0.0, limits=wide_open), boxes,
                                  np.zeros((1, 1), np.int32), np.ones((1, 1), bool))
    _, _, _, pos_on = run_assign(AssignNet(radius=1.5, limits=wide_open), boxes,
                                 np.zeros((1, 1), np.int32), np.ones((1, 1), bool))
    points, strides, _ = numpy_points(0.0)
    near = np.abs(points - [48.0, 32.0]).max(1) < 1.5 * strides
    assert pos_on[0].sum() < pos_off[0].sum()
    np.testing.assert_array_equal(pos_on[0], pos_off[0] & near)


def test_padded_rows_never_assigned(pynative):
    boxes, labels, mask = random_ground_truth(3)
    # A padded row covering the whole image with the smallest area would win everywhere.
    boxes[0, -1] = [-1.0, -1.0, 97.0, 65.0]
    labels[0, -1] = NUM_CLASSES - 1
    net = AssignNet()
    cls_padded, _, _, _ = run_assign(net, boxes, labels, mask)
    cls_ref, _, _, _ = reference_assign(boxes, labels, mask, 0.0, 1.5, True)
    np.testing.assert_array_equal(cls_padded, cls_ref)
    _, _, _, none = run_assign(net, boxes, labels, np.zeros_like(mask))
    assert not none.any()


def test_huge_boxes(pynative):
    # Areas 1.6e9 and 9e8: torchvision's (1e8 - area) trick would drop both.
    boxes = np.array([[[-20000.0, -20000.0, 20000.0, 20000.0],
                       [-15000.0, -15000.0, 15000.0, 15000.0]]], np.float32)
    labels = np.array([[2, 1]], np.int32)
    cls, reg, _, pos = run_assign(AssignNet(), boxes, labels, np.ones((1, 2), bool))
    # Only the single P7 point (0, 0) has a large enough side distance and sits near the centre.
    assert pos[0].sum() == 1 and pos[0, -1]
    assert cls[0, -1] == 1
    np.testing.assert_allclose(reg[0, -1], [15000.0 / 128] * 4, rtol=1e-6)


def numpy_losses(cls_logits, bbox_reg, centerness, boxes, labels, mask, point_offset, radius,
                 norm, weighted=False, alpha=0.25, gamma=2.0, point_strides="torchvision"):
    """torchvision-style losses in float64 on corner boxes (independent of the ltrb formulas)."""
    ref_cls, _, ref_ctr, matched = reference_assign(boxes, labels, mask, point_offset, radius,
                                                    norm, point_strides)
    points, strides, _ = numpy_points(point_offset, point_strides)
    pos = ref_cls >= 0
    num_pos = max(pos.sum(), 1)
    x = cls_logits.astype(np.float64)
    target = (ref_cls[..., None] == np.arange(cls_logits.shape[-1])).astype(np.float64)
    prob = 1 / (1 + np.exp(-x))
    ce = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma

    scale = strides[:, None] if norm else 1.0
    dist = bbox_reg.astype(np.float64) * scale
    pred = np.concatenate([points - dist[..., :2], points + dist[..., 2:]], -1)
    gt_index = np.maximum(matched, 0)
    gt = np.take_along_axis(boxes.astype(np.float64), gt_index[..., None], 1)[pos]
    pr = pred[pos]
    inter = (np.clip(np.minimum(pr[:, 2], gt[:, 2]) - np.maximum(pr[:, 0], gt[:, 0]), 0, None)
             * np.clip(np.minimum(pr[:, 3], gt[:, 3]) - np.maximum(pr[:, 1], gt[:, 1]), 0, None))
    union = np.prod(pr[:, 2:] - pr[:, :2], 1) + np.prod(gt[:, 2:] - gt[:, :2], 1) - inter
    enclose = np.prod(np.maximum(pr[:, 2:], gt[:, 2:]) - np.minimum(pr[:, :2], gt[:, :2]), 1)
    giou = inter / union - (enclose - union) / enclose

    c = centerness[..., 0].astype(np.float64)[pos]
    t = ref_ctr[pos].astype(np.float64)
    bce = np.maximum(c, 0) - c * t + np.log1p(np.exp(-np.abs(c)))
    reg = (t * (1 - giou)).sum() / t.sum() if weighted else (1 - giou).sum() / num_pos
    return focal.sum() / num_pos, reg, bce.sum() / num_pos


def random_head_outputs(seed, norm, batch=2):
    rng = np.random.default_rng(seed)
    num_points = len(numpy_points(0.0)[0])
    cls_logits = rng.normal(-2.0, 1.5, (batch, num_points, NUM_CLASSES)).astype(np.float32)
    raw = rng.normal(0.0, 0.5, (batch, num_points, 4))
    bbox_reg = (np.exp(raw) * 20 if not norm else np.maximum(raw + 1.5, 0)).astype(np.float32)
    centerness = rng.normal(0.0, 1.0, (batch, num_points, 1)).astype(np.float32)
    return cls_logits, bbox_reg, centerness


def make_loss(point_offset=0.0, radius=1.5, norm=True, point_strides="torchvision", **kwargs):
    return FCOSLoss(PointCoder(STRIDES, point_offset, norm, point_strides), LIMITS, radius, **kwargs)


def run_loss(loss, head, boxes, labels, mask):
    outputs = loss(images(len(boxes)), *(Tensor(a) for a in head), Tensor(boxes), Tensor(labels),
                   Tensor(mask))
    return [float(o.asnumpy()) for o in outputs]


@pytest.mark.parametrize("point_offset,radius,norm,weighted,point_strides", [
    (0.5, 1.5, False, False, "torchvision"), (0.0, 1.5, True, False, "torchvision"),
    (0.0, 0.0, True, True, "nominal")])
def test_losses_match_numpy_reference(mode, point_offset, radius, norm, weighted, point_strides):
    boxes, labels, mask = random_ground_truth(4)
    head = random_head_outputs(5, norm)
    loss = make_loss(point_offset, radius, norm, point_strides, centerness_weighted_reg=weighted)
    total, cls, reg, ctr = run_loss(loss, head, boxes, labels, mask)
    want = numpy_losses(*head, boxes, labels, mask, point_offset, radius, norm, weighted,
                        point_strides=point_strides)
    np.testing.assert_allclose([cls, reg, ctr], want, rtol=1e-4)
    assert total == pytest.approx(sum(want), rel=1e-4)


def test_empty_ground_truth_gives_zero_box_losses_and_finite_grads(mode):
    boxes, labels, mask = random_ground_truth(6)
    mask[:] = False
    head = random_head_outputs(7, True)
    loss = make_loss()
    total, cls, reg, ctr = run_loss(loss, head, boxes, labels, mask)
    assert reg == 0.0 and ctr == 0.0 and cls > 0.0 and total == cls

    def total_loss(cls_logits, bbox_reg, centerness):
        return loss(images(), cls_logits, bbox_reg, centerness, Tensor(boxes), Tensor(labels),
                    Tensor(mask))[0]

    grads = ms.grad(total_loss, grad_position=(0, 1, 2))(*(Tensor(a) for a in head))
    for grad in grads:
        assert np.isfinite(grad.asnumpy()).all()
    assert np.abs(grads[0].asnumpy()).sum() > 0
    assert not grads[1].asnumpy().any() and not grads[2].asnumpy().any()


@pytest.mark.parametrize("reg_loss", ["giou", "iou"])
def test_saturated_outputs_give_finite_loss_and_grads(pynative, reg_loss):
    boxes, labels, mask = random_ground_truth(10)
    cls_logits, bbox_reg, centerness = random_head_outputs(11, True)
    cls_logits[:, ::2] = 60.0  # sigmoid is exactly 1 or 0 in float32: no log(0), no 0 ** 0 grad
    cls_logits[:, 1::2] = -60.0
    bbox_reg[:, ::3] = 0.0  # dead ReLU: empty predicted boxes
    centerness[:] = 80.0
    loss = make_loss(reg_loss=reg_loss)

    def total_loss(*head):
        return loss(images(), *head, Tensor(boxes), Tensor(labels), Tensor(mask))[0]

    head = (Tensor(cls_logits), Tensor(bbox_reg), Tensor(centerness))
    assert np.isfinite(total_loss(*head).asnumpy())
    for grad in ms.grad(total_loss, grad_position=(0, 1, 2))(*head):
        assert np.isfinite(grad.asnumpy()).all()


@pytest.mark.parametrize("loss_fn,expected", [(giou_loss, 0.75), (iou_loss, -np.log(0.25))])
def test_box_losses_on_known_pairs(pynative, loss_fn, expected):
    same = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 7.0, 0.25]], np.float32)
    np.testing.assert_allclose(loss_fn(Tensor(same), Tensor(same)).asnumpy(), 0.0, atol=1e-6)
    # Same point, sides 1 vs 2: IoU = 4 / 16, the enclosing box is the union, so GIoU = IoU.
    value = loss_fn(Tensor(np.ones((1, 4), np.float32)), Tensor(np.full((1, 4), 2.0, np.float32)))
    np.testing.assert_allclose(value.asnumpy(), [expected], rtol=1e-6)


def test_giou_of_boxes_touching_at_the_point(pynative):
    # (l,t,r,b) = (4,1,0,1) vs (0,1,4,1): IoU 0, the enclosing box is the union (area 16),
    # so GIoU = 0 and the loss is 1.
    pred = Tensor(np.array([[4.0, 1.0, 0.0, 1.0]], np.float32))
    target = Tensor(np.array([[0.0, 1.0, 4.0, 1.0]], np.float32))
    np.testing.assert_allclose(giou_loss(pred, target).asnumpy(), [1.0], rtol=1e-6)


def test_giou_gradient_matches_finite_differences(pynative):
    boxes, labels, mask = random_ground_truth(8)
    head = random_head_outputs(9, True)
    loss = make_loss(reg_loss="giou", centerness_weighted_reg=True)
    _, reg_targets, _, pos = run_assign(AssignNet(), boxes, labels, mask)
    b, p = np.argwhere(pos)[0]
    head[1][b, p] = [0.9, 1.3, 0.7, 1.1]
    step = 1e-2
    # The overlap terms have kinks where a predicted side equals the target side.
    assert np.abs(head[1][b, p] - reg_targets[b, p]).min() > 2 * step

    def total_loss(cls_logits, bbox_reg, centerness):
        return loss(images(), cls_logits, bbox_reg, centerness, Tensor(boxes), Tensor(labels),
                    Tensor(mask))[0]

    grads = [g.asnumpy() for g in
             ms.grad(total_loss, grad_position=(0, 1, 2))(*(Tensor(a) for a in head))]
    negative = tuple(np.argwhere(~pos)[3])
    probes = [(0, (b, p, 0)), (0, negative + (1,)), (1, (b, p, 0)), (1, (b, p, 3)),
              (2, (b, p, 0))]
    for which, index in probes:
        values = []
        for sign in (1, -1):
            shifted = [a.copy() for a in head]
            shifted[which][index] += sign * step
            values.append(float(total_loss(*(Tensor(a) for a in shifted)).asnumpy()))
        numeric = (values[0] - values[1]) / (2 * step)
        assert grads[which][index] == pytest.approx(numeric, rel=2e-2, abs=2e-4), (which, index)
