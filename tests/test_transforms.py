"""src/data/transforms.py: boxes move with pixels under every transform (property tests), sizes,
normalisation, padding, pad buckets, and the inference preprocessing against torchvision."""
import colorsys
import json
import math
import os

import src  # noqa: F401
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import parity_dir
from src.data.coco import load_image_rgb
from src.geometry import EvalGeometry, choose_pad_shape, default_pad_buckets, keep_ratio_size
from src.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainTransform, color_jitter, hflip, hue_shift, invert_lightness, normalize_and_pad, preprocess_image, random_conv, random_crop, random_window, resize, rot90, rotate, vflip)

PROPERTY = settings(max_examples=40, deadline=None)
TOLERANCE = 2.0  # pixels: interpolation blurs a painted edge by about one pixel


@st.composite
def painted_samples(draw, min_side=48, max_side=160):
    """An image with up to 3 boxes in separate horizontal bands, box k painted pure colour k
    (red, green, blue) on black; label k."""
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    count = draw(st.integers(1, 3))
    band = h // count
    image = np.zeros((h, w, 3), np.uint8)
    boxes = []
    for k in range(count):
        bh = draw(st.integers(8, max(8, band - 2)))
        bw = draw(st.integers(8, w - 2))
        y1 = k * band + draw(st.integers(0, band - bh))
        x1 = draw(st.integers(0, w - bw))
        image[y1:y1 + bh, x1:x1 + bw, k] = 255
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return image, np.array(boxes, np.float32), np.arange(count, dtype=np.int32)


def _mask_box(mask):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def colour_boxes(image, label):
    """Bounding boxes of colour ``label``'s pixels -> (core, halo): core holds the pixels mostly
    of that colour, halo every pixel with a trace of it (blended edges, thin slivers). Neither
    takes in rotation's grey fill (124, 116, 104)."""
    others = np.delete(image, label, axis=-1).astype(int)
    core = (image[..., label] > 127) & (others < 64).all(axis=-1)
    halo = image[..., label].astype(int) - others.max(axis=-1) > 10
    return _mask_box(core), _mask_box(halo)


def assert_boxes_follow_pixels(image, boxes, labels, tolerance=TOLERANCE):
    """Each box lies between the core and the halo of its colour, within ``tolerance``."""
    assert boxes.dtype == np.float32 and labels.dtype == np.int32 and len(boxes) == len(labels)
    h, w = image.shape[:2]
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    for box, label in zip(boxes, labels):
        core, halo = colour_boxes(image, int(label))
        assert core is not None, (box, label)
        grow = np.array([-1, -1, 1, 1], np.float32) * tolerance
        assert (box[:2] <= core[:2] - grow[:2]).all() and (box[2:] >= core[2:] - grow[2:]).all(), \
            (box, core)
        assert (box[:2] >= halo[:2] + grow[:2]).all() and (box[2:] <= halo[2:] + grow[2:]).all(), \
            (box, halo)


@PROPERTY
@given(painted_samples(), st.integers(40, 300), st.integers(40, 600))
def test_resize_scales_boxes_per_axis(sample, min_size, max_size):
    image, boxes, labels = sample
    h, w = image.shape[:2]
    size = keep_ratio_size(h, w, min_size, max_size)
    scale = min(min_size / min(h, w), max_size / max(h, w))
    assert size == (math.floor(h * scale), math.floor(w * scale))
    out, out_boxes = resize(image, boxes, size)
    assert out.shape == (size[0], size[1], 3)
    ratio = np.array([size[1] / w, size[0] / h] * 2, np.float32)
    np.testing.assert_allclose(out_boxes, boxes * ratio, rtol=1e-6)
    if min(ratio) * 8 >= 4:  # boxes stay a few pixels wide, so their colour is still findable
        assert_boxes_follow_pixels(out, out_boxes, labels,
                                   tolerance=TOLERANCE * max(1, ratio.max()))


@PROPERTY
@pytest.mark.parametrize("flip", [hflip, vflip])
@given(sample=painted_samples())
def test_flip_moves_boxes_and_twice_is_identity(flip, sample):
    image, boxes, labels = sample
    flipped, flipped_boxes = flip(image, boxes)
    assert_boxes_follow_pixels(flipped, flipped_boxes, labels, tolerance=0)
    back, back_boxes = flip(flipped, flipped_boxes)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(back_boxes, boxes)


