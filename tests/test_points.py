"""PointCoder: where the points of every level sit at any padded input size, and the ltrb coding.

The reference is written from torchvision's AnchorGenerator rule (step = padded size // feature
map size per axis, anchor centre = index * step), independently of src.model.points.
"""
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.model.points import PointCoder

STRIDES = (8, 16, 32, 64, 128)


def torchvision_points(height, width, strides, offset=0.0):
    """(P, 2) x, y of torchvision's anchor centres and (P,) the nominal size of their anchors."""
    points, sizes = [], []
    for s in strides:
        h, w = -(-height // s), -(-width // s)  # the stride-2 convs give ceil sizes
        step_y, step_x = height // h, width // w
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        points.append(np.stack([(xs.ravel() + offset) * step_x, (ys.ravel() + offset) * step_y], 1))
        sizes.append(np.full(h * w, s))
    return np.concatenate(points).astype(np.float32), np.concatenate(sizes).astype(np.float32)


class PointsNet(nn.Cell):
    """PointCoder.points inside a Cell, so it runs in GRAPH_MODE too: -> (points, scales)."""

    def __init__(self, coder):
        super().__init__()
        self.coder = coder

    def construct(self, images):
        points, scales, _ = self.coder.points(images.shape[2], images.shape[3])
        return points, scales


@pytest.mark.parametrize("height,width", [(800, 1216), (512, 864), (320, 320), (224, 352), (64, 96)])
def test_points_follow_torchvision_at_any_padded_size(mode, height, width):
    coder = PointCoder(STRIDES)
    points, scales = PointsNet(coder)(Tensor(np.zeros((1, 3, height, width), np.float32)))
    want_points, want_scales = torchvision_points(height, width, STRIDES)
    np.testing.assert_array_equal(points.asnumpy(), want_points)
    np.testing.assert_array_equal(scales.asnumpy(), want_scales)


def test_steps_differ_from_strides_where_the_size_does_not_divide():
    """COCO's usual 800x1216 batch: P6 steps (61, 64), P7 (114, 121), as torchvision computes them."""
    steps = PointCoder(STRIDES).level_steps(800, 1216)
    assert steps == ((8, 8), (16, 16), (32, 32), (61, 64), (114, 121))
    assert PointCoder(STRIDES, point_strides="nominal").level_steps(800, 1216) == tuple((s, s) for s in STRIDES)


def test_nominal_points_step_by_the_stride(mode):
    coder = PointCoder(STRIDES, point_offset=0.5, point_strides="nominal")
    points, scales = PointsNet(coder)(Tensor(np.zeros((1, 3, 800, 1216), np.float32)))
    offset = 0
    for s, (h, w) in zip(STRIDES, coder.level_sizes(800, 1216)):
        level = points.asnumpy()[offset:offset + h * w].reshape(h, w, 2)
        np.testing.assert_array_equal(level[0, :, 0], (np.arange(w) + 0.5) * s)
        np.testing.assert_array_equal(level[:, 0, 1], (np.arange(h) + 0.5) * s)
        offset += h * w
    assert offset == len(scales.asnumpy())


@pytest.mark.parametrize("norm", [True, False])
def test_encode_decode_round_trip(norm):
    coder = PointCoder(STRIDES, norm_reg_targets=norm)
    points = Tensor(np.array([[10.0, 20.0], [100.0, 40.0]], np.float32))
    scales = Tensor(np.array([8.0, 64.0], np.float32))
    boxes = Tensor(np.array([[[0.0, 4.0, 30.0, 50.0], [60.0, 0.0, 180.0, 90.0]]], np.float32))
    ltrb = coder.encode(points, boxes, scales).asnumpy()
    unit = np.array([[8.0], [64.0]]) if norm else 1.0
    np.testing.assert_allclose(ltrb[0], np.array([[10, 16, 20, 30], [40, 40, 80, 50]]) / unit, rtol=1e-6)
    np.testing.assert_allclose(coder.decode(points, Tensor(ltrb), scales).asnumpy(), boxes.asnumpy(), rtol=1e-6)


def test_unknown_point_strides_is_refused():
    with pytest.raises(ValueError, match="point_strides must be one of"):
        PointCoder(STRIDES, point_strides="paper")
