"""Geometry computed once: boxes (area, clip, IoU, flips, quarter turns, rescale), sizes
(ceiling division, keep-ratio resize, pad buckets) and EvalGeometry, the evaluation size and pad
shapes that dataset, predictor, runtime, export and preprocess share. NumPy and plain integers
only (no MindSpore): the lowest layer, usable by every other.
"""
import dataclasses
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


def ceil_div(value: int, divisor: int) -> int:
    """Smallest integer >= value / divisor."""
    return -(-int(value) // int(divisor))


def ceil_to(value: int, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= value."""
    return ceil_div(value, divisor) * int(divisor)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes -> (N,) areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def clip_boxes(boxes: np.ndarray, image_size: Sequence[int], plus_one: bool = False) -> np.ndarray:
    """Clip (N, 4) x1, y1, x2, y2 boxes to an image of size (h, w): to [0, w] x [0, h], or with
    plus_one (maskrcnn-benchmark's box convention, a box covers pixels x1..x2) to [0, w-1] x [0, h-1]."""
    h, w = image_size
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, w - int(plus_one))
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, h - int(plus_one))
    return clipped


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU of one (4,) box with (N, 4) boxes, in the boxes' dtype, as torchvision's nms kernel; with
    plus_one widths and heights are x2 - x1 + 1 (maskrcnn-benchmark's nms, the FCOS authors')."""
    one = boxes.dtype.type(int(plus_one))
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    zero = boxes.dtype.type(0)
    inter = np.maximum(zero, x2 - x1 + one) * np.maximum(zero, y2 - y1 + one)
    area = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    areas = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area + areas - inter)


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes -> the same boxes in the image mirrored left-right (``width``
    wide): pixel column i goes to w-1-i, so coordinate x goes to w-x."""
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def rot90_boxes(boxes: np.ndarray, turns: int, size_hw: Sequence[int]) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes of an image of size (h, w) -> the same boxes after turning the
    image counter-clockwise by turns x 90 degrees, as np.rot90: pixel (row r, column c) of a w-wide
    image goes to (w-1-c, r), so point (x, y) goes to (y, w-x)."""
    height, width = size_hw
    for _ in range(turns % 4):
        boxes = np.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], axis=1)
        height, width = width, height
    return boxes


def rescale_boxes(boxes: np.ndarray, resized_size: Sequence[int], original_size: Sequence[int]) -> np.ndarray:
    """Map (N, 4) boxes from the resized image to the original one, per-axis ratios.

    Args:
        resized_size, original_size: (h, w).
    Returns:
        (N, 4) boxes in original image pixels (float32 ratios, as torchvision's transform).
    """
    ratio_h = np.float32(original_size[0]) / np.float32(resized_size[0])
    ratio_w = np.float32(original_size[1]) / np.float32(resized_size[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)


RESIZE_RULES = ("torchvision", "maskrcnn_benchmark")


def keep_ratio_size(height: int, width: int, min_size: int, max_size: int, fit_hw: Optional[Sequence[int]] = None,
                    rule: str = "torchvision") -> Tuple[int, int]:
    """Keep-ratio size -> (new_h, new_w).

    rule "torchvision": scale = min(min_size / short side, max_size / long side) and each side is
    floor(side * scale), in double precision as torchvision computes it. rule "maskrcnn_benchmark"
    (the FCOS authors' Resize.get_size): the short side becomes min_size, or round(max_size * short /
    long) where the long side would pass max_size, and the long side int(short_new * long / short).
    ``fit_hw`` (h, w) lowers the scale further when needed so the result fits inside it (a fixed pad
    shape, or a crop whose rounding turned a square image's orientation).
    """
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule '{rule}'; choose one of {RESIZE_RULES}")
    if rule == "maskrcnn_benchmark":
        size = _maskrcnn_benchmark_size(height, width, min_size, max_size)
        if fit_hw is None or (size[0] <= fit_hw[0] and size[1] <= fit_hw[1]):
            return size
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if fit_hw is not None:
        scale = min(scale, fit_hw[0] / height, fit_hw[1] / width)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def _maskrcnn_benchmark_size(height, width, min_size, max_size):
    """The FCOS authors' test-time size rule (fcos_core/data/transforms/transforms.py) -> (h, w)."""
    short, long = float(min(height, width)), float(max(height, width))
    size = min_size
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if min(height, width) == size:
        return height, width
    if width < height:
        return max(1, int(size * height / width)), size
    return size, max(1, int(size * width / height))


class PadBucketError(ValueError):
    """The pad buckets do not suit the images or the size divisor (a configuration problem)."""


def default_pad_buckets(min_sizes: Sequence[int], max_size: int, size_divisor: int = 32) -> List[Tuple[int, int]]:
    """Pad shapes that hold every keep-ratio resized image: [(S, L), (L, S)] (landscape and
    portrait), S the largest short side rounded up to size_divisor, L the same for max_size;
    one (S, S) when they coincide."""
    short = ceil_to(min(max(min_sizes), max_size), size_divisor)
    long = ceil_to(max_size, size_divisor)
    return [(short, long)] if short == long else [(short, long), (long, short)]


def resolve_pad_buckets(pad_buckets: Sequence[Sequence[int]], min_sizes: Sequence[int], max_size: int,
                        size_divisor: int = 32) -> List[Tuple[int, ...]]:
    """Config pad_buckets ([[h, w], ...], empty = default) -> list of (h, w) tuples."""
    if not pad_buckets:
        return default_pad_buckets(min_sizes, max_size, size_divisor)
    if any(not isinstance(b, (list, tuple)) or len(b) != 2 for b in pad_buckets):
        raise PadBucketError(f"expected [[h, w], ...], got {pad_buckets}")
    buckets = [tuple(int(v) for v in b) for b in pad_buckets]
    for h, w in buckets:
        if h <= 0 or w <= 0 or h % size_divisor or w % size_divisor:
            raise PadBucketError(f"{h}x{w} is not a positive multiple of {size_divisor}")
    return buckets


def window_pad_shape(window: int, size_divisor: int = 32) -> Tuple[int, int]:
    """Window mode's one training pad shape: (side, side), window rounded up to size_divisor."""
    side = ceil_to(window, size_divisor)
    return side, side


def choose_pad_shape(size_hw: Sequence[int], buckets: Sequence[Sequence[int]]) -> int:
    """Index of the smallest (by area) bucket (h, w) that holds an image of size_hw."""
    fits = [i for i, (bh, bw) in enumerate(buckets) if bh >= size_hw[0] and bw >= size_hw[1]]
    if not fits:
        raise ValueError(f"a resized image of {size_hw[0]}x{size_hw[1]} fits none of the pad "
                         f"buckets {[list(b) for b in buckets]}")
    return min(fits, key=lambda i: buckets[i][0] * buckets[i][1])


def pad_shape_for(image_hw: Sequence[int], min_size: int, max_size: int, buckets: Sequence[Tuple[int, int]],
                  rule: str = "torchvision") -> Tuple[int, int]:
    """The bucket (h, w) an image of image_hw goes to at a keep-ratio size of min_size/max_size;
    ValueError when none holds it."""
    try:
        return buckets[choose_pad_shape(keep_ratio_size(*image_hw, min_size, max_size, rule=rule), buckets)]
    except ValueError as err:
        raise ValueError(f"{err} (min_size {min_size}, max_size {max_size})") from None


@dataclasses.dataclass(frozen=True)
class EvalGeometry:
    """Where evaluation and inference resize and pad: a keep-ratio size of min_size/max_size by
    resize_rule, then the smallest of buckets (h, w) that holds the image, or with per_image (empty
    buckets) the image's own size rounded up to size_divisor, as torchvision and the FCOS authors
    pad a batch of one (exact reference results; one compiled graph per distinct shape). Built once
    from the configuration (from_config) and handed to the dataset, the predictor, the runtimes,
    export and preprocess."""
    min_size: int
    max_size: int
    buckets: Tuple[Tuple[int, int], ...]
    resize_rule: str = "torchvision"
    size_divisor: int = 32

    @property
    def per_image(self) -> bool:
        """Each image padded to its own size (no fixed buckets)."""
        return not self.buckets

    @classmethod
    def make(cls, min_size: int, max_size: int, pad_buckets: Sequence = (), size_divisor: int = 32,
             resize_rule: str = "torchvision", per_image: bool = False) -> "EvalGeometry":
        """The geometry of min_size/max_size and pad_buckets (empty: the defaults, which hold any
        image; ignored with per_image); PadBucketError when the buckets do not suit size_divisor."""
        if resize_rule not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule '{resize_rule}'; choose one of {RESIZE_RULES}")
        buckets = () if per_image else resolve_pad_buckets(pad_buckets, [min_size], max_size, size_divisor)
        return cls(int(min_size), int(max_size), tuple(tuple(b) for b in buckets), resize_rule, int(size_divisor))

    @classmethod
    def from_config(cls, cfg: Any) -> "EvalGeometry":
        """The configuration's: its first min_size, max_size, pad_buckets (or pad_per_image),
        size_divisor and resize_rule."""
        return cls.make(cfg.min_size[0], cfg.max_size, cfg.pad_buckets, cfg.size_divisor, cfg.resize_rule,
                        cfg.pad_per_image)

    def resized_size(self, image_hw: Sequence[int], fit_hw: Optional[Sequence[int]] = None) -> Tuple[int, int]:
        """(h, w) of an image after the keep-ratio resize (made to fit fit_hw where given)."""
        return keep_ratio_size(*image_hw, self.min_size, self.max_size, fit_hw=fit_hw, rule=self.resize_rule)

    def pad_shape(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The shape an image of image_hw is padded to; ValueError when no bucket holds it."""
        if self.per_image:
            h, w = self.resized_size(image_hw)
            return ceil_to(h, self.size_divisor), ceil_to(w, self.size_divisor)
        return pad_shape_for(image_hw, self.min_size, self.max_size, list(self.buckets), self.resize_rule)