@PROPERTY
@given(painted_samples(), st.integers(0, 3))
def test_rot90_moves_boxes_exactly_and_four_turns_are_identity(sample, turns):
    image, boxes, labels = sample
    out, out_boxes = rot90(image, boxes, turns)
    assert out.shape == (image.shape[:2] if turns % 2 == 0 else image.shape[1::-1]) + (3,)
    assert_boxes_follow_pixels(out, out_boxes, labels, tolerance=0)
    back, back_boxes = rot90(out, out_boxes, 4 - turns)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(back_boxes, boxes)


def test_rot90_is_counter_clockwise():
    image = np.zeros((20, 30, 3), np.uint8)
    image[0, 29] = 255  # top-right pixel goes to top-left
    out, boxes = rot90(image, np.array([[29, 0, 30, 1]], np.float32), 1)
    assert out[0, 0].all() and out.shape == (30, 20, 3)
    np.testing.assert_array_equal(boxes, [[0, 0, 1, 1]])


@PROPERTY
@given(painted_samples(min_side=64, max_side=240), st.integers(0, 2 ** 32 - 1), st.integers(32, 128),
       st.floats(0.5, 1.0), st.floats(1.0, 2.0))
def test_random_window_size_zoom_and_boxes(sample, seed, size, low, high):
    image, boxes, labels = sample
    out, out_boxes, out_labels = random_window(image, boxes, labels, np.random.default_rng(seed), size,
                                               (low, high))
    h, w = image.shape[:2]
    zoom = np.random.default_rng(seed).uniform(low, high)  # the first draw is the zoom
    assert out.shape[0] <= size and out.shape[1] <= size
    # full size unless the image is smaller than the window, else the image at that zoom
    assert out.shape[0] == min(size, max(1, round(min(h, round(size / zoom)) * zoom)))
    assert out.shape[1] == min(size, max(1, round(min(w, round(size / zoom)) * zoom)))
    if min(out.shape[:2]) >= 16 and zoom >= 0.5:
        assert_boxes_follow_pixels(out.round().clip(0, 255).astype(np.uint8), out_boxes, out_labels,
                                   tolerance=TOLERANCE * max(1.0, zoom))


def test_random_window_covers_size_over_zoom_source_pixels():
    image = np.zeros((400, 400, 3), np.uint8)
    grid = np.arange(0, 400, 20, dtype=np.float32)  # 20x20 boxes tiling the image
    x, y = np.meshgrid(grid, grid)
    boxes = np.stack([x.ravel(), y.ravel(), x.ravel() + 20, y.ravel() + 20], axis=1)
    out, out_boxes, _ = random_window(image, boxes, np.zeros(len(boxes), np.int32), np.random.default_rng(0),
                                      100, (0.5, 0.5))
    assert out.shape == (100, 100, 3)  # 200 source pixels at zoom 0.5
    sides = out_boxes[:, 2:] - out_boxes[:, :2]
    # 10 whole boxes per axis, plus at most a part box at each edge (kept when half is inside)
    assert 100 <= len(out_boxes) <= 121 and (sides <= 10 + 1e-4).all() and (sides >= 5 - 1e-4).all()
    assert (out_boxes.min(axis=0)[:2] <= 5).all() and (out_boxes.max(axis=0)[2:] >= 95).all()


@PROPERTY
@given(painted_samples(), st.integers(0, 2 ** 32 - 1), st.floats(0.3, 1.0))
def test_random_crop_keeps_boxes_aligned_and_never_empties(sample, seed, min_scale):
    image, boxes, labels = sample
    h, w = image.shape[:2]
    out, out_boxes, out_labels = random_crop(image, boxes, labels, np.random.default_rng(seed),
                                             min_scale)
    assert len(out_boxes) >= 1
    # The window keeps the aspect ratio (up to rounding) and the scale bound.
    assert abs(out.shape[0] / h - out.shape[1] / w) <= 1.0 / min(h, w) + 1e-9
    assert out.shape[0] >= round(h * min_scale) - 1
    assert_boxes_follow_pixels(out, out_boxes, out_labels, tolerance=0)
    for box, label in zip(out_boxes, out_labels):  # at least half of every kept box is inside
        original = boxes[label]
        area = (original[2] - original[0]) * (original[3] - original[1])
        assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.5 * area - 1e-3


