"""Decoding and detection selection: NMS cases, clipping, rescaling, limits, decoder top-k."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.inference.decoder import FCOSDecoder
from src.geometry import clip_boxes, rescale_boxes
from src.inference.select import batched_nms, postprocess_batch, select_detections
from src.model.points import PointCoder

STRIDES = (8, 16, 32, 64, 128)
IMAGE_HW = (64, 96)
NUM_CLASSES = 3


def boxes_of(*rows):
    return np.array(rows, np.float32).reshape(-1, 4)


def test_overlapping_same_class_suppressed_other_class_kept():
    boxes = boxes_of([0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30])
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0])
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.5), [0, 2, 3])


def test_threshold_boundary_is_strict():
    # IoU exactly 0.5 (area 50 inside area 100): kept at threshold 0.5, dropped just below it.
    boxes = boxes_of([0, 0, 10, 10], [0, 0, 10, 5])
    scores = np.array([0.9, 0.8], np.float32)
    labels = np.zeros(2, np.int64)
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.5), [0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.49), [0])


def test_suppression_is_greedy_not_transitive():
    # B overlaps A and C, A and C do not overlap: A suppresses B, so C survives.
    boxes = boxes_of([0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10])
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.zeros(3), 0.3), [0, 2])


def test_equal_scores_keep_the_first_box():
    boxes = boxes_of([0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60])
    scores = np.array([0.5, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.zeros(3), 0.5), [0, 2])


def test_empty_input_and_nothing_above_threshold():
    for boxes, scores in ((np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
                          (boxes_of([0, 0, 5, 5]), np.array([0.05], np.float32))):
        out_boxes, out_scores, out_labels = select_detections(
            boxes, scores, np.zeros(len(scores), np.int32), (20, 30), 0.05, 0.6, 100)
        assert out_boxes.shape == (0, 4) and out_scores.shape == (0,) and out_labels.shape == (0,)


def brute_force_nms(boxes, scores, labels, threshold):
    """Per-class NMS by the textbook double loop, in float64."""
    keep = []
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    suppressed = set()
    for pos, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pos + 1:]:
            if labels[j] != labels[i]:
                continue
            a, b = boxes[i].astype(np.float64), boxes[j].astype(np.float64)
            inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                     * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
            union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
            if inter / union > threshold:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (200, 2))
    wh = rng.uniform(5, 40, (200, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.permutation(200).astype(np.float32) / 200  # distinct scores
    labels = rng.integers(0, 3, 200)
    kept = batched_nms(boxes, scores, labels, 0.5)
    assert kept.tolist() == brute_force_nms(boxes, scores, labels, 0.5)
    assert batched_nms(boxes, scores, labels, 0.5, max_keep=7).tolist() == kept[:7].tolist()


def test_clipping_uses_height_for_y_and_width_for_x():
    boxes = boxes_of([-5, -3, 40, 70], [10, 10, 20, 20])
    np.testing.assert_array_equal(clip_boxes(boxes, (50, 30)), [[0, 0, 30, 50], [10, 10, 20, 20]])
    # select_detections clips before NMS: two boxes that only overlap after clipping.
    boxes = boxes_of([0, 0, 30, 10], [0, 0, 10, 10])
    out, _, _ = select_detections(boxes, np.array([0.9, 0.8], np.float32), np.zeros(2),
                                  (10, 10), 0.05, 0.9, 10)
    np.testing.assert_array_equal(out, [[0, 0, 10, 10]])


def test_rescale_per_axis():
    boxes = boxes_of([10, 20, 30, 40])
    out = rescale_boxes(boxes, resized_size=(100, 200), original_size=(50, 800))
    np.testing.assert_allclose(out, [[40, 10, 120, 20]])
    assert out.dtype == np.float32


def test_max_detections_keeps_the_best_sorted():
    n = 30
    boxes = np.stack([np.arange(n) * 20.0, np.zeros(n), np.arange(n) * 20.0 + 10, np.full(n, 10.0)],
                     1).astype(np.float32)
    scores = np.random.default_rng(0).permutation(n).astype(np.float32) / n + 0.1
    results = postprocess_batch(boxes[None], scores[None], np.zeros((1, n), np.int32),
                                np.array([[20, 1000]]), 0.05, 0.6, 10)
    assert len(results) == 1
    np.testing.assert_array_equal(results[0]["scores"], np.sort(scores)[::-1][:10])
    np.testing.assert_array_equal(results[0]["boxes"], boxes[np.argsort(-scores)[:10]])


def numpy_sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def numpy_decode(cls_logits, bbox_reg, centerness, topk, norm, add_centerness, point_offset=0.0,
                 point_strides="torchvision"):
    """Per level top-k of the flattened (point, class) scores, with the points' decoded boxes.

    Points step by padded size // feature map size per axis (torchvision) or by the stride."""
    scores = numpy_sigmoid(cls_logits)
    if add_centerness:
        scores = np.sqrt(scores * numpy_sigmoid(centerness))
    out = []
    start = 0
    for s in STRIDES:
        h, w = -(-IMAGE_HW[0] // s), -(-IMAGE_HW[1] // s)
        step = (IMAGE_HW[1] // w, IMAGE_HW[0] // h) if point_strides == "torchvision" else (s, s)
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        points = (np.stack([xs.ravel(), ys.ravel()], 1) + point_offset) * np.array(step)
        level = slice(start, start + h * w)
        flat = scores[:, level].reshape(len(scores), -1)
        k = min(topk, flat.shape[1])
        idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        point_idx, labels = idx // NUM_CLASSES, idx % NUM_CLASSES
        dist = bbox_reg[:, level] * (s if norm else 1)
        dist = np.take_along_axis(dist, point_idx[..., None], 1)
        pts = points[point_idx]
        boxes = np.concatenate([pts - dist[..., :2], pts + dist[..., 2:]], -1)
        out.append((boxes, np.take_along_axis(flat, idx, 1), labels, k))
        start += h * w
    return out


def random_head(seed, batch=2):
    rng = np.random.default_rng(seed)
    num_points = sum(-(-IMAGE_HW[0] // s) * -(-IMAGE_HW[1] // s) for s in STRIDES)
    return (rng.normal(-2, 2, (batch, num_points, NUM_CLASSES)).astype(np.float32),
            rng.uniform(0, 3, (batch, num_points, 4)).astype(np.float32),
            rng.normal(0, 1, (batch, num_points, 1)).astype(np.float32))


@pytest.mark.parametrize("norm,add_centerness,point_offset,point_strides", [
    (True, True, 0.0, "torchvision"), (False, False, 0.5, "torchvision"), (True, True, 0.5, "nominal")])
def test_decoder_keeps_topk_per_level(mode, norm, add_centerness, point_offset, point_strides):
    topk = 10
    head = random_head(1)
    decoder = FCOSDecoder(PointCoder(STRIDES, point_offset, norm, point_strides), add_centerness, topk)
    images = Tensor(np.zeros((2, 3) + IMAGE_HW, np.float32))
    boxes, scores, labels = (o.asnumpy() for o in decoder(images, *(Tensor(a) for a in head)))
    expected = numpy_decode(*head, topk, norm, add_centerness, point_offset, point_strides)
    ks = [k for *_, k in expected]
    assert ks == [10, 10, 10, 6, 3]  # the 2x1 P6 and 1x1 P7 levels have fewer (point, class) pairs
    assert decoder.num_candidates(*IMAGE_HW, NUM_CLASSES) == sum(ks)
    assert boxes.shape == (2, sum(ks), 4) and scores.shape == (2, sum(ks)) and labels.shape == (2, sum(ks))
    assert labels.dtype == np.int32
    start = 0
    for want_boxes, want_scores, want_labels, k in expected:
        level = slice(start, start + k)
        np.testing.assert_allclose(scores[:, level], want_scores, rtol=1e-5)
        np.testing.assert_array_equal(labels[:, level], want_labels)
        np.testing.assert_allclose(boxes[:, level], want_boxes, rtol=1e-5, atol=1e-4)
        start += k


def test_decoder_exports_to_mindir(tmp_path):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        head = random_head(2, batch=1)
        inputs = (Tensor(np.zeros((1, 3) + IMAGE_HW, np.float32)),) + tuple(Tensor(a) for a in head)
        decoder = FCOSDecoder(PointCoder(STRIDES), max_detection_boxes_num=10)
        path = str(tmp_path / "decoder")
        ms.export(decoder, *inputs, file_name=path, file_format="MINDIR")
        loaded = nn.GraphCell(ms.load(path + ".mindir"))
        for got, want in zip(loaded(*inputs), decoder(*inputs)):
            np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
    finally:
        ms.set_context(mode=previous)
