"""FCOS locations and their ltrb box coding: one PointCoder that the model owns and the target
assignment, the loss and the decoder use.

A location (point) of level l sits at image pixel ((j + point_offset) * step_x, (i + point_offset)
* step_y) for grid cell (i, j). Two rules for the step ("point_strides"):

- "torchvision": per axis, padded input size // feature map size, as torchvision's
  AnchorGenerator computes it. It equals the level's nominal stride only when the padded size
  divides by it: an 800x1216 batch has P6 steps (61, 64) and P7 (114, 121). The default, since
  torchvision's released weights were trained with these points.
- "nominal": the level's stride on both axes (the FCOS paper, mmdetection).

Box sizes always use the nominal stride s of the level: regression targets are divided by s
(norm_reg_targets), the size ranges and the centre-sampling radius are in units of s.
Levels are concatenated P3..P7, each flattened row-major (y then x), matching the head's output.

Every method is MindSpore ops on Python ints, so it runs inside a Cell's construct in GRAPH_MODE
(the image size comes from a static tensor shape: points are constants of each compiled shape)
and in PYNATIVE_MODE.
"""
from typing import Sequence

import mindspore as ms
from mindspore import ops

from src.geometry import ceil_div

POINT_STRIDES = ("torchvision", "nominal")


@ms.jit_class
class PointCoder:
    """Points of every level and the ltrb coding of boxes relative to them.

    Args:
        strides (tuple[int]): nominal stride of every level.
        point_offset (float): 0.0 (torchvision) or 0.5 (the paper) of a cell.
        norm_reg_targets (bool): ltrb in units of the level's nominal stride (True) or pixels.
        point_strides (str): "torchvision" or "nominal", see the module docstring.
    """

    def __init__(self, strides: Sequence[int], point_offset: float = 0.0, norm_reg_targets: bool = True,
                 point_strides: str = "torchvision") -> None:
        if point_strides not in POINT_STRIDES:
            raise ValueError(f"point_strides must be one of {POINT_STRIDES}, got {point_strides!r}")
        self.strides = tuple(int(s) for s in strides)
        self.point_offset = float(point_offset)
        self.norm_reg_targets = bool(norm_reg_targets)
        self.padded_steps = point_strides == "torchvision"

    def level_sizes(self, image_h, image_w):
        """Feature map (h, w) of every level for a padded input of image_h x image_w: ceil(image /
        stride), as the stride-2 convs give. -> tuple of (h, w) int pairs."""
        return tuple((ceil_div(image_h, s), ceil_div(image_w, s)) for s in self.strides)

    def level_steps(self, image_h, image_w):
        """Pixel step (y, x) between neighbouring points of every level."""
        if self.padded_steps:
            return tuple((image_h // h, image_w // w) for h, w in self.level_sizes(image_h, image_w))
        return tuple((s, s) for s in self.strides)

    def points(self, image_h, image_w):
        """Locations of all levels.

        Args:
            image_h, image_w (int): padded input size.
        Returns:
            points: (P, 2) float32 x, y in pixels.
            scales: (P,) float32 nominal stride of the level of each point.
            sizes: tuple of (h, w) per level; P = sum(h * w).
        """
        sizes = self.level_sizes(image_h, image_w)
        steps = self.level_steps(image_h, image_w)
        points = []
        scales = []
        for (h, w), (step_y, step_x), s in zip(sizes, steps, self.strides):
            xs = (ops.arange(w, dtype=ms.float32) + self.point_offset) * step_x
            ys = (ops.arange(h, dtype=ms.float32) + self.point_offset) * step_y
            grid_x = ops.broadcast_to(xs.reshape(1, w), (h, w))
            grid_y = ops.broadcast_to(ys.reshape(h, 1), (h, w))
            points.append(ops.stack((grid_x, grid_y), axis=-1).reshape(h * w, 2))
            scales.append(ops.full((h * w,), s, dtype=ms.float32))
        return ops.cat(points, axis=0), ops.cat(scales, axis=0), sizes

    def per_point(self, sizes, values):
        """Repeat one row of values per level over that level's points.

        Args:
            sizes: tuple of (h, w) per level, from points().
            values: per level a tuple of D floats (e.g. a limit_range pair).
        Returns:
            (P, D) float32.
        """
        rows = []
        for (h, w), level_values in zip(sizes, values):
            columns = tuple(ops.full((h * w,), float(v), dtype=ms.float32) for v in level_values)
            rows.append(ops.stack(columns, axis=-1))
        return ops.cat(rows, axis=0)

    def _unit(self, scales):
        """(P, 1) nominal strides when regression is stride-normalised, else 1.0."""
        return scales.reshape(-1, 1) if self.norm_reg_targets else 1.0

    def encode(self, points, boxes, scales):
        """Distances from points to the box sides.

        Args:
            points: (P, 2) x, y; boxes: (..., P, 4) x1, y1, x2, y2; scales: (P,) from points().
        Returns:
            (..., P, 4) l, t, r, b (in strides when norm_reg_targets).
        """
        x = points[..., 0:1]
        y = points[..., 1:2]
        ltrb = ops.cat((x - boxes[..., 0:1], y - boxes[..., 1:2],
                        boxes[..., 2:3] - x, boxes[..., 3:4] - y), axis=-1)
        return ltrb / self._unit(scales)

    def decode(self, points, ltrb, scales):
        """Inverse of encode: boxes (..., P, 4) x1, y1, x2, y2 from ltrb (..., P, 4)."""
        dist = ltrb * self._unit(scales)
        x = points[..., 0:1]
        y = points[..., 1:2]
        return ops.cat((x - dist[..., 0:1], y - dist[..., 1:2],
                        x + dist[..., 2:3], y + dist[..., 3:4]), axis=-1)