@PROPERTY
@given(painted_samples(min_side=64), st.floats(-15, 15))
def test_rotate_boxes_bound_the_rotated_pixels(sample, degrees):
    image, boxes, labels = sample
    out, out_boxes, out_labels = rotate(image, boxes, labels, degrees)
    assert out.shape == image.shape and len(out_boxes) >= 1
    assert_boxes_follow_pixels(out, out_boxes, out_labels)


def test_rotate_by_zero_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    boxes = np.array([[3, 4, 20, 25]], np.float32)
    out, out_boxes, _ = rotate(image, boxes, np.zeros(1, np.int32), 0.0)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_allclose(out_boxes, boxes, atol=1e-4)


def test_color_jitter_strength_zero_is_identity_and_positive_changes_pixels():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert color_jitter(image, 0.0, rng) is image
    jittered = color_jitter(image, 0.4, np.random.default_rng(2))
    assert jittered.dtype == np.uint8 and jittered.shape == image.shape
    assert np.abs(jittered.astype(int) - image).mean() > 1
    np.testing.assert_array_equal(jittered, color_jitter(image, 0.4, np.random.default_rng(2)))


def test_hue_shift_turns_the_hue_by_the_drawn_angle():
    """Against colorsys per pixel: same value and saturation, hue turned by U(-f, f) turns."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image[0] = 128  # grey pixels have no hue and stay as they are
    assert hue_shift(image, 0.0, rng) is image
    turn = np.random.default_rng(4).uniform(-0.3, 0.3)
    shifted = hue_shift(image, 0.3, np.random.default_rng(4))
    expected = np.empty_like(image)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        expected[index] = np.round(np.array(colorsys.hsv_to_rgb((h + turn) % 1.0, s, v)) * 255)
    assert np.abs(shifted.astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(shifted[0], image[0])


def _srgb_to_lab(rgb):
    """Reference CIE L*a*b* (D65) of sRGB in [0, 1], float64, from the standard's formulas."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]]).T / np.array([0.950456, 1.0, 1.088754])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def test_invert_lightness_against_a_reference_lab():
    """L* becomes 100 - L*, a* and b* stay (colours that stay in the sRGB gamut, to uint8 rounding);
    black and white swap."""
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (1, 40, 1)).astype(np.uint8).repeat(3, axis=2)
    muted = (110 + rng.integers(-25, 26, (30, 40, 3))).astype(np.uint8)  # low chroma, mid lightness
    for image in (grey, muted):
        inverted = invert_lightness(image)
        assert inverted.dtype == np.uint8 and inverted.shape == image.shape
        before, after = _srgb_to_lab(image / 255.0), _srgb_to_lab(inverted / 255.0)
        assert np.abs(after[..., 0] - (100 - before[..., 0])).max() < 0.8
        assert np.abs(after[..., 1:] - before[..., 1:]).max() < 1.5
    extremes = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(invert_lightness(extremes), extremes[:, ::-1], atol=1)


