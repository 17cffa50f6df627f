"""FCOS locations and the ltrb box coding shared by target assignment, losses and decoding.

A location (point) of an FPN level with stride s and grid cell (i, j) sits at image pixel
((j + point_offset) * s, (i + point_offset) * s). Levels are concatenated P3..P7, each
flattened row-major (y then x), matching the head's output layout.

Everything here is built from MindSpore ops on Python ints, so it runs inside a Cell's
construct in GRAPH_MODE (the image size comes from a static tensor shape) and in PYNATIVE_MODE.
"""
import mindspore as ms
from mindspore import ops


def level_sizes(image_h, image_w, strides):
    """Feature map (h, w) of every level: ceil(image / stride), as the stride-2 P6/P7 convs give.

    Args:
        image_h, image_w (int): padded input size.
        strides (tuple[int]): stride of every level.
    Returns:
        tuple of (h, w) int pairs, one per level.
    """
    return tuple(((image_h + s - 1) // s, (image_w + s - 1) // s) for s in strides)


def make_points(image_h, image_w, strides, point_offset):
    """Locations of all levels.

    Args:
        image_h, image_w (int): padded input size.
        strides (tuple[int]): stride of every level.
        point_offset (float): 0.0 (torchvision) or 0.5 (paper) of a cell.
    Returns:
        points: (P, 2) float32 x, y in pixels.
        point_strides: (P,) float32 stride of the level of each point.
        sizes: tuple of (h, w) per level; P = sum(h * w).
    """
    sizes = level_sizes(image_h, image_w, strides)
    points = []
    point_strides = []
    for (h, w), s in zip(sizes, strides):
        xs = (ops.arange(w, dtype=ms.float32) + point_offset) * s
        ys = (ops.arange(h, dtype=ms.float32) + point_offset) * s
        grid_x = ops.broadcast_to(xs.reshape(1, w), (h, w))
        grid_y = ops.broadcast_to(ys.reshape(h, 1), (h, w))
        points.append(ops.stack((grid_x, grid_y), axis=-1).reshape(h * w, 2))
        point_strides.append(ops.full((h * w,), s, dtype=ms.float32))
    return ops.cat(points, axis=0), ops.cat(point_strides, axis=0), sizes


def per_point(sizes, values):
    """Repeat one row of values per level over that level's points.

    Args:
        sizes: tuple of (h, w) per level, from make_points.
        values: per level a tuple of D floats (e.g. a limit_range pair).
    Returns:
        (P, D) float32.
    """
    rows = []
    for (h, w), level_values in zip(sizes, values):
        columns = tuple(ops.full((h * w,), float(v), dtype=ms.float32) for v in level_values)
        rows.append(ops.stack(columns, axis=-1))
    return ops.cat(rows, axis=0)


def encode(points, boxes, scale):
    """Distances from points to the box sides, in units of scale.

    Args:
        points: (..., 2) x, y.
        boxes: (..., 4) x1, y1, x2, y2, broadcastable against points.
        scale: (..., 1) tensor or a float; the level stride when regression is
            stride-normalised, else 1.
    Returns:
        (..., 4) l, t, r, b.
    """
    x = points[..., 0:1]
    y = points[..., 1:2]
    ltrb = ops.cat((x - boxes[..., 0:1], y - boxes[..., 1:2],
                    boxes[..., 2:3] - x, boxes[..., 3:4] - y), axis=-1)
    return ltrb / scale


def decode(points, ltrb, scale):
    """Inverse of encode: boxes from points and side distances.

    Args:
        points: (..., 2) x, y.
        ltrb: (..., 4) l, t, r, b in units of scale.
        scale: (..., 1) tensor or a float.
    Returns:
        (..., 4) x1, y1, x2, y2.
    """
    dist = ltrb * scale
    x = points[..., 0:1]
    y = points[..., 1:2]
    return ops.cat((x - dist[..., 0:1], y - dist[..., 1:2],
                    x + dist[..., 2:3], y + dist[..., 3:4]), axis=-1)
