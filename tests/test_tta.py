"""Test-time augmentation: the views and their box mapping (src/inference/tta.py) and the fusion of
the views' candidates (src/inference/select.py fuse_views)."""
import numpy as np
import pytest

from src.inference.select import batched_nms, fuse_views, select_detections
from src.inference.tta import (IDENTITY, VIEW_SETS, invert_boxes, transform_boxes, transform_image, view_batch,
                               view_candidates, view_pad_shapes)

DIHEDRAL = VIEW_SETS["dihedral"]


def bright_box(image):
    """x1, y1, x2, y2 of the pixels of channel 0 above 0.5 in a (C, h, w) image."""
    rows, cols = np.nonzero(image[0] > 0.5)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def image_with_box(h, w, box):
    image = np.zeros((3, h, w), np.float32)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image


@pytest.mark.parametrize("view", DIHEDRAL)
def test_boxes_follow_the_image_of_every_view(view):
    h, w, box = 37, 52, (5, 3, 20, 11)
    image = image_with_box(h, w, box)
    viewed = transform_image(image, view)
    assert viewed.shape[1:] == ((h, w) if view[0] % 2 == 0 else (w, h))
    boxes = np.array([box], np.float32)
    np.testing.assert_array_equal(transform_boxes(boxes, view, (h, w))[0], bright_box(viewed))
    np.testing.assert_array_equal(invert_boxes(transform_boxes(boxes, view, (h, w)), view, (h, w)), boxes)


def test_the_eight_views_are_distinct():
    image = image_with_box(37, 52, (5, 3, 20, 11))
    image[0, 3, 5] = 2.0  # one marked corner, so no view equals another
    views = [transform_image(image, view) for view in DIHEDRAL]
    for i in range(len(views)):
        for j in range(i):
            assert views[i].shape != views[j].shape or not np.array_equal(views[i], views[j])


def test_view_batch_places_each_image_top_left_of_the_transposed_padding():
    images = np.zeros((2, 3, 64, 96), np.float32)
    images[0, :, :40, :90] = image_with_box(40, 90, (10, 5, 30, 15))
    images[1, :, :64, :50] = image_with_box(64, 50, (0, 0, 8, 60))
    sizes = np.array([[40, 90], [64, 50]])
    batch = view_batch(images, sizes, (1, True))
    assert batch.shape == (2, 3, 96, 64)
    for i, (h, w) in enumerate(sizes):
        expected = transform_image(images[i, :, :h, :w], (1, True))
        np.testing.assert_array_equal(batch[i, :, :w, :h], expected)
        assert not batch[i, :, w:].any() and not batch[i, :, :, h:].any()
    assert view_pad_shapes([(64, 96), (64, 96)], DIHEDRAL) == [(64, 96), (96, 64)]
    assert view_pad_shapes([(64, 96)], VIEW_SETS["hflip"]) == [(64, 96)]


class BrightBoxDetector:
    """A runtime (images -> candidates) that reports the bright rectangle of each image, scored 0.9
    when it lies in the left half of the image region it sees and 0.3 otherwise: what TTA must undo
    and average."""

    def __init__(self, sizes_seen):
        self.sizes_seen = sizes_seen

    def __call__(self, images):
        boxes, scores = [], []
        for image in images:
            box = bright_box(image)
            boxes.append([box])
            region_w = self.sizes_seen(image.shape)
            scores.append([0.9 if box[2] <= region_w / 2 else 0.3])
        return (np.array(boxes, np.float32), np.array(scores, np.float32), np.zeros((len(images), 1), np.int32))


def test_view_candidates_map_every_view_back_and_fusion_averages_their_scores():
    h, w = 40, 90
    images = np.zeros((1, 3, 64, 96), np.float32)
    images[0, :, :h, :w] = image_with_box(h, w, (10, 5, 30, 15))
    # The detector sees the image region as w wide for even turns and h wide for odd ones.
    runtime = BrightBoxDetector(lambda shape: w if shape == (3, 64, 96) else h)
    boxes, scores, labels, view_ids = view_candidates(runtime, images, np.array([[h, w]]), DIHEDRAL)
    assert boxes.shape == (1, 8, 4) and list(view_ids) == list(range(8))
    np.testing.assert_array_equal(boxes[0], np.tile([10, 5, 30, 15], (8, 1)))
    # Left half of the view in: the view itself, vertical mirror (turn 2 + hflip), and the turns whose
    # left edge the box's top or bottom edge becomes.
    expected = np.mean([0.9 if transform_boxes(boxes[0, :1], v, (h, w))[0, 2] <= (w if v[0] % 2 == 0 else h) / 2
                        else 0.3 for v in DIHEDRAL])
    out_boxes, out_scores, _ = select_detections(boxes[0], scores[0], labels[0], (h, w), 0.05, 0.5, 100,
                                                 view_ids=view_ids, num_views=8)
    np.testing.assert_allclose(out_boxes, [[10, 5, 30, 15]], atol=1e-5)
    np.testing.assert_allclose(out_scores, [expected], rtol=1e-6)
    assert 0.3 < expected < 0.9

    single = view_candidates(runtime, images, np.array([[h, w]]), IDENTITY)
    np.testing.assert_array_equal(single[0], boxes[:, :1])
    assert list(single[3]) == [0]


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(5, 30, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_fusion_of_one_view_is_nms():
    rng = np.random.default_rng(0)
    for _ in range(20):
        boxes = random_boxes(rng, 60)
        scores = rng.uniform(0, 1, 60).astype(np.float32)
        labels = rng.integers(0, 3, 60).astype(np.int32)
        kept = batched_nms(boxes, scores, labels, 0.5, 25)
        fused = fuse_views(boxes, scores, labels, np.zeros(60, np.int32), 1, 0.5, 25)
        np.testing.assert_array_equal(fused[0], boxes[kept])
        np.testing.assert_array_equal(fused[1], scores[kept])
        np.testing.assert_array_equal(fused[2], labels[kept])


def test_fusion_weights_boxes_by_score_and_counts_missing_views_as_zero():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0.5, 0, 10, 10.5],   # one object, views 0, 1, 0
                      [50, 50, 60, 60],                                      # seen by view 1 alone
                      [0, 0, 10, 10]], np.float32)                           # another class
    scores = np.array([0.8, 0.4, 0.6, 0.9, 0.5], np.float32)
    labels = np.array([0, 0, 0, 0, 1], np.int32)
    view_ids = np.array([0, 1, 0, 1, 0], np.int32)
    out_boxes, out_scores, out_labels = fuse_views(boxes, scores, labels, view_ids, 2, 0.5)
    # The cluster keeps the best of each view (0.8 of view 0, 0.4 of view 1), not view 0's 0.6.
    np.testing.assert_allclose(out_scores, [0.6, 0.45, 0.25], rtol=1e-6)
    np.testing.assert_allclose(out_boxes[0], (0.8 * boxes[0] + 0.4 * boxes[1]) / 1.2, rtol=1e-6)
    np.testing.assert_allclose(out_boxes[1], boxes[3])
    np.testing.assert_allclose(out_boxes[2], boxes[4])
    assert list(out_labels) == [0, 0, 1]
    assert len(fuse_views(boxes, scores, labels, view_ids, 2, 0.5, max_keep=2)[0]) == 2
    empty = fuse_views(boxes[:0], scores[:0], labels[:0], view_ids[:0], 8, 0.5, 100)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)