def _correlate_reflect(channel, kernel):
    """cv2.filter2D with BORDER_REFLECT, written out: correlation over a symmetric-padded image."""
    k = kernel.shape[0]
    padded = np.pad(channel, k // 2, mode="symmetric")
    out = np.zeros(channel.shape, np.float64)
    for dy in range(k):
        for dx in range(k):
            out += kernel[dy, dx] * padded[dy:dy + channel.shape[0], dx:dx + channel.shape[1]]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_conv_against_numpy(seed):
    """The drawn kernel size, weights and blend, recomputed in float64 NumPy: the filtered image
    with each channel's input mean and spread, blended into the input."""
    image = np.random.default_rng(10 + seed).integers(40, 216, (24, 31, 3)).astype(np.uint8)
    out = random_conv(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    k = int(rng.choice((1, 3, 5)))
    weights = rng.normal(0.0, 1.0 / np.sqrt(3 * k * k), size=(3, 3, k, k)).astype(np.float32)
    blend = rng.uniform(0.0, 1.0)
    source = image.astype(np.float64)
    filtered = np.stack([sum(_correlate_reflect(source[..., i], weights[o, i]) for i in range(3))
                         for o in range(3)], -1)
    matched = (filtered - filtered.mean((0, 1))) / filtered.std((0, 1)) * source.std((0, 1)) + source.mean((0, 1))
    expected = np.clip(blend * source + (1 - blend) * matched, 0, 255)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(out - expected).max() <= 1.0
    np.testing.assert_array_equal(out, random_conv(image, np.random.default_rng(seed)))


def test_random_conv_keeps_a_flat_image():
    flat = np.full((9, 7, 3), (30, 140, 200), np.uint8)
    np.testing.assert_array_equal(random_conv(flat, np.random.default_rng(0)), flat)


def test_normalize_and_pad():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (255, 128, 0)
    image[1, 2] = (7, 8, 9)
    padded = normalize_and_pad(image, (32, 64))
    assert padded.shape == (3, 32, 64) and padded.dtype == np.float32
    expected = (image.transpose(2, 0, 1) / 255.0 - IMAGENET_MEAN[:, None, None]) \
        / IMAGENET_STD[:, None, None]
    np.testing.assert_allclose(padded[:, :2, :3], expected, rtol=1e-5, atol=1e-6)
    assert not padded[:, 2:].any() and not padded[:, :, 3:].any()
    with pytest.raises(ValueError, match="does not fit"):
        normalize_and_pad(image, (1, 64))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.lists(st.integers(200, 1000), min_size=1,
                                                             max_size=4), st.integers(300, 1400))
def test_default_buckets_hold_every_resized_image(h, w, min_sizes, max_size):
    buckets = default_pad_buckets(min_sizes, max_size)
    assert all(bh % 32 == 0 and bw % 32 == 0 for bh, bw in buckets)
    for min_size in min_sizes:
        size = keep_ratio_size(h, w, min_size, max_size)
        bucket = buckets[choose_pad_shape(size, buckets)]
        assert size[0] <= bucket[0] and size[1] <= bucket[1]
        if size[0] > buckets[0][0]:  # too tall for the landscape bucket: the portrait one
            assert choose_pad_shape(size, buckets) == 1


def test_choose_pad_shape_picks_the_smallest_that_fits():
    buckets = [(640, 640), (512, 768), (800, 1344), (1344, 800)]
    assert buckets[choose_pad_shape((500, 700), buckets)] == (512, 768)
    assert buckets[choose_pad_shape((600, 600), buckets)] == (640, 640)
    assert buckets[choose_pad_shape((1000, 700), buckets)] == (1344, 800)
    with pytest.raises(ValueError, match="fits none"):
        choose_pad_shape((1400, 100), buckets)


def test_preprocess_matches_torchvision_input():
    """The parity fixture's first image went through torchvision's GeneralizedRCNNTransform."""
    manifest = json.load(open(os.path.join(parity_dir(), "manifest.json")))
    expected = np.load(os.path.join(parity_dir(), "expected.npz"))
    photo = os.path.join(os.path.dirname(parity_dir()), "quokka.jpg")
    image = load_image_rgb(photo)
    if tuple(expected["orig_sizes"][0]) != image.shape[:2]:
        pytest.skip("this parity fixture's first image is not quokka.jpg")
    pad_hw = expected["batch_input"].shape[2:]
    chw, meta = preprocess_image(image, EvalGeometry.make(manifest["config"]["min_size"],
                                                          manifest["config"]["max_size"]), pad_hw)
    assert meta.orig_hw == image.shape[:2]
    assert meta.resized_hw == tuple(expected["image_sizes"][0])
    # Both resize in float (torchvision the normalised image, we the 0..255 one): float32 round-off.
    np.testing.assert_allclose(chw, expected["batch_input"][0], atol=2e-4)


def test_preprocess_shrinks_to_a_fixed_pad_shape():
    image = np.full((600, 400, 3), 200, np.uint8)  # portrait into a landscape export shape
    chw, meta = preprocess_image(image, EvalGeometry.make(320, 512), (320, 512))
    assert chw.shape == (3, 320, 512)
    assert meta.resized_hw == (320, 213)
    assert not chw[:, :, 213:].any() and chw[:, :, :213].all()


@PROPERTY
@given(painted_samples(), st.integers(0, 2 ** 32 - 1))
def test_train_transform_keeps_boxes_on_their_pixels(sample, seed):
    image, boxes, labels = sample
    transform = TrainTransform([96, 128], 200, flip_prob=0.5, color_jitter=0.0, crop_prob=0.5,
                               crop_min_scale=0.5, rotate_degrees=10)
    pad_hw = default_pad_buckets([96, 128], 200)[0 if image.shape[0] <= image.shape[1] else 1]
    chw, out_boxes, out_labels = transform(image, boxes, labels, pad_hw,
                                           np.random.default_rng(seed))
    assert chw.shape == (3,) + tuple(pad_hw) and chw.dtype == np.float32 and len(out_boxes) >= 1
    pixels = np.clip((chw.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255, 0, 255)
    # Rotation slivers thinner than a grey level and resizing blur a painted edge by up to ~2
    # pixels before the final resize, which then magnifies them by at most this factor.
    magnification = max(1.0, 128 / (0.5 * min(image.shape[:2])))
    assert_boxes_follow_pixels(pixels.round().astype(np.uint8), out_boxes, out_labels,
                               tolerance=TOLERANCE * magnification)


def test_train_transform_is_reproducible_from_the_generator():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 50], [70, 20, 110, 80]], np.float32)
    labels = np.array([0, 1], np.int32)
    transform = TrainTransform([64, 96], 160, color_jitter=0.3, crop_prob=0.5, rotate_degrees=5)
    first = transform(image, boxes, labels, (96, 160), np.random.default_rng(5))
    again = transform(image, boxes, labels, (96, 160), np.random.default_rng(5))
    other = transform(image, boxes, labels, (96, 160), np.random.default_rng(6))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@PROPERTY
