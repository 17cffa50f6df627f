"""src/data/pipeline.py: GT padding, pad buckets, epoch plans and sharding, and the real
mindspore.dataset train/eval pipelines on synthetic images and on data/deepforest."""
import json
import os
import shutil

import src  # noqa: F401
import numpy as np
import pytest

from conftest import ROOT
from src.builder import build_eval_dataset, build_train_dataset
from src.data.coco import CocoDataset
from src.geometry import EvalGeometry, resolve_pad_buckets
from src.data.pipeline import (PAD_IMAGE_ID, create_eval_dataset, create_train_dataset, group_by_bucket, pad_targets, plan_eval_batches, plan_train_epoch)
from src.data.transforms import TrainTransform
from src.config import load_config
from tools.synthetic import make_synthetic_coco

DEEPFOREST = os.path.join(ROOT, "data", "deepforest")
AUGMENT = dict(min_sizes=[96, 128], max_size=160, flip_prob=0.5, color_jitter=0.2, crop_prob=0.5,
               crop_min_scale=0.6, rotate_degrees=5.0)
NO_AUGMENT = dict(flip_prob=0.0, color_jitter=0.0, crop_prob=0.0, rotate_degrees=0.0)
DATASET_ARGS = dict(pad_buckets=[], max_gt_boxes=8, skip_empty_images=True, seed=11)


def _train_dataset(img_dir, ann_file, augment=None, **kwargs):
    """create_train_dataset with AUGMENT (updated by ``augment``) and DATASET_ARGS (by kwargs)."""
    transform = TrainTransform(**{**AUGMENT, **(augment or {})})
    return create_train_dataset(img_dir, ann_file, transform, **{**DATASET_ARGS, **kwargs})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """12 landscape (96x128) and 7 portrait (128x96) synthetic images in one COCO file."""
    root = tmp_path_factory.mktemp("mixed")
    merged = None
    for sub, (h, w), n, seed in (("land", (96, 128), 12, 0), ("port", (128, 96), 7, 1)):
        data = json.load(open(make_synthetic_coco(str(root / sub), n, h, w, seed)))
        offset = 0 if merged is None else len(merged["images"])
        for img in data["images"]:
            img["file_name"] = f"{sub}/images/{img['file_name']}"
            img["id"] += offset
        for ann in data["annotations"]:
            ann["image_id"] += offset
            ann["id"] += 1000 * offset
        if merged is None:
            merged = data
        else:
            merged["images"] += data["images"]
            merged["annotations"] += data["annotations"]
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(merged))
    return str(root), str(ann_file)


def test_pad_targets_keeps_the_largest_in_order():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 1, 1], [0, 0, 5, 5]], np.float32)
    labels = np.array([1, 2, 3, 4], np.int32)
    out_boxes, out_labels, mask = pad_targets(boxes, labels, 2)
    np.testing.assert_array_equal(out_boxes, boxes[[1, 3]])
    np.testing.assert_array_equal(out_labels, [2, 4])
    assert mask.all()
    out_boxes, out_labels, mask = pad_targets(boxes, labels, 6)
    assert out_boxes.shape == (6, 4) and out_labels.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, [True] * 4 + [False] * 2)
    assert not out_boxes[4:].any() and not out_labels[4:].any()
    np.testing.assert_array_equal(pad_targets(boxes[:0], labels[:0], 3)[2], [False] * 3)


