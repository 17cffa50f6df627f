"""Stage 1 of the one FCOS decoding path (shared by evaluation, exported-model inference and
prediction): FCOSDecoder, a fixed-shape, exportable Cell that keeps per level the top-k (point,
class) pairs by score and decodes them to boxes in the padded-image frame. Only sigmoid/sqrt/
topk/gather/concat/reshape-type ops, so it can sit at the end of an exported MINDIR/ONNX graph.
Stage 2 is src.inference.select (NumPy threshold, clip, NMS, rescale).

torchvision keeps the scores above the threshold and then the top-k per level; taking the
top-k first and thresholding afterwards keeps the same set. The FCOS authors' code thresholds
sigmoid(cls) before centreness and then takes the top-k of the score among those candidates:
with class_threshold the decoder does that in the graph, and candidates that fail it get score -1.
"""
from typing import Optional

import mindspore as ms
from mindspore import nn, ops

from src.model.points import PointCoder


class FCOSDecoder(nn.Cell):
    """Top-k candidates per level from raw head outputs.

    Args:
        coder (PointCoder): the model's points and box coding (FCOS.point_coder).
        add_centerness (bool): score = sqrt(sigmoid(cls) * sigmoid(ctr)) if True, else sigmoid(cls).
        max_detection_boxes_num (int): candidates kept per level (fewer on levels with
            fewer than that many (point, class) pairs).
        class_threshold (float | None): only (point, class) pairs with sigmoid(cls) above it are
            candidates, the others score -1 (the FCOS authors' rule); None ranks every pair.
    Inputs:
        images: (B, 3, H, W), only its static shape is used.
        cls_logits: (B, P, C); bbox_reg: (B, P, 4); centerness: (B, P, 1).
    Outputs:
        boxes: (B, K, 4) float32 x1, y1, x2, y2 in the padded-image frame (not clipped).
        scores: (B, K) float32, sorted descending within each level (-1: no candidate).
        labels: (B, K) int32 0-based class indices.
        K = num_candidates(H, W, C).
    """

    def __init__(self, coder: PointCoder, add_centerness: bool = True, max_detection_boxes_num: int = 1000,
                 class_threshold: Optional[float] = None) -> None:
        super().__init__()
        self.coder = coder
        self.add_centerness = add_centerness
        self.max_detection_boxes_num = int(max_detection_boxes_num)
        self.class_threshold = None if class_threshold is None else float(class_threshold)

    def level_candidates(self, level_points, num_classes):
        """Candidates kept on a level of level_points locations: at most max_detection_boxes_num."""
        return min(self.max_detection_boxes_num, level_points * num_classes)

    def num_candidates(self, image_h: int, image_w: int, num_classes: int) -> int:
        """K, the candidates per image at a padded input of image_h x image_w."""
        return sum(self.level_candidates(h * w, num_classes) for h, w in self.coder.level_sizes(image_h, image_w))

    def construct(self, images, cls_logits, bbox_reg, centerness):
        points, point_strides, sizes = self.coder.points(images.shape[2], images.shape[3])
        all_boxes = self.coder.decode(points, bbox_reg, point_strides)
        class_prob = ops.sigmoid(cls_logits)
        scores = ops.sqrt(class_prob * ops.sigmoid(centerness)) if self.add_centerness else class_prob
        if self.class_threshold is not None:
            scores = ops.select(class_prob > self.class_threshold, scores, ops.full_like(scores, -1.0))

        batch, _, num_classes = cls_logits.shape
        boxes_out, scores_out, labels_out = (), (), ()
        start = 0
        for h, w in sizes:
            count = h * w
            k = self.level_candidates(count, num_classes)
            level_scores = scores[:, start:start + count].reshape(batch, count * num_classes)
            top_scores, flat_idx = ops.topk(level_scores, k, dim=1)
            # Lookup tables instead of // and %, which do not all export to ONNX.
            point_of = ops.broadcast_to(ops.arange(start, start + count, dtype=ms.int32).reshape(count, 1),
                                        (count, num_classes)).reshape(-1)
            class_of = ops.broadcast_to(ops.arange(num_classes, dtype=ms.int32).reshape(1, num_classes),
                                        (count, num_classes)).reshape(-1)
            point_idx = ops.gather(point_of, flat_idx, 0)
            box_idx = ops.broadcast_to(ops.expand_dims(point_idx, -1), (batch, k, 4))
            boxes_out += (ops.gather_elements(all_boxes, 1, box_idx),)
            scores_out += (top_scores,)
            labels_out += (ops.gather(class_of, flat_idx, 0),)
            start += count
        return ops.cat(boxes_out, axis=1), ops.cat(scores_out, axis=1), ops.cat(labels_out, axis=1)
