"""Procedural nadir forest stands: randomised tree crowns with cast shadows on randomised ground.

Domain randomisation for a detector that has to find crowns at sites it never saw: every stand
draws its own ground (patches of two or three random colours, texture, logs and shrubs as
unlabelled distractors), sun direction and shadow strength, and every crown its own outline
(lobed or star-like), colour (often green, any hue), dome shading and needle texture. What stays
fixed is what sites share: a crown is a compact, roughly round, textured blob that casts a
shadow, 16-70 px across (the DeepForest ground resolution of 10 cm). Training mixes such stands
with real windows (``synthetic_crowns``, docs/quickstart_experiments.md for what they bought).
"""
from typing import Tuple

import cv2
import numpy as np

from src.geometry import box_area

RADIUS_RANGE = (8.0, 35.0)  # crown radius in pixels: boxes of about 16-70 px
_MAX_OVERLAP = 0.3  # of the smaller box, so that every labelled crown stays mostly visible


def _noise(rng, height, width, cell):
    """(H,W) float32 smooth noise in about [-1, 1]: random values on a grid of ``cell`` px, cubic
    interpolation."""
    grid = rng.normal(0, 1, size=(max(2, height // cell + 2), max(2, width // cell + 2)))
    big = cv2.resize(grid.astype(np.float32), ((grid.shape[1]) * cell, (grid.shape[0]) * cell),
                     interpolation=cv2.INTER_CUBIC)
    return big[:height, :width] / 1.5


def _random_colour(rng, green_prob=0.6):
    """An RGB colour (3,) float32 in 0..255: greenish with probability green_prob, else any hue."""
    hue = rng.uniform(35, 85) if rng.random() < green_prob else rng.uniform(0, 180)
    sat = rng.uniform(0.05, 0.8) * 255
    val = rng.uniform(0.15, 0.95) * 255
    hsv = np.array([[[hue, sat, val]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _ground(rng, height, width):
    """(H,W,3) float32 ground: patches of 2-3 colours, low- and high-frequency texture."""
    colours = [_random_colour(rng, green_prob=0.4) for _ in range(int(rng.integers(2, 4)))]
    field = _noise(rng, height, width, int(rng.integers(24, 96)))
    edges = np.sort(rng.uniform(-0.6, 0.6, size=len(colours) - 1))
    index = np.searchsorted(edges, field)
    image = np.stack(colours)[index]
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(1.0, 4.0))
    image += _noise(rng, height, width, 8)[..., None] * rng.uniform(0, 25)
    image += rng.normal(0, rng.uniform(2, 15), size=(height, width, 1)).astype(np.float32)
    return image


def _distractors(rng, image, sun):
    """Draw unlabelled logs (thin bright or dark lines) and shrubs (blobs under 12 px) in place."""
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(0, 6))):
        x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
        angle, length = rng.uniform(0, np.pi), rng.uniform(30, 200)
        x2, y2 = x1 + length * np.cos(angle), y1 + length * np.sin(angle)
        cv2.line(image, (int(x1), int(y1)), (int(x2), int(y2)), _random_colour(rng, 0.2).tolist(),
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 30))):
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        radius = int(rng.uniform(2, 6))
        shadow = (x + int(sun[0] * radius), y + int(sun[1] * radius))
        cv2.circle(image, shadow, radius, (image[y, x] * 0.5).tolist(), -1)
        cv2.circle(image, (x, y), radius, _random_colour(rng).tolist(), -1, cv2.LINE_AA)


def _outline(rng, cx, cy, radius):
    """(K,2) int32 polygon of a crown: an ellipse whose radius is modulated by a few low lobes
    and, for conifers, many sharp ones."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:
        r += rng.uniform(0.05, 0.25) * np.abs(np.cos(int(rng.integers(5, 12)) * theta / 2 +
                                                     rng.uniform(0, np.pi))) - 0.1
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    tilt = rng.uniform(0, np.pi)
    x = radius * r * np.cos(theta) * aspect
    y = radius * r * np.sin(theta) / aspect
    xs = cx + x * np.cos(tilt) - y * np.sin(tilt)
    ys = cy + x * np.sin(tilt) + y * np.cos(tilt)
    return np.round(np.stack([xs, ys], 1)).astype(np.int32)


def overlap_of_smaller(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection of box (4,) with each of others (K,4) over the smaller of the two areas."""
    if not len(others):
        return np.zeros(0)
    others = np.asarray(others, np.float64)
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    return w * h / np.minimum(area, box_area(others))


def _place(rng, height, width, count):
    """-> [(cx, cy, radius)] of up to ``count`` crowns whose boxes overlap little."""
    crowns, boxes = [], []
    lo, hi = np.log(RADIUS_RANGE[0]), np.log(RADIUS_RANGE[1])
    mean_radius = np.exp(rng.uniform(lo, hi))  # one stand: crowns of similar size
    for _ in range(count * 4):
        if len(crowns) == count:
            break
        radius = float(np.clip(mean_radius * np.exp(rng.normal(0, 0.25)), *RADIUS_RANGE))
        cx, cy = rng.uniform(-radius / 2, width + radius / 2), rng.uniform(-radius / 2, height + radius / 2)
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        if (overlap_of_smaller(box, boxes) > _MAX_OVERLAP).any():
            continue
        crowns.append((cx, cy, radius))
        boxes.append(box)
    return crowns


def _paint_crown(rng, image, polygon, cx, cy, radius, colour, sun):
    """Fill one crown in place: dome shading lit from the sun's side, needle texture."""
    height, width = image.shape[:2]
    x1, y1 = np.maximum(polygon.min(0), 0)
    x2, y2 = np.minimum(polygon.max(0) + 1, (width, height))
    if x2 <= x1 or y2 <= y1:
        return
    mask = np.zeros((y2 - y1, x2 - x1), np.uint8)
    cv2.fillPoly(mask, [polygon - (x1, y1)], 1)
    ys, xs = np.mgrid[y1:y2, x1:x2].astype(np.float32)
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    dome = 1 - np.clip(dx * dx + dy * dy, 0, 1)
    lit = -(dx * sun[0] + dy * sun[1])  # the side facing the sun is brighter
    shade = 1 + rng.uniform(-0.3, 0.5) * dome + rng.uniform(0, 0.4) * lit
    texture = rng.normal(0, 1, size=mask.shape).astype(np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), rng.uniform(0.6, 2.0)) * rng.uniform(10, 50)
    patch = colour * shade[..., None] + texture[..., None]
    region = image[y1:y2, x1:x2]
    region[mask > 0] = patch[mask > 0]