def test_buckets_group_by_orientation(mixed):
    img_dir, ann_file = mixed
    coco = CocoDataset(img_dir, ann_file)
    buckets = resolve_pad_buckets([], [96, 128], 160)
    assert buckets == [(128, 160), (160, 128)]
    geometry = EvalGeometry.make(128, 160, buckets)
    _, members = group_by_bucket(coco, coco.image_ids, geometry.pad_shape, geometry.buckets)
    assert [len(m) for m in members] == [12, 7]
    assert all(coco.image_info(i)["height"] == 128 for i in members[1])
    with pytest.raises(ValueError, match="fits none of the pad buckets"):
        group_by_bucket(coco, coco.image_ids, EvalGeometry.make(128, 160, [(128, 160)]).pad_shape, [(128, 160)])
    # per-image padding: each image's own size rounded up to 32, the buckets those that occur
    per_image = EvalGeometry.make(96, 160, per_image=True)
    shapes, members = group_by_bucket(coco, coco.image_ids, per_image.pad_shape)
    assert shapes == sorted(shapes) and sum(map(len, members)) == len(coco.image_ids)
    for shape, ids in zip(shapes, members):
        for image_id in ids:
            info = coco.image_info(image_id)
            resized = per_image.resized_size((info["height"], info["width"]))
            assert shape == tuple(-(-side // 32) * 32 for side in resized)
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve_pad_buckets([[100, 128]], [96], 160)


def test_train_plans_shard_disjointly_and_reshuffle_per_epoch():
    members = [list(range(0, 23)), list(range(100, 111))]
    plans = [plan_train_epoch(members, 2, seed=5, epoch=0, rank=r, group_size=2) for r in (0, 1)]
    # global batches of 2 x 2 images: 5 + 2 of them, each rank trains on its half of every one
    assert [len(p) for p in plans] == [7, 7]
    seen = [i for plan in plans for _, ids in plan for i in ids]
    assert len(seen) == len(set(seen)) == 28  # no image twice, most of the 34
    for (bucket0, ids0), (bucket1, ids1) in zip(*plans):
        assert bucket0 == bucket1  # every step has one pad shape on all ranks
        assert all((i >= 100) == (bucket0 == 1) for i in ids0 + ids1)
    # Two ranks of batch 2 see, step by step, what one process of batch 4 sees.
    single = plan_train_epoch(members, 4, seed=5, epoch=0)
    assert single == [(b, ids0 + ids1) for (b, ids0), (_, ids1) in zip(*plans)]
    assert plans[0] == plan_train_epoch(members, 2, seed=5, epoch=0, rank=0, group_size=2)
    assert plans[0] != plan_train_epoch(members, 2, seed=5, epoch=1, rank=0, group_size=2)
    ordered = plan_train_epoch(members, 2, seed=5, epoch=3, shuffle=False)
    assert ordered[0] == (0, [0, 1]) and ordered[-1] == (1, [108, 109])


def test_eval_plans_cover_every_image_once_and_flag_repeats():
    members = [list(range(1, 6)), [10, 11, 12]]
    plans = [plan_eval_batches(members, 2, rank=r, group_size=2) for r in (0, 1)]
    assert len(plans[0]) == len(plans[1]) == 3  # 5 batches, rank 1 gets a whole repeat batch
    real = [i for plan in plans for _, ids, flags in plan for i, f in zip(ids, flags) if f]
    assert sorted(real) == [1, 2, 3, 4, 5, 10, 11, 12]
    assert (0, [5, 5], [True, False]) in plans[0] + plans[1]
    assert (1, [12, 12], [True, False]) in plans[0] + plans[1]
    assert not any(plans[1][-1][2])


def _collect(dataset, epochs=1):
    iterator = dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    return [[tuple(col.copy() for col in batch) for batch in iterator] for _ in range(epochs)]


def test_train_dataset_shapes_buckets_and_epochs(mixed):
    img_dir, ann_file = mixed
    dataset, info = _train_dataset(img_dir, ann_file, batch_size=3, num_parallel_workers=2)
    assert info.num_images == 19 and info.batches_per_epoch == 4 + 2
    assert info.label_to_cat_id == [1, 2, 3] and info.class_names[0] == "rectangle"
    assert dataset.get_dataset_size() == 6
    epochs = _collect(dataset, epochs=2)
    shapes = set()
    for batches in epochs:
        assert len(batches) == 6
        for images, boxes, labels, mask in batches:
            assert images.dtype == np.float32 and boxes.dtype == np.float32
            assert labels.dtype == np.int32 and mask.dtype == np.bool_
            assert images.shape[:2] == (3, 3) and boxes.shape == (3, 8, 4)
            assert labels.shape == mask.shape == (3, 8)
            shapes.add(images.shape[2:])
            assert mask.any(axis=1).all()  # empty images are skipped, crops never empty a sample
            h, w = images.shape[2:]
            real = boxes[mask]
            assert (real[:, 2] > real[:, 0]).all() and (real[:, 3] > real[:, 1]).all()
            assert (real[:, [0, 2]] <= w).all() and (real[:, [1, 3]] <= h).all()
            assert (labels[mask] < 3).all() and not boxes[~mask].any()
    assert shapes == {(128, 160), (160, 128)}
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])  # a new plan and new augmentation
    third = _collect(dataset)[0]  # a new iterator continues with the next epoch
    assert not any(np.array_equal(third[0][0], b[0]) for e in epochs for b in e)
    # The same seed reproduces the same batches.
    again, _ = _train_dataset(img_dir, ann_file, batch_size=3, num_parallel_workers=1)
    for a, b in zip(epochs[0][0], _collect(again)[0][0]):
        np.testing.assert_array_equal(a, b)


