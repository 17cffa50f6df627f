"""Stage 2 of the one FCOS decoding path: per image, in NumPy, the decoder's candidates ->
score threshold, clip to the image, class-aware NMS, the best detections_per_img; then boxes can
be rescaled to the original image. eval.py, predict.py and postprocess.py all end here.
"""
import numpy as np


def clip_boxes(boxes, image_size):
    """Clip (N, 4) x1, y1, x2, y2 boxes to an image of size (h, w)."""
    h, w = image_size
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return clipped


def _iou_one_to_many(box, boxes):
    """IoU of one (4,) box with (N, 4) boxes, in the boxes' dtype, as torchvision's nms kernel."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    zero = boxes.dtype.type(0)
    inter = np.maximum(zero, x2 - x1) * np.maximum(zero, y2 - y1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area + areas - inter)


def batched_nms(boxes, scores, labels, iou_threshold, max_keep=None):
    """Class-aware greedy NMS, equal to torchvision.ops.batched_nms.

    Boxes are visited by score, descending (stable for equal scores); a box is dropped when its
    IoU with an already kept box of the same label is above iou_threshold.

    Args:
        boxes: (N, 4); scores: (N,); labels: (N,).
        iou_threshold (float).
        max_keep (int | None): stop once this many are kept (the greedy order makes the first
            max_keep the same as without the cap).
    Returns:
        (K,) int64 indices of kept boxes, by score descending.
    """
    remaining = np.argsort(-scores, kind="stable")
    keep = []
    while remaining.size and (max_keep is None or len(keep) < max_keep):
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        overlap = _iou_one_to_many(boxes[best], boxes[rest]) > iou_threshold
        remaining = rest[~(overlap & (labels[rest] == labels[best]))]
    return np.asarray(keep, dtype=np.int64)


def select_detections(boxes, scores, labels, image_size, score_threshold, nms_iou_threshold,
                      detections_per_img, original_size=None):
    """Final detections of one image from its decoder candidates.

    Args:
        boxes: (K, 4) candidates in the padded frame; scores: (K,); labels: (K,).
        image_size: (h, w) of the resized image before padding; boxes are clipped to it.
        score_threshold (float): scores at or below are dropped.
        nms_iou_threshold (float): class-aware NMS threshold.
        detections_per_img (int): most detections kept.
        original_size: (h, w) of the original image to rescale the boxes to (rescale_boxes), or
            None to keep them in the resized frame.
    Returns:
        boxes (D, 4), scores (D,), labels (D,), sorted by score descending.
    """
    keep = scores > score_threshold
    boxes = clip_boxes(boxes[keep], image_size)
    scores, labels = scores[keep], labels[keep]
    kept = batched_nms(boxes, scores, labels, nms_iou_threshold, detections_per_img)
    boxes = boxes[kept]
    if original_size is not None:
        boxes = rescale_boxes(boxes, image_size, original_size)
    return boxes, scores[kept], labels[kept]


def rescale_boxes(boxes, resized_size, original_size):
    """Map (N, 4) boxes from the resized image to the original one, per-axis ratios.

    Args:
        resized_size, original_size: (h, w).
    Returns:
        (N, 4) boxes in original image pixels (float32 ratios, as torchvision's transform).
    """
    ratio_h = np.float32(original_size[0]) / np.float32(resized_size[0])
    ratio_w = np.float32(original_size[1]) / np.float32(resized_size[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)


def postprocess_batch(boxes, scores, labels, image_sizes, score_threshold, nms_iou_threshold,
                      detections_per_img, original_sizes=None):
    """select_detections on every image of a decoder batch (and rescale when sizes are given).

    Args:
        boxes: (B, K, 4); scores: (B, K); labels: (B, K) NumPy arrays from FCOSDecoder.
        image_sizes: (B, 2) resized (h, w) of each image before padding.
        original_sizes: (B, 2) original (h, w), or None to stay in the resized frame.
    Returns:
        list of B dicts with 'boxes' (D, 4), 'scores' (D,), 'labels' (D,).
    """
    results = []
    for i in range(len(boxes)):
        det_boxes, det_scores, det_labels = select_detections(
            boxes[i], scores[i], labels[i], image_sizes[i], score_threshold, nms_iou_threshold, detections_per_img,
            original_size=None if original_sizes is None else original_sizes[i])
        results.append({"boxes": det_boxes, "scores": det_scores, "labels": det_labels})
    return results
