"""Sample transforms: keep-ratio resize, flips and 90-degree turns, photometric jitter (colour,
lightness inversion, random convolutions), crops (keep-ratio or fixed-size windows), rotation,
normalise, pad.

A sample is an image (H,W,3) uint8 RGB, boxes (N,4) float32 x1,y1,x2,y2 in continuous pixel
coordinates (pixel column i spans [i, i+1)) and labels (N,) int32. Every geometric transform
moves the boxes with the pixels. Random transforms take an explicit ``numpy.random.Generator``
so that augmentation is reproducible from a seed.

``preprocess_image`` is the one inference preprocessing (evaluation, preprocess.py for the
exported graph, prediction); ``TrainTransform`` is the training one built on the same pieces.
"""
import dataclasses
from typing import TYPE_CHECKING, NamedTuple, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from src.geometry import EvalGeometry, box_area, clip_boxes, hflip_boxes, keep_ratio_size, rot90_boxes

if TYPE_CHECKING:
    from src.config import Config

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class PixelFormat:
    """What the network reads from an RGB image: channel order ("RGB" or "BGR") and, per channel
    of that order, the mean and standard deviation on the 0..255 scale; input = (x - mean) / std.
    The default is torchvision's ImageNet normalisation; the FCOS authors' models read BGR minus
    their PIXEL_MEAN with std 1."""
    channel_order: str = "RGB"
    mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)  # IMAGENET_MEAN x 255, as default_config.yaml
    std: Tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"pixel mean and std need 3 values each, std > 0: {list(self.mean)}, {list(self.std)}")

    @classmethod
    def from_config(cls, cfg: "Config") -> "PixelFormat":
        """The configuration's channel_order, pixel_mean and pixel_std."""
        return cls(cfg.channel_order, tuple(cfg.pixel_mean), tuple(cfg.pixel_std))

    def as_dict(self) -> dict:
        """For the export info (src.deploy.contract), which preprocess.py reads back with from_dict."""
        return {"channel_order": self.channel_order, "pixel_mean": list(self.mean), "pixel_std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> "PixelFormat":
        """as_dict's output; the defaults where keys are absent (export info of earlier versions)."""
        default = cls()
        return cls(values.get("channel_order", default.channel_order), tuple(values.get("pixel_mean", default.mean)),
                   tuple(values.get("pixel_std", default.std)))


IMAGENET_PIXELS = PixelFormat()
# Rotation fills uncovered corners with the mean colour, which normalises to about zero,
# the value of the padding.
_MEAN_RGB = tuple(float(round(255 * m)) for m in IMAGENET_MEAN)


class ImageMeta(NamedTuple):
    """Sizes that map predictions on a preprocessed image back to the original image.

    orig_hw: (h, w) of the decoded image; resized_hw: (h, w) after resizing, before padding.
    """
    orig_hw: tuple
    resized_hw: tuple


def resize_image(image: np.ndarray, size_hw: Sequence[int], rule: str = "torchvision") -> np.ndarray:
    """Bilinear resize of (H,W,3) to size_hw (h, w), on the 0..255 scale.

    rule "torchvision": in float32, as torchvision resizes its float tensor (on the parity
    fixture's photos the network input then equals torchvision's within 6e-5, against 1.3e-2 for
    cv2's rounded uint8 path). rule "maskrcnn_benchmark": PIL's bilinear filter on the 8-bit image
    (antialiased when shrinking), as the FCOS authors' transforms; the result stays uint8.
    """
    if tuple(size_hw) == image.shape[:2]:
        return image
    if rule == "maskrcnn_benchmark":
        pil = Image.fromarray(np.ascontiguousarray(image, np.uint8))
        return np.asarray(pil.resize((int(size_hw[1]), int(size_hw[0])), Image.BILINEAR))
    return cv2.resize(image.astype(np.float32), (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)


def resize(image: np.ndarray, boxes: np.ndarray, size_hw: Sequence[int],
           rule: str = "torchvision") -> Tuple[np.ndarray, np.ndarray]:
    """Resize a sample to size_hw (h, w) (resize_image's rule); boxes scale per axis."""
    h, w = image.shape[:2]
    scale = np.array([size_hw[1] / w, size_hw[0] / h] * 2)
    # float64 then a clip, so that a box touching the border stays exactly on it
    scaled = np.minimum(boxes * scale, np.array([size_hw[1], size_hw[0]] * 2))
    return resize_image(image, size_hw, rule), scaled.astype(np.float32)


def hflip(image: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror an (H, W, C) image and its boxes left-right (hflip_boxes)."""
    return np.ascontiguousarray(image[:, ::-1]), hflip_boxes(boxes, image.shape[1])


def vflip(image: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom: coordinate y goes to h-y."""
    h = image.shape[0]
    flipped = boxes.copy()
    flipped[:, 1] = h - boxes[:, 3]
    flipped[:, 3] = h - boxes[:, 1]
    return np.ascontiguousarray(image[::-1]), flipped


def rot90(image: np.ndarray, boxes: np.ndarray, turns: int) -> Tuple[np.ndarray, np.ndarray]:
    """Turn an (H, W, C) image and its boxes counter-clockwise by turns x 90 degrees (rot90_boxes)."""
    boxes = rot90_boxes(boxes, turns, image.shape[:2])
    return np.ascontiguousarray(np.rot90(image, turns % 4)), boxes.astype(np.float32).reshape(-1, 4)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor in [1-strength, 1+strength], in a
    random order; strength 0 returns the image unchanged."""
    if strength <= 0:
        return image
    out = image.astype(np.float32)
    for op in rng.permutation(3):
        factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        # Each op blends the image with an anchor: black, its mean grey level, its grey version.
        if op == 0:
            out *= factor
        else:
            gray = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
            anchor = float(gray.mean()) if op == 1 else gray[..., None]
            out -= anchor
            out *= factor
            out += anchor
        np.clip(out, 0.0, 255.0, out=out)
    return np.round(out).astype(np.uint8)


def hue_shift(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Turn every pixel's hue by one angle drawn from U(-fraction, fraction) of the colour circle
    (torchvision's ColorJitter hue); fraction 0 returns the image unchanged. Aerial sites differ
    in the hue of their canopy and ground more than a brightness/contrast/saturation jitter
    reaches."""
    if fraction <= 0:
        return image
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * rng.uniform(-fraction, fraction), 360.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.round(np.clip(rgb * 255.0, 0.0, 255.0)).astype(np.uint8)


def invert_lightness(image: np.ndarray) -> np.ndarray:
    """Turn CIE L* into 100 - L*, keeping a* and b* (hue and chroma): what was brighter than its
    surroundings becomes darker, colours stay. (H,W,3) uint8 RGB -> the same; colours that leave
    the RGB gamut are clipped. Tree crowns are brighter than a shadowed understory on one site
    and darker than bright sand or soil on another."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)  # L* in [0, 100]
    lab[..., 0] = 100.0 - lab[..., 0]
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    return np.round(np.clip(rgb * 255.0, 0.0, 255.0)).astype(np.uint8)


def random_conv(image: np.ndarray, rng: np.random.Generator, kernel_sizes: Sequence[int] = (1, 3, 5)) -> np.ndarray:
    """RandConv (Xu et al., ICLR 2021): filter the image with a random 3->3 channel convolution
    (k x k, k drawn from kernel_sizes, weights ~ N(0, 1/(3 k^2))), give each output channel the
    mean and standard deviation of the input channel, and blend with the image by a factor drawn
    from U(0, 1). (H,W,3) uint8 -> the same. New colours and local textures, shapes kept: a
    detector trained on a few sites leans less on their look."""
    k = int(rng.choice(kernel_sizes))
    weights = rng.normal(0.0, 1.0 / np.sqrt(3 * k * k), size=(3, 3, k, k)).astype(np.float32)
    src = image.astype(np.float32)
    out = np.zeros_like(src)
    for o in range(3):
        for i in range(3):
            out[..., o] += cv2.filter2D(src[..., i], -1, weights[o, i], borderType=cv2.BORDER_REFLECT)
    src_mean, src_std = src.mean(axis=(0, 1)), src.std(axis=(0, 1))
    out_mean, out_std = out.mean(axis=(0, 1)), out.std(axis=(0, 1))
    out = (out - out_mean) * (src_std / np.maximum(out_std, 1e-3)) + src_mean
    blend = rng.uniform(0.0, 1.0)
    out = blend * src + (1.0 - blend) * out
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _keep_visible(moved, unclipped_area, width, height, min_visible):
    """Clip boxes (N,4) to a width x height window -> (clipped (N,4), keep (N,) bool: at least
    ``min_visible`` of unclipped_area (N,) is left)."""
    clipped = clip_boxes(moved, (height, width))
    area = box_area(clipped)
    keep = (area > 0) & (area >= min_visible * unclipped_area)
    return clipped, keep


def random_crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, min_scale: float,
                min_visible: float = 0.5, max_tries: int = 10) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop a window of the image's aspect ratio, sides scaled by s ~ U(min_scale, 1).

    Boxes are clipped to the window; those with under ``min_visible`` of their area inside are
    dropped. A window that would leave no box (when there were some) is redrawn, up to
    ``max_tries`` times, then the sample is returned uncropped. Keeping the aspect ratio keeps the
    image in its orientation's pad bucket.
    """
    h, w = image.shape[:2]
    for _ in range(max_tries):
        s = rng.uniform(min_scale, 1.0)
        crop_h, crop_w = max(1, round(h * s)), max(1, round(w * s))
        y0 = int(rng.integers(0, h - crop_h + 1))
        x0 = int(rng.integers(0, w - crop_w + 1))
        moved = boxes - np.array([x0, y0, x0, y0], np.float32)
        clipped, keep = _keep_visible(moved, box_area(boxes), crop_w, crop_h, min_visible)
        if keep.any() or len(boxes) == 0:
            return image[y0:y0 + crop_h, x0:x0 + crop_w], clipped[keep], labels[keep]
    return image, boxes, labels


def random_window(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int,
                  scale_range: Sequence[float], min_visible: float = 0.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a window at a random place and zoom s ~ U(scale_range) so that it is size x size
    (smaller where the image is smaller than size / s).

    The window covers size / s source pixels per side; boxes are clipped to it and those with
    under ``min_visible`` of their area inside are dropped. A window may hold no box: on large
    images (orthophotos) that is background the network should learn too.
    -> (image (h,w,3) with h, w <= size, boxes (K,4), labels (K,)).
    """
    h, w = image.shape[:2]
    zoom = rng.uniform(*scale_range)
    win_h, win_w = min(h, max(1, round(size / zoom))), min(w, max(1, round(size / zoom)))
    y0 = int(rng.integers(0, h - win_h + 1))
    x0 = int(rng.integers(0, w - win_w + 1))
    moved = boxes - np.array([x0, y0, x0, y0], np.float32)
    clipped, keep = _keep_visible(moved, box_area(boxes), win_w, win_h, min_visible)
    out_hw = (min(size, max(1, round(win_h * zoom))), min(size, max(1, round(win_w * zoom))))
    window, kept = resize(image[y0:y0 + win_h, x0:x0 + win_w], clipped[keep], out_hw)
    return window, kept, labels[keep]


def _clip_polygon(points, width, height):
    """Sutherland-Hodgman: the part of convex polygon (K,2) inside [0,width] x [0,height]."""
    for axis, bound, sign in ((0, 0.0, 1.0), (0, width, -1.0), (1, 0.0, 1.0), (1, height, -1.0)):
        if not len(points):
            break
        inside = sign * (points[:, axis] - bound) >= 0
        clipped = []
        for i in range(len(points)):
            if inside[i] != inside[i - 1]:
                prev, cur = points[i - 1], points[i]
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                clipped.append(prev + t * (cur - prev))
            if inside[i]:
                clipped.append(points[i])
        points = np.array(clipped, np.float64).reshape(-1, 2)
    return points


def _polygon_area(points):
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _visible_part(quad, width, height, min_visible):
    """Tight box (x1,y1,x2,y2) of the part of convex quad (4,2) inside the canvas, or None when
    less than ``min_visible`` of its area is inside."""
    part = _clip_polygon(quad, width, height)
    area = _polygon_area(part) if len(part) >= 3 else 0.0
    if area <= 0 or area < min_visible * _polygon_area(quad):
        return None
    part = np.clip(part, 0.0, [width, height])  # intersections can leave it by round-off
    return [*part.min(axis=0), *part.max(axis=0)]


def rotate(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, degrees: float,
           min_visible: float = 0.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate counter-clockwise by ``degrees`` about the image centre, keeping the canvas size.

    Each box becomes the bounding box of the part of its rotated rectangle inside the canvas;
    boxes with under ``min_visible`` of their area inside are dropped. If no box would remain
    (when there were some) the sample is returned unrotated.
    """
    h, w = image.shape[:2]
    # cv2 addresses pixel centres (index i sits at i + 0.5 in box coordinates), so the same
    # rotation is about ((w-1)/2, (h-1)/2) for pixels and (w/2, h/2) for box corners.
    pixel_map = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    corner_map = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), degrees, 1.0)
    quads = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2) @ corner_map[:, :2].T
    quads += corner_map[:, 2]
    parts = [_visible_part(quad, w, h, min_visible) for quad in quads]
    keep = np.array([part is not None for part in parts], bool)
    if len(boxes) and not keep.any():
        return image, boxes, labels
    rotated = cv2.warpAffine(image, pixel_map, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=_MEAN_RGB)
    kept = np.array([part for part in parts if part is not None], np.float32).reshape(-1, 4)
    return rotated, kept, labels[keep]


def normalize_and_pad(image: np.ndarray, pad_hw: Sequence[int], pixels: PixelFormat = IMAGENET_PIXELS) -> np.ndarray:
    """(H,W,3) RGB on the 0..255 scale (uint8 or float32) -> (3,pad_h,pad_w) float32:
    (x - mean) / std in the channel order of ``pixels`` (PixelFormat), zero-padded at the bottom
    and right."""
    h, w = image.shape[:2]
    if h > pad_hw[0] or w > pad_hw[1]:
        raise ValueError(f"image of {h}x{w} does not fit the pad shape {pad_hw[0]}x{pad_hw[1]}")
    out = np.zeros((3, pad_hw[0], pad_hw[1]), np.float32)
    order = (0, 1, 2) if pixels.channel_order == "RGB" else (2, 1, 0)
    # channel by channel straight into the padded buffer: about 2x faster than
    # transpose + normalise + copy at 800x1333
    for c, source in enumerate(order):
        view = out[c, :h, :w]
        np.multiply(image[:, :, source], 1.0 / pixels.std[c], out=view, casting="unsafe")
        view -= pixels.mean[c] / pixels.std[c]
    return out


def preprocess_image(image: np.ndarray, geometry: EvalGeometry, pad_hw: Sequence[int],
                     pixels: PixelFormat = IMAGENET_PIXELS) -> Tuple[np.ndarray, ImageMeta]:
    """Inference preprocessing: keep-ratio resize (geometry's sizes and rule), normalise, zero-pad.

    image (H,W,3) uint8 RGB -> (chw (3,pad_h,pad_w) float32, ImageMeta). If the keep-ratio size
    does not fit pad_hw (a fixed export shape and an image of the other orientation) the image is
    shrunk further to fit; ImageMeta always holds the scales actually applied.
    """
    h, w = image.shape[:2]
    size = geometry.resized_size((h, w), fit_hw=pad_hw)
    resized = resize_image(image, size, geometry.resize_rule)
    meta = ImageMeta(orig_hw=(h, w), resized_hw=size)
    return normalize_and_pad(resized, pad_hw, pixels), meta


class TrainTransform:
    """Training transform: jitter -> vertical flip / 90-degree turns -> crop -> rotate -> resize
    to a random min_size -> horizontal flip -> normalise -> pad; in window mode a random window
    of ``window`` pixels -> flip / turns -> jitter -> horizontal flip -> normalise -> pad.

    Args:
        min_sizes: short-side sizes, one drawn per sample (multi-scale training).
        max_size: cap on the long side.
        flip_prob, vflip_prob: probabilities of a horizontal and of a vertical flip.
        rot90_prob: probability of a counter-clockwise turn by 90, 180 or 270 degrees (drawn
            uniformly); with both flips this covers the 8 symmetries of the square, valid for
            top-down (nadir) imagery. A turned non-square image is shrunk to fit its pad shape.
        color_jitter: photometric strength (0 = off).
        hue_jitter: largest hue turn as a fraction of the colour circle (0 = off, at most 0.5).
        invert_lightness_prob: probability of invert_lightness.
        random_conv_prob: probability of random_conv.
        crop_prob, crop_min_scale: probability and smallest side fraction of a random crop.
        rotate_degrees: rotation angle drawn from U(-rotate_degrees, rotate_degrees) (0 = off).
        window: > 0 replaces crop and resize by a random window that becomes window x window
            pixels at a zoom drawn from ``window_scale`` (random_window).
        resize_rule: keep_ratio_size's and resize_image's rule; pixels: the PixelFormat.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, *, flip_prob: float = 0.5, vflip_prob: float = 0.0,
                 rot90_prob: float = 0.0, color_jitter: float = 0.0, hue_jitter: float = 0.0,
                 invert_lightness_prob: float = 0.0, random_conv_prob: float = 0.0, crop_prob: float = 0.0,
                 crop_min_scale: float = 0.6, rotate_degrees: float = 0.0, window: int = 0,
                 window_scale: Sequence[float] = (1.0, 1.0), resize_rule: str = "torchvision",
                 pixels: PixelFormat = IMAGENET_PIXELS) -> None:
        if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"min_size {min_sizes} and max_size {max_size} must be positive")
        if not 0.0 < crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}")
        if len(window_scale) != 2 or not 0.0 < window_scale[0] <= window_scale[1]:
            raise ValueError(f"window_scale must be [low, high] with 0 < low <= high, got {window_scale}")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.vflip_prob = float(vflip_prob)
        self.rot90_prob = float(rot90_prob)
        self.color_jitter = float(color_jitter)
        self.hue_jitter = float(hue_jitter)
        self.invert_lightness_prob = float(invert_lightness_prob)
        self.random_conv_prob = float(random_conv_prob)
        self.crop_prob = float(crop_prob)
        self.crop_min_scale = float(crop_min_scale)
        self.rotate_degrees = float(rotate_degrees)
        self.window = int(window)
        self.window_scale = tuple(float(v) for v in window_scale)
        self.resize_rule = resize_rule
        self.pixels = pixels

    def __call__(self, image, boxes, labels, pad_hw, rng):
        """-> (chw (3,pad_h,pad_w) float32, boxes (K,4) float32, labels (K,) int32), K <= N."""
        if self.window:
            # the window first: jitter and turns then touch window pixels, not a whole orthophoto
            image, boxes, labels = random_window(image, boxes, labels, rng, self.window, self.window_scale)
            image, boxes = self._turns(image, boxes, rng)
            image = self._photometric(image, rng)
        else:
            image = self._photometric(image, rng)
            image, boxes = self._turns(image, boxes, rng)
            image, boxes, labels = self._crop_and_resize(image, boxes, labels, pad_hw, rng)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image, boxes = hflip(image, boxes)
        return normalize_and_pad(image, pad_hw, self.pixels), boxes, labels

    def _photometric(self, image, rng):
        image = hue_shift(color_jitter(image, self.color_jitter, rng), self.hue_jitter, rng)
        if self.invert_lightness_prob > 0 and rng.random() < self.invert_lightness_prob:
            image = invert_lightness(image)
        if self.random_conv_prob > 0 and rng.random() < self.random_conv_prob:
            image = random_conv(image, rng)
        return image

    def _turns(self, image, boxes, rng):
        """Random vertical flip and 90-degree turn."""
        if self.vflip_prob > 0 and rng.random() < self.vflip_prob:
            image, boxes = vflip(image, boxes)
        if self.rot90_prob > 0 and rng.random() < self.rot90_prob:
            image, boxes = rot90(image, boxes, int(rng.integers(1, 4)))
        return image, boxes

    def _crop_and_resize(self, image, boxes, labels, pad_hw, rng):
        """Whole-image mode: optional crop and rotation, then a keep-ratio resize to a random
        min_size that fits pad_hw."""
        if self.crop_prob > 0 and rng.random() < self.crop_prob:
            image, boxes, labels = random_crop(image, boxes, labels, rng, self.crop_min_scale)
        if self.rotate_degrees > 0:
            angle = rng.uniform(-self.rotate_degrees, self.rotate_degrees)
            image, boxes, labels = rotate(image, boxes, labels, angle)
        min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        size = keep_ratio_size(image.shape[0], image.shape[1], min_size, self.max_size, fit_hw=pad_hw,
                               rule=self.resize_rule)
        image, boxes = resize(image, boxes, size, self.resize_rule)
        return image, boxes, labels