def test_train_dataset_shards_see_disjoint_images(mixed):
    img_dir, ann_file = mixed
    per_rank = []
    for rank in (0, 1):
        dataset, info = _train_dataset(img_dir, ann_file, {**NO_AUGMENT, "min_sizes": [128]}, batch_size=2,
                                       rank=rank, group_size=2, num_parallel_workers=1)
        assert info.batches_per_epoch == 4  # global batches of 4: 3 landscape, 1 portrait
        # Without augmentation an image's first GT row identifies it.
        per_rank.append({tuple(b[0]) for _, boxes, _, _ in _collect(dataset)[0] for b in boxes})
    assert len(per_rank[0]) == len(per_rank[1]) == 8
    assert not per_rank[0] & per_rank[1]


def test_unreadable_images_are_skipped_and_counted(mixed, tmp_path):
    img_dir, ann_file = mixed
    broken = tmp_path / "broken"
    shutil.copytree(img_dir, broken)
    os.remove(broken / "port" / "images" / "000001.jpg")
    (broken / "land" / "images" / "000002.jpg").write_bytes(b"not an image at all")
    dataset, info = _train_dataset(str(broken), str(broken / "annotations.json"), batch_size=2,
                                   num_parallel_workers=2)
    assert info.skipped_missing == 1 and info.num_images == 18
    assert info.batches_per_epoch == 6 + 3  # every image is in the epoch's plan
    batches = _collect(dataset)[0]
    assert len(batches) == 9 and all(b[0].shape[0] == 2 for b in batches)
    assert len(info.failed_images) == 1
    assert info.failed_images.paths() == [str(broken / "land" / "images" / "000002.jpg")]


def test_eval_dataset_keeps_every_image(mixed):
    img_dir, ann_file = mixed
    dataset, info = create_eval_dataset(img_dir, ann_file, batch_size=4,
                                        geometry=EvalGeometry.make(96, 160), num_parallel_workers=2)
    assert info.num_images == 19 and info.batches == 3 + 2
    seen = []
    for images, ids, sizes, orig in _collect(dataset)[0]:
        assert images.dtype == np.float32 and images.shape[:2] == (4, 3)
        assert ids.dtype == sizes.dtype == orig.dtype == np.int32
        assert ids.shape == (4,) and sizes.shape == orig.shape == (4, 2)
        for image, image_id, (h, w), (oh, ow) in zip(images, ids, sizes, orig):
            assert images.shape[2:] == ((96, 160) if oh < ow else (160, 96))
            assert (h, w) == ((96, 128) if oh < ow else (128, 96))  # the first min_size
            assert not image[:, h:].any() and not image[:, :, w:].any()
        seen += [int(i) for i in ids if i != PAD_IMAGE_ID]
    assert sorted(seen) == list(range(1, 20))