@given(painted_samples(min_side=64, max_side=200), st.integers(0, 2 ** 32 - 1))
def test_window_transform_with_every_symmetry_keeps_boxes_on_their_pixels(sample, seed):
    image, boxes, labels = sample
    transform = TrainTransform([96], 128, flip_prob=0.5, vflip_prob=0.5, rot90_prob=0.75, window=96,
                               window_scale=(0.8, 1.25))
    chw, out_boxes, out_labels = transform(image, boxes, labels, (96, 96), np.random.default_rng(seed))
    assert chw.shape == (3, 96, 96) and chw.dtype == np.float32
    pixels = np.clip((chw.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255, 0, 255)
    assert_boxes_follow_pixels(pixels.round().astype(np.uint8), out_boxes, out_labels, tolerance=TOLERANCE * 1.25)


def test_symmetries_are_drawn_uniformly():
    """flip 0.5, vflip 0.5, rot90 0.75 reach all 8 symmetries of the square about equally often."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 1] = 255  # asymmetric under every non-trivial symmetry
    transform = TrainTransform([8], 8, flip_prob=0.5, vflip_prob=0.5, rot90_prob=0.75)
    seen = {}
    for seed in range(800):
        chw, _, _ = transform(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int32), (8, 8),
                              np.random.default_rng(seed))
        key = int(np.argmax(chw[0]))
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 8 and min(seen.values()) > 60, seen


def test_the_configuration_wires_hue_inversion_and_random_conv_into_training():
    """--hue_jitter, --invert_lightness_prob and --random_conv_prob reach the transform train.py
    builds, in the documented order (hue turn, lightness inversion, random convolution, then the
    resize): a key dropped by the builder or a step skipped gives other pixels."""
    from src.builder import train_transform
    from src.config import load_config

    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    boxes, labels = np.array([[10, 10, 40, 30]], np.float32), np.array([0], np.int32)
    cfg = load_config(["--config_path=configs/synthetic_cpu.yaml", "--min_size=[48]", "--max_size=64",
                       "--flip_prob=0", "--color_jitter=0", "--hue_jitter=0.2", "--invert_lightness_prob=1",
                       "--random_conv_prob=1", "--crop_prob=0", "--rotate_degrees=0"])
    chw, out_boxes, _ = train_transform(cfg)(image, boxes, labels, (64, 64), np.random.default_rng(7))

    rng = np.random.default_rng(7)
    expected = hue_shift(image, 0.2, rng)
    rng.random()  # the inversion's draw (probability 1)
    expected = invert_lightness(expected)
    rng.random()  # the random convolution's draw (probability 1)
    expected = random_conv(expected, rng)
    expected, expected_boxes = resize(expected, boxes, keep_ratio_size(60, 80, 48, 64), "torchvision")
    np.testing.assert_array_equal(chw, normalize_and_pad(expected, (64, 64)))
    np.testing.assert_array_equal(out_boxes, expected_boxes)
    plain, _, _ = TrainTransform([48], 64, flip_prob=0)(image, boxes, labels, (64, 64), np.random.default_rng(7))
    assert np.abs(plain - chw).mean() > 0.1
