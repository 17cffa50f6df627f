"""Detections on single images, exactly as eval.py computes them (predict.py's engine)."""
from src.data.transforms import pad_shape_for, preprocess_image
from src.inference.select import select_detections
from src.inference.tta import IDENTITY, view_candidates


class Predictor:
    """image (H, W, 3) uint8 RGB -> detections in its pixels, as eval.py computes them.

    Args:
        runtime: src.inference.runtime running FCOSInference;
        min_size, max_size: the evaluation size (src.builder.eval_size);
        buckets: pad shapes (src.builder.eval_pad_buckets); selection: select_detections kwargs;
        views: the test-time views (src.inference.tta).
    """

    def __init__(self, runtime, min_size, max_size, buckets, selection, views=IDENTITY):
        self.runtime = runtime
        self.min_size = min_size
        self.max_size = max_size
        self.buckets = buckets
        self.selection = selection
        self.views = views

    def pad_shape(self, image_hw):
        """The pad bucket eval.py would use for an image of size (h, w); ValueError if none fits."""
        return pad_shape_for(image_hw, self.min_size, self.max_size, self.buckets)

    def __call__(self, image, pad_hw):
        """-> boxes (D, 4) x1, y1, x2, y2 in image pixels, scores (D,), labels (D,)."""
        chw, meta = preprocess_image(image, self.min_size, self.max_size, pad_hw)
        boxes, scores, labels, view_ids = view_candidates(self.runtime, chw[None], [meta.resized_hw], self.views)
        return select_detections(boxes[0], scores[0], labels[0], meta.resized_hw, **self.selection,
                                 original_size=meta.orig_hw, view_ids=view_ids, num_views=len(self.views))