def test_deepforest_train_and_eval():
    img = os.path.join(DEEPFOREST, "{}")
    ann = os.path.join(DEEPFOREST, "annotations", "{}.json")
    dataset, info = _train_dataset(img.format("train"), ann.format("train"), {"min_sizes": [320], "max_size": 352},
                                   batch_size=2, num_parallel_workers=1, pad_buckets=[[352, 352]],
                                   max_gt_boxes=100)
    assert info.num_images == 18 and info.class_names == ["Tree"]
    assert info.cleaning["crowd"] > 0 and info.cleaning["kept_boxes"] == 421
    images, boxes, labels, mask = _collect(dataset)[0][0]
    assert images.shape == (2, 3, 352, 352) and boxes.shape == (2, 100, 4)
    assert mask.sum() > 10 and (labels[mask] == 0).all()
    dataset, info = create_eval_dataset(img.format("val"), ann.format("val"), batch_size=2,
                                        geometry=EvalGeometry.make(320, 352, [[352, 352]]), num_parallel_workers=1)
    assert info.num_images == 5
    batches = _collect(dataset)[0]
    assert len(batches) == 3 and all(b[0].shape == (2, 3, 352, 352) for b in batches)
    sizes = {tuple(s) for b in batches for s in b[2]}
    assert sizes == {(345, 320), (352, 140)}  # 345x320 tiles unscaled, 400x160 strips shrunk to fit 352


def test_window_mode_samples_by_area_with_distinct_windows():
    """The held-out-image split's training orthophotos in window mode: one pad shape, copies per
    image by area, every copy its own window, reproducible from the seed."""
    voc = os.path.join(ROOT, "data", "deepforest_voc")
    ann = os.path.join(DEEPFOREST, "annotations", "heldout_train.json")
    augment = {**NO_AUGMENT, "min_sizes": [400], "max_size": 400, "window": 100, "window_scale": (1.0, 1.0)}
    dataset, info = _train_dataset(voc, ann, augment, batch_size=2, num_parallel_workers=1, max_gt_boxes=100)
    coco = CocoDataset(voc, ann)
    copies = [round(coco.image_info(i)["height"] * coco.image_info(i)["width"] / 100 ** 2) for i in coco.image_ids]
    assert info.num_images == 2 and info.batches_per_epoch == sum(copies) // 2
    assert info.pad_shapes == [(128, 128)]  # the window rounded up to size_divisor
    planned = [i for _, ids in info.plan(0) for i in ids]
    assert sorted(set(planned)) == sorted(coco.image_ids)
    assert max(planned.count(i) for i in coco.image_ids) > 1
    batches = _collect(dataset)[0]
    images = [image for batch in batches for image in batch[0]]
    assert all(image.shape == (3, 128, 128) for image in images)
    assert len({image.tobytes() for image in images}) == len(images)  # each copy is another window
    assert all(not image[:, 100:].any() and not image[:, :, 100:].any() for image in images)
    again, _ = _train_dataset(voc, ann, augment, batch_size=2, num_parallel_workers=2, max_gt_boxes=100)
    for a, b in zip(batches, _collect(again)[0]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("config", ["deepforest_cpu", "deepforest_tiles_cpu"])
def test_quick_start_configurations_build_their_data(config, monkeypatch):
    """Both quick-start configurations load and give training batches of their pad shape and
    every validation image (the quick start itself is measured, not run in CI)."""
    cfg = load_config([f"--config_path={os.path.join(ROOT, 'configs', config + '.yaml')}",
                       "--num_parallel_workers=1"])
    monkeypatch.chdir(ROOT)  # the configurations' data paths are relative to the repository
    dataset, info = build_train_dataset(cfg)
    images, boxes, labels, mask = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert images.shape[0] == cfg.batch_size and tuple(images.shape[2:]) == info.pad_shapes[0]
    assert mask.any() and (labels[mask] == 0).all()
    _, eval_info = build_eval_dataset(cfg)
    assert eval_info.num_images == len(json.load(open(cfg.val_ann_file))["images"])
