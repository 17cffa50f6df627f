"""Stage 2 of the one FCOS decoding path: per image, in NumPy, the decoder's candidates ->
score threshold, clip to the image, class-aware NMS (or, for the candidates of several views of
the image, src.inference.tta, their fusion), the best detections_per_img; then boxes can be
rescaled to the original image. eval.py, predict.py and postprocess.py all end here.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from src.geometry import clip_boxes, iou_one_to_many, rescale_boxes


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: Optional[int] = None, plus_one: bool = False) -> np.ndarray:
    """Class-aware greedy NMS, equal to torchvision.ops.batched_nms (with plus_one, box sides
    x2 - x1 + 1: maskrcnn-benchmark's ml_nms, the FCOS authors').

    Boxes are visited by score, descending (stable for equal scores); a box is dropped when its
    IoU with an already kept box of the same label is above iou_threshold.

    Args:
        boxes: (N, 4); scores: (N,); labels: (N,).
        iou_threshold (float).
        max_keep (int | None): stop once this many are kept (the greedy order makes the first
            max_keep the same as without the cap).
        plus_one (bool): see above.
    Returns:
        (K,) int64 indices of kept boxes, by score descending.
    """
    remaining = np.argsort(-scores, kind="stable")
    keep = []
    while remaining.size and (max_keep is None or len(keep) < max_keep):
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        overlap = iou_one_to_many(boxes[best], boxes[rest], plus_one) > iou_threshold
        remaining = rest[~(overlap & (labels[rest] == labels[best]))]
    return np.asarray(keep, dtype=np.int64)


def fuse_views(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, view_ids: np.ndarray, num_views: int,
               iou_threshold: float, max_keep: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-aware fusion of the candidates of several views of one image (test-time
    augmentation), a greedy form of weighted boxes fusion (Solovyev et al., 2021).

    Candidates are visited by score, as in batched_nms; the best one left gathers the candidates of
    its label that overlap it by more than iou_threshold into a cluster. Of each view the cluster
    keeps its best candidate: the detection's box is their score-weighted mean and its score their
    sum over num_views, so a view that found nothing there counts as a 0. An object that every view
    finds keeps its score; a box that one view alone proposes is ranked down. With one view this
    keeps exactly batched_nms's boxes and scores.

    Args:
        boxes: (N, 4); scores: (N,); labels: (N,); view_ids: (N,) the view of each candidate.
        num_views (int): views run, those without candidates included.
        iou_threshold (float); max_keep (int | None): most detections returned.
    Returns:
        boxes (D, 4), scores (D,), labels (D,) by fused score descending.
    """
    remaining = np.argsort(-scores, kind="stable")
    fused_boxes, fused_scores, fused_labels = [], [], []
    while remaining.size:
        best, rest = remaining[0], remaining[1:]
        joins = (iou_one_to_many(boxes[best], boxes[rest]) > iou_threshold) & (labels[rest] == labels[best])
        cluster = np.concatenate([[best], rest[joins]])
        remaining = rest[~joins]
        _, first = np.unique(view_ids[cluster], return_index=True)
        members = cluster[first]
        weights = scores[members]
        fused_boxes.append(boxes[best] if len(members) == 1 else
                           (boxes[members] * weights[:, None]).sum(axis=0) / weights.sum())
        fused_scores.append(weights.sum() / num_views)
        fused_labels.append(labels[best])
    order = np.argsort(-np.asarray(fused_scores, scores.dtype), kind="stable")[:max_keep]
    return (np.asarray(fused_boxes, boxes.dtype).reshape(-1, 4)[order],
            np.asarray(fused_scores, scores.dtype)[order], np.asarray(fused_labels, labels.dtype)[order])


def select_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, image_size: Sequence[int],
                      score_threshold: float, nms_iou_threshold: float, detections_per_img: int,
                      original_size: Optional[Sequence[int]] = None, view_ids: Optional[np.ndarray] = None,
                      num_views: int = 1, plus_one: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final detections of one image from its decoder candidates.

    Args:
        boxes: (K, 4) candidates in the padded frame; scores: (K,); labels: (K,).
        image_size: (h, w) of the resized image before padding; boxes are clipped to it.
        score_threshold (float): scores at or below are dropped.
        nms_iou_threshold (float): class-aware NMS threshold.
        detections_per_img (int): most detections kept.
        original_size: (h, w) of the original image to rescale the boxes to (rescale_boxes), or
            None to keep them in the resized frame.
        view_ids: (K,) view of each candidate when they come from num_views > 1 views
            (src.inference.tta.view_candidates); they are fused (fuse_views) instead of NMS.
        plus_one: maskrcnn-benchmark's box convention (the FCOS authors' models): clip to
            (w - 1, h - 1), NMS with sides x2 - x1 + 1, and the detections_per_img best kept with
            every detection that ties the last one's score.
    Returns:
        boxes (D, 4), scores (D,), labels (D,), sorted by score descending.
    """
    keep = scores > score_threshold
    boxes = clip_boxes(boxes[keep], image_size, plus_one)
    scores, labels = scores[keep], labels[keep]
    if num_views > 1:
        boxes, scores, labels = fuse_views(boxes, scores, labels, view_ids[keep], num_views, nms_iou_threshold,
                                           detections_per_img)
    else:
        kept = batched_nms(boxes, scores, labels, nms_iou_threshold, None if plus_one else detections_per_img,
                           plus_one)
        if plus_one and len(kept) > detections_per_img:  # their kthvalue cut keeps ties
            kept = kept[scores[kept] >= scores[kept[detections_per_img - 1]]]
        boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
    if original_size is not None:
        boxes = rescale_boxes(boxes, image_size, original_size)
    return boxes, scores, labels


def postprocess_batch(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, image_sizes: np.ndarray,
                      score_threshold: float, nms_iou_threshold: float, detections_per_img: int,
                      original_sizes: Optional[np.ndarray] = None, view_ids: Optional[np.ndarray] = None,
                      num_views: int = 1, plus_one: bool = False) -> List[Dict[str, np.ndarray]]:
    """select_detections on every image of a decoder batch (and rescale when sizes are given).

    Args:
        boxes: (B, K, 4); scores: (B, K); labels: (B, K) NumPy arrays from FCOSDecoder.
        image_sizes: (B, 2) resized (h, w) of each image before padding.
        original_sizes: (B, 2) original (h, w), or None to stay in the resized frame.
        view_ids, num_views, plus_one: as select_detections (the same (K,) view ids for every image).
    Returns:
        list of B dicts with 'boxes' (D, 4), 'scores' (D,), 'labels' (D,).
    """
    results = []
    for i in range(len(boxes)):
        det_boxes, det_scores, det_labels = select_detections(
            boxes[i], scores[i], labels[i], image_sizes[i], score_threshold, nms_iou_threshold, detections_per_img,
            original_size=None if original_sizes is None else original_sizes[i], view_ids=view_ids,
            num_views=num_views, plus_one=plus_one)
        results.append({"boxes": det_boxes, "scores": det_scores, "labels": det_labels})
    return results
