"""src/data/transforms.py: boxes move with pixels under every transform (property tests), sizes,
normalisation, padding, pad buckets, and the inference preprocessing against torchvision."""
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
from src.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainTransform, choose_pad_shape, color_jitter,
                                 default_pad_buckets, hflip, keep_ratio_size, normalize_and_pad, preprocess_image,
                                 random_crop, resize, rotate)

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
@given(painted_samples())
def test_hflip_moves_boxes_and_twice_is_identity(sample):
    image, boxes, labels = sample
    flipped, flipped_boxes = hflip(image, boxes)
    assert_boxes_follow_pixels(flipped, flipped_boxes, labels, tolerance=0)
    back, back_boxes = hflip(flipped, flipped_boxes)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(back_boxes, boxes)


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
    chw, meta = preprocess_image(image, manifest["config"]["min_size"],
                                 manifest["config"]["max_size"], pad_hw)
    assert meta.orig_hw == image.shape[:2]
    assert meta.resized_hw == tuple(expected["image_sizes"][0])
    # Both resize in float (torchvision the normalised image, we the 0..255 one): float32 round-off.
    np.testing.assert_allclose(chw, expected["batch_input"][0], atol=2e-4)


def test_preprocess_shrinks_to_a_fixed_pad_shape():
    image = np.full((600, 400, 3), 200, np.uint8)  # portrait into a landscape export shape
    chw, meta = preprocess_image(image, 320, 512, (320, 512))
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