def make_stand(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """One procedural stand -> (image (size,size,3) uint8 RGB, boxes (K,4) float32 x1,y1,x2,y2):
    the tight bounds of every crown, clipped to the image (crowns under 4 px left out)."""
    sun_angle = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_angle), np.sin(sun_angle)], np.float32)
    image = _ground(rng, size, size)
    _distractors(rng, image, sun)
    crowns = _place(rng, size, size, int(rng.integers(3, 60)))
    polygons = [_outline(rng, cx, cy, r) for cx, cy, r in crowns]
    shadow_length, darkness = rng.uniform(0.2, 1.2), rng.uniform(0.25, 0.8)
    shadow = np.zeros((size, size), np.uint8)
    for polygon, (_, _, radius) in zip(polygons, crowns):
        offset = np.round(sun * radius * shadow_length).astype(np.int32)
        cv2.fillPoly(shadow, [polygon + offset], 1)
    shadow = cv2.GaussianBlur(shadow.astype(np.float32), (0, 0), 1.5)
    image *= (1 - (1 - darkness) * shadow)[..., None]
    stand_colour = _random_colour(rng, green_prob=0.7)
    boxes = []
    for polygon, (cx, cy, radius) in zip(polygons, crowns):
        colour = stand_colour + rng.normal(0, 20, size=3).astype(np.float32)
        _paint_crown(rng, image, polygon, cx, cy, radius, colour, sun)
        x1, y1 = np.clip(polygon.min(0), 0, size)
        x2, y2 = np.clip(polygon.max(0) + 1, 0, size)
        if x2 - x1 >= 4 and y2 - y1 >= 4:
            boxes.append((x1, y1, x2, y2))
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.0))
    return np.clip(image, 0, 255).astype(np.uint8), np.array(boxes, np.float32).reshape(-1, 4)


class CrownStands:
    """Generated training samples (the pipeline's plug-in, src/data/pipeline.py GeneratedSamples):
    procedural stands of ``size`` pixels that make ``fraction`` (in [0, 1)) of an epoch's samples,
    labelled 0 (one-class data), a new one every epoch."""

    def __init__(self, fraction: float, size: int) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the synthetic fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.size = size

    def count(self, num_real: int) -> int:
        """Generated samples an epoch next to num_real real ones."""
        return round(num_real * self.fraction / (1.0 - self.fraction))

    def make(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (image (size, size, 3) uint8 RGB, boxes (K, 4) float32, labels (K,) int32)."""
        image, boxes = make_stand(rng, self.size)
        return image, boxes, np.zeros(len(boxes), np.int32)
