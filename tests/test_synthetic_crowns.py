"""src/data/synthetic_crowns.py and --synthetic_crowns: procedural tree-crown stands, how the
training pipeline mixes them with real windows, and the preview tool."""
import math
import os

import src  # noqa: F401
import cv2
import numpy as np
import pytest

from conftest import ROOT
from src.builder import build_train_dataset
from src.data.coco import CocoDataset
from src.data.pipeline import GENERATED_ID, create_train_dataset, window_samples
from src.data.synthetic_crowns import RADIUS_RANGE, CrownStands, make_stand
from src.data.transforms import TrainTransform
from src.config import ConfigError, load_config
from tools.synthetic import make_synthetic_coco
from tools.synthetic_crowns import preview

VOC = os.path.join(ROOT, "data", "deepforest_voc")
HELDOUT_TRAIN = os.path.join(ROOT, "data", "deepforest", "annotations", "heldout_train.json")
WINDOW = dict(min_sizes=[128], max_size=128, flip_prob=0.5, vflip_prob=0.5, rot90_prob=0.5, color_jitter=0.3,
              window=96, window_scale=(0.8, 1.25))


def _stands(fraction, transform):
    """The plug-in train.py makes for --synthetic_crowns (src.builder.crown_stands)."""
    return CrownStands(fraction, math.ceil(transform.window / min(transform.window_scale)))


def test_stands_are_reproducible_varied_and_boxed_within_the_image():
    stands = [make_stand(np.random.default_rng([0, i]), 200) for i in range(12)]
    again, boxes_again = make_stand(np.random.default_rng([0, 3]), 200)
    np.testing.assert_array_equal(again, stands[3][0])
    np.testing.assert_array_equal(boxes_again, stands[3][1])
    assert len({image.tobytes() for image, _ in stands}) == 12
    boxes = np.concatenate([b for _, b in stands])
    assert all(image.shape == (200, 200, 3) and image.dtype == np.uint8 for image, _ in stands)
    assert boxes.dtype == np.float32 and len(boxes) >= 12 * 3
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 200).all()
    sides = boxes[:, 2:] - boxes[:, :2]
    assert sides.min() >= 4 and sides.max() <= 2 * 1.5 * RADIUS_RANGE[1]
    # a stand is more than flat colour: crowns carry texture and shading
    assert all(cv2.Laplacian(image, cv2.CV_32F).std() > 1.0 for image, _ in stands)


