"""Detections on single images, exactly as eval.py computes them (predict.py's engine)."""
from typing import Callable, Sequence, Tuple

import numpy as np

from src.data.transforms import IMAGENET_PIXELS, PixelFormat, preprocess_image
from src.geometry import EvalGeometry
from src.inference.select import select_detections
from src.inference.tta import IDENTITY, view_candidates


class Predictor:
    """image (H, W, 3) uint8 RGB -> detections in its pixels, as eval.py computes them.

    Args:
        runtime: src.inference.runtime running FCOSInference;
        geometry: the evaluation size and pad shapes (src.builder.eval_geometry);
        selection: select_detections kwargs; views: the test-time views (src.inference.tta);
        pixels: the network's PixelFormat.
    """

    def __init__(self, runtime: Callable[[np.ndarray], Tuple[np.ndarray, ...]], geometry: EvalGeometry,
                 selection: dict, views: Sequence[Tuple[int, bool]] = IDENTITY,
                 pixels: PixelFormat = IMAGENET_PIXELS) -> None:
        self.runtime = runtime
        self.geometry = geometry
        self.pixels = pixels
        self.selection = selection
        self.views = views

    def pad_shape(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The pad bucket eval.py would use for an image of size (h, w); ValueError if none fits."""
        return self.geometry.pad_shape(image_hw)

    def __call__(self, image: np.ndarray, pad_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> boxes (D, 4) x1, y1, x2, y2 in image pixels, scores (D,), labels (D,)."""
        chw, meta = preprocess_image(image, self.geometry, pad_hw, self.pixels)
        boxes, scores, labels, view_ids = view_candidates(self.runtime, chw[None], [meta.resized_hw], self.views)
        return select_detections(boxes[0], scores[0], labels[0], meta.resized_hw, **self.selection,
                                 original_size=meta.orig_hw, view_ids=view_ids, num_views=len(self.views))
