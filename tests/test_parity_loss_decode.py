"""Points, losses and detections against torchvision's FCOS on the parity fixture.

Every size (strides, classes, image size, GT count) comes from the fixture, so any fixture of
the same format passes. Losses are checked to 1e-4 relative, detections row by row.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from src.inference.decoder import FCOSDecoder
from src.inference.select import postprocess_batch
from src.model.loss import FCOSLoss
from src.model.points import PointCoder
from tests.conftest import parity_dir
from tests.test_points import PointsNet


@pytest.fixture(scope="module")
def fixture():
    """The manifest and the arrays of the parity fixture."""
    with open(os.path.join(parity_dir(), "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return manifest, dict(np.load(os.path.join(parity_dir(), "expected.npz")))


def torchvision_limit_range(strides):
    """torchvision's ranges: (4s, 8s) per level, open at the bottom of P3 and the top of P7."""
    limits = [[4.0 * s, 8.0 * s] for s in strides]
    limits[0][0] = 0.0
    limits[-1][1] = float("inf")
    return limits


def padded_ground_truth(arrays, extra_rows=2):
    """Stack the per-image GT into (B, M, 4) boxes, (B, M) labels and mask, with padding rows."""
    batch = len(arrays["image_sizes"])
    counts = [len(arrays[f"gt_boxes_{i}"]) for i in range(batch)]
    max_gt = max(counts) + extra_rows
    boxes = np.zeros((batch, max_gt, 4), np.float32)
    labels = np.zeros((batch, max_gt), np.int32)
    mask = np.zeros((batch, max_gt), bool)
    for i, n in enumerate(counts):
        boxes[i, :n] = arrays[f"gt_boxes_{i}"]
        labels[i, :n] = arrays[f"gt_labels_{i}"]
        mask[i, :n] = True
    return boxes, labels, mask


def fixture_coder(manifest):
    """The PointCoder of the fixture's settings, with the default (torchvision) point strides."""
    return PointCoder(manifest["strides"], manifest["point_offset"], norm_reg_targets=True)


def test_points_match_fixture(fixture, mode):
    manifest, arrays = fixture
    coder = fixture_coder(manifest)
    points, point_strides = PointsNet(coder)(Tensor(arrays["batch_input"]))
    np.testing.assert_array_equal(points.asnumpy(), arrays["points"])
    counts = arrays["num_points_per_level"]
    np.testing.assert_array_equal(point_strides.asnumpy(), np.repeat(manifest["strides"], counts))
    sizes = coder.level_sizes(*arrays["batch_input"].shape[2:])
    assert [h * w for h, w in sizes] == counts.tolist()


def compute_losses(manifest, arrays):
    """FCOSLoss with the fixture's settings on the fixture's head outputs and GT."""
    loss = FCOSLoss(fixture_coder(manifest), torchvision_limit_range(manifest["strides"]),
                    manifest["config"]["center_sampling_radius"], focal_alpha=0.25, focal_gamma=2.0,
                    reg_loss="giou")
    boxes, labels, mask = padded_ground_truth(arrays)
    outputs = loss(Tensor(arrays["batch_input"]), Tensor(arrays["cls_logits"]),
                   Tensor(arrays["bbox_regression"]), Tensor(arrays["bbox_ctrness"]),
                   Tensor(boxes), Tensor(labels), Tensor(mask))
    return [float(o.asnumpy()) for o in outputs]


def test_losses_match_fixture(fixture, mode):
    manifest, arrays = fixture
    total, cls, reg, ctr = compute_losses(manifest, arrays)
    expected = [float(arrays[k]) for k in
                ("loss_classification", "loss_bbox_regression", "loss_bbox_ctrness")]
    for got, want in zip((cls, reg, ctr), expected):
        assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    assert total == pytest.approx(sum(expected), rel=1e-4)


def test_graph_and_pynative_losses_agree(fixture):
    manifest, arrays = fixture
    previous = ms.get_context("mode")
    try:
        ms.set_context(mode=ms.GRAPH_MODE)
        graph = compute_losses(manifest, arrays)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        pynative = compute_losses(manifest, arrays)
    finally:
        ms.set_context(mode=previous)
    np.testing.assert_allclose(graph, pynative, rtol=1e-6)


def match_rows(got_boxes, got_scores, got_labels, want_boxes, want_scores, want_labels):
    """Pair each reference detection with a distinct detection of the same label and score.

    Returns:
        index into the got arrays per reference row; raises AssertionError on a miss.
    """
    used = np.zeros(len(got_boxes), bool)
    pairs = []
    for box, score, label in zip(want_boxes, want_scores, want_labels):
        candidates = np.flatnonzero(~used & (got_labels == label)
                                    & (np.abs(got_scores - score) <= 1e-5))
        assert candidates.size, f"no detection for label {label} score {score} box {box}"
        best = candidates[np.argmin(np.abs(got_boxes[candidates] - box).max(axis=1))]
        used[best] = True
        pairs.append(best)
    return np.asarray(pairs)


def test_detections_match_fixture(fixture, mode):
    manifest, arrays = fixture
    config = manifest["config"]
    decoder = FCOSDecoder(fixture_coder(manifest), add_centerness=True,
                          max_detection_boxes_num=config["topk_candidates"])
    boxes, scores, labels = decoder(Tensor(arrays["batch_input"]), Tensor(arrays["cls_logits"]),
                                    Tensor(arrays["bbox_regression"]), Tensor(arrays["bbox_ctrness"]))
    args = (boxes.asnumpy(), scores.asnumpy(), labels.asnumpy(), arrays["image_sizes"],
            config["score_thresh"], config["nms_thresh"], config["detections_per_img"])
    resized = postprocess_batch(*args)
    original = postprocess_batch(*args, original_sizes=arrays["orig_sizes"])
    for i, (det, det_orig) in enumerate(zip(resized, original)):
        want_boxes = arrays[f"det_boxes_{i}"]
        assert len(det["boxes"]) == len(want_boxes)
        rows = match_rows(det["boxes"], det["scores"], det["labels"], want_boxes,
                          arrays[f"det_scores_{i}"], arrays[f"det_labels_{i}"])
        np.testing.assert_allclose(det["boxes"][rows], want_boxes, atol=1e-3, rtol=0)
        np.testing.assert_allclose(det["scores"][rows], arrays[f"det_scores_{i}"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(det_orig["boxes"][rows], arrays[f"det_boxes_orig_{i}"],
                                   atol=1e-3, rtol=0)
        assert np.all(np.diff(det["scores"]) <= 0)