def test_boxes_bound_distinct_objects():
    """Inside an isolated crown's box the image differs from the ground around it: the mean colour
    inside the box's central half is further from the box's surrounding ring than the ring varies
    around the box, for most isolated crowns."""
    separated, total = 0, 0
    for i in range(8):
        image, boxes = make_stand(np.random.default_rng([5, i]), 256)
        image = image.astype(np.float32)
        for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            others = np.delete(boxes, j, 0)
            near = ((others[:, 0] < x2 + 8) & (others[:, 2] > x1 - 8) & (others[:, 1] < y2 + 8) & (others[:, 3] > y1 - 8))
            if near.any() or x1 < 8 or y1 < 8 or x2 > 248 or y2 > 248:
                continue
            w, h = x2 - x1, y2 - y1
            centre = image[y1 + h // 4:y2 - h // 4, x1 + w // 4:x2 - w // 4].reshape(-1, 3).mean(0)
            ring = np.concatenate([image[y1 - 6:y1 - 2, x1:x2].reshape(-1, 3), image[y2 + 2:y2 + 6, x1:x2].reshape(-1, 3),
                                   image[y1:y2, x1 - 6:x1 - 2].reshape(-1, 3), image[y1:y2, x2 + 2:x2 + 6].reshape(-1, 3)])
            total += 1
            separated += np.linalg.norm(centre - ring.mean(0)) > 0.5 * ring.std(0).mean()
    assert total >= 5 and separated >= 0.7 * total


@pytest.mark.slow
def test_window_training_mixes_in_a_new_set_of_stands_every_epoch():
    transform = TrainTransform(**WINDOW)
    args = dict(batch_size=4, pad_buckets=[], max_gt_boxes=100, skip_empty_images=True, num_parallel_workers=2,
                seed=4)
    coco = CocoDataset(VOC, HELDOUT_TRAIN)
    real = len(window_samples(coco, coco.image_ids, 96))
    dataset, info = create_train_dataset(VOC, HELDOUT_TRAIN, transform, generated=_stands(0.75, transform), **args)
    assert info.generated_per_epoch == 3 * real and info.batches_per_epoch == 4 * real // 4
    plan = [[i for _, ids in info.plan(epoch) for i in ids] for epoch in (0, 1)]
    assert plan[0].count(GENERATED_ID) >= 3 * real - 3 and set(plan[0]) - {GENERATED_ID} == set(coco.image_ids)
    iterator = dataset.create_tuple_iterator(num_epochs=2, output_numpy=True)
    epochs = [[tuple(c.copy() for c in batch) for batch in iterator] for _ in range(2)]
    for epoch, batches in zip(plan, epochs):
        flat = [b for batch in batches for b in zip(*batch)]
        stands = [sample for image_id, sample in zip(epoch, flat) if image_id == GENERATED_ID]
        assert all((labels[mask] == 0).all() for _, _, labels, mask in stands)
        assert sum(mask.any() for *_, mask in stands) >= 0.8 * len(stands)  # a window may miss every crown
        assert len({images.tobytes() for images, *_ in stands}) == len(stands)
    first = {b[0].tobytes() for batch in epochs[0] for b in zip(*batch)}
    assert not first & {b[0].tobytes() for batch in epochs[1] for b in zip(*batch)}
    # reproducible from the seed with another worker count
    again, _ = create_train_dataset(VOC, HELDOUT_TRAIN, transform, generated=_stands(0.75, transform),
                                    **{**args, "num_parallel_workers": 1})
    for a, b in zip(epochs[0], again.create_tuple_iterator(num_epochs=1, output_numpy=True)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_a_broken_real_image_is_replaced_by_a_real_one(tmp_path):
    make_synthetic_coco(str(tmp_path), 6, 128, 128, seed=2, max_objects=2)
    (tmp_path / "images" / "000002.jpg").write_bytes(b"not an image")
    transform = TrainTransform(**{**WINDOW, "window": 64})
    dataset, info = create_train_dataset(str(tmp_path / "images"), str(tmp_path / "annotations.json"), transform,
                                         generated=_stands(0.5, transform), batch_size=4, pad_buckets=[], max_gt_boxes=60,
                                         skip_empty_images=True, num_parallel_workers=1, seed=1)
    batches = list(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert len(batches) == info.batches_per_epoch == (24 + 24) // 4
    assert info.failed_images.paths() == [str(tmp_path / "images" / "000002.jpg")]


def test_stands_need_window_mode_and_one_class(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = [f"--config_path={os.path.join(ROOT, 'configs', 'deepforest_cpu.yaml')}", "--synthetic_crowns=0.5"]
    with pytest.raises(ConfigError, match="--synthetic_crowns=0.5: .*window mode"):
        build_train_dataset(load_config([*base, "--train_window=0"]))
    with pytest.raises(ConfigError, match="--synthetic_crowns=0.5: .*class_num 1, now 2"):
        build_train_dataset(load_config([*base, "--class_num=2"]))
    with pytest.raises(ConfigError, match="synthetic_crowns"):
        load_config([*base[:1], "--synthetic_crowns=1.0"])


def test_preview_draws_the_boxes(tmp_path):
    grid = preview(1, 2, 96, seed=3)
    assert grid.shape == (96, 192, 3)
    _, boxes = make_stand(np.random.default_rng([3, 0]), 96)
    x1, y1 = boxes[0, :2].astype(int)
    assert tuple(grid[y1, x1 + 1]) == (255, 0, 0)
