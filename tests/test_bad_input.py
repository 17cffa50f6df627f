"""Bad input: unusable files end a run with one line naming the file or key (exit code 2, no
traceback); damaged images are skipped and counted, never used; convertible images are converted;
bad boxes are dropped, clipped or left out of scoring by the cleaning policy, with exact counts."""
import json
import logging
import math
import os
import re
import subprocess
import sys

import cv2
import mindspore as ms
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import export
from src.builder import build_inference, build_loss, build_model
from src.data.coco import CocoDataset, DatasetError, clean_box, load_image_rgb, read_coco_json
from src.geometry import EvalGeometry, PadBucketError, resolve_pad_buckets
from src.data.pipeline import PAD_IMAGE_ID, create_eval_dataset
from src.engine.checkpoint import (fitting_params, load_checkpoint_file, read_training_checkpoint,
                                   save_checkpoint_atomic)
from src.evaluation.coco_eval import coco_evaluate, load_coco
from src.engine.train_step import FCOSWithLoss, TrainStep, build_optimizer
from src.engine.trainer import Trainer
from src.config import ConfigError, load_config
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
              "--min_size=[64]", "--max_size=64", "--num_parallel_workers=1", "--batch_size=2"]
DEEPFOREST_VAL = os.path.join(ROOT, "data", "deepforest", "val")

# The messy set: 8 synthetic 64x64 images of which 2 is a truncated JPEG, 3 an empty file, 4 is
# missing, 5 a 16-bit grey PNG, 6 an RGBA PNG, 7 has crowd boxes only and 8 no annotation at all.
TRUNCATED, EMPTY, MISSING, GREY16, RGBA, CROWD_ONLY, UNANNOTATED = 2, 3, 4, 5, 6, 7, 8
LOADABLE = [1, GREY16, RGBA, CROWD_ONLY, UNANNOTATED]
# Annotations added to image 1, with the cleaning rule each must meet.
BAD_BOXES = [
    ([float("nan"), 10, 5, 5], 1, "nonfinite"),
    ([10, 10, float("inf"), 5], 1, "nonfinite"),
    ([10, 10, -5, 5], 1, "degenerate"),
    ([10, 10, 5, 0], 1, "degenerate"),
    ([70, 10, 5, 5], 1, "outside"),
    ([10, 10, 5], 1, "malformed"),
    ([10, 10, 5, 5], 99, "unknown_category"),
    ([50, 50, 30, 30], 1, "clipped"),
]


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, and a last line 'error: ...' holding every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def _replace_image(img_dir, data, image_id, file_name, convert):
    """Rewrite an image of the set in another format (convert: BGR uint8 -> pixels to write)."""
    info = next(img for img in data["images"] if img["id"] == image_id)
    old = os.path.join(img_dir, info["file_name"])
    assert cv2.imwrite(os.path.join(img_dir, file_name), convert(cv2.imread(old)))
    os.remove(old)
    info["file_name"] = file_name


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    data = read_coco_json(make_synthetic_coco(str(root), 8, 64, 64, seed=5, max_objects=2))
    img_dir = root / "images"
    truncated = img_dir / "000002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-400])
    (img_dir / "000003.jpg").write_bytes(b"")
    os.remove(img_dir / "000004.jpg")
    _replace_image(img_dir, data, GREY16, "000005.png",
                   lambda bgr: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    _replace_image(img_dir, data, RGBA, "000006.png", lambda bgr: cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    anns = [a for a in data["annotations"] if a["image_id"] != UNANNOTATED]
    for ann in anns:
        ann["iscrowd"] = int(ann["image_id"] == CROWD_ONLY)
    next_id = max(a["id"] for a in anns) + 1
    for offset, (bbox, category_id, _) in enumerate(BAD_BOXES):
        anns.append({"id": next_id + offset, "image_id": 1, "category_id": category_id, "bbox": bbox})
    data["annotations"] = anns
    return {"img_dir": str(img_dir), "ann": write_json(root / "messy.json", data), "data": data,
            "crowd": sum(a["image_id"] == CROWD_ONLY for a in anns)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of the small synthetic-set FCOS (3 classes) and a train.py one of 4 classes."""
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(MODEL_ARGS)
    ms.set_seed(0)
    network = build_model(cfg)
    path = str(folder / "fcos.ckpt")
    ms.save_checkpoint(network, path)
    other = load_config(MODEL_ARGS + ["--class_num=4"])
    other_network = build_model(other)
    step = TrainStep(FCOSWithLoss(other_network, build_loss(other, other_network)),
                     build_optimizer(other_network.trainable_params(), np.full(4, 0.01, np.float32), 0.9, 1e-4))
    train_ckpt = save_checkpoint_atomic(step, str(folder / "fcos-1_2.ckpt"),
                                        {"epoch": 1, "step_in_epoch": 0, "global_step": 2})
    return {"path": path, "network": network, "train_4_classes": train_ckpt, "cfg": cfg}


# ---- configuration values ----

@pytest.mark.parametrize("flag, message", [
    ("--min_size=[]", "--min_size=[]: must be a non-empty list of values > 0"),
    ("--min_size=[64,0]", "--min_size=[64, 0]: must be a non-empty list of values > 0"),
    ("--batch_size=0", "--batch_size=0: must be > 0"),
    ("--size_divisor=0", "--size_divisor=0: must be > 0"),
    ("--crop_min_scale=0", "--crop_min_scale=0.0: must be in (0, 1]"),
    ("--nms_iou_threshold=1.5", "--nms_iou_threshold=1.5: must be in [0, 1]"),
    ("--momentum=1", "--momentum=1.0: must be in [0, 1)"),
])
def test_out_of_range_values_name_the_key(flag, message):
    with pytest.raises(ConfigError) as err:
        load_config(MODEL_ARGS + [flag])
    assert str(err.value) == message


@pytest.mark.parametrize("flag, message", [
    ("--strides=[8,16]", "model configuration: strides must be the first 3 to 5 of [8, 16, 32, 64, 128]"),
    ("--fpn_out_channels=48", "model configuration: GroupNorm: 48 channels do not split into 32 groups"),
    ("--limit_range=[[0,64]]", "model configuration: limit_range has 1 levels, strides 5"),
])
def test_keys_that_make_no_network_name_themselves(flag, message):
    cfg = load_config(MODEL_ARGS + [flag])
    with pytest.raises(ConfigError) as err:
        build_loss(cfg, build_model(cfg))
    assert str(err.value).startswith(message)


# ---- images ----

@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A textured image encoded as JPEG, progressive JPEG and PNG: {name: bytes}."""
    folder = tmp_path_factory.mktemp("encoded")
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur((rng.random((48, 64, 3)) * 255).astype(np.uint8), (5, 5), 0)
    params = {"jpg": [], "progressive.jpg": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "png": []}
    out = {}
    for name, flags in params.items():
        path = str(folder / f"full.{name}")
        assert cv2.imwrite(path, image, flags)
        out[name] = open(path, "rb").read()
    return out


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["jpg", "progressive.jpg", "png"]), cut=st.floats(0.0, 0.999))
def test_a_truncated_image_never_decodes(encoded, tmp_path_factory, name, cut):
    data = encoded[name]
    keep = int(len(data) * cut)  # every strict prefix, down to nothing at all
    path = os.path.join(str(tmp_path_factory.getbasetemp()), f"cut.{name}")
    with open(path, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(DatasetError) as err:
        load_image_rgb(path)
    expected = "empty image file (0 bytes)" if keep == 0 else "cannot decode image file"
    assert expected in str(err.value) and path in str(err.value)


def test_whole_encoded_images_decode(encoded, tmp_path):
    for name, data in encoded.items():
        (tmp_path / f"x.{name}").write_bytes(data + b"\0" * 16)  # bytes after the end are harmless
        assert load_image_rgb(str(tmp_path / f"x.{name}")).shape == (48, 64, 3)


# ---- annotation files ----

@pytest.mark.parametrize("change, expected", [
    (lambda d: d["images"][0].update(height=0), "image 1 (000001.jpg) has size 0x64, not a positive one"),
    (lambda d: d["annotations"].append([1, 2, 3]), "has no image_id or category_id"),
    (lambda d: d["annotations"][0].pop("category_id"), "annotation 0 has no image_id or category_id"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "duplicate category ids [1]"),
])
def test_unusable_annotation_files_name_the_file(tmp_path, change, expected):
    data = read_coco_json(make_synthetic_coco(str(tmp_path), 2, 64, 64, seed=1))
    change(data)
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DatasetError) as err:
        CocoDataset(str(tmp_path / "images"), path)
    assert expected in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_cleaning_counts_on_the_messy_set(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="fcos"):
        coco = CocoDataset(messy["img_dir"], messy["ann"], skip_empty=True)
    expected = {kind: sum(k == kind for _, _, k in BAD_BOXES) for _, _, kind in BAD_BOXES}
    expected.update(crowd=messy["crowd"], images_without_boxes=2, skipped_empty_images=2)
    assert {k: coco.stats[k] for k in expected} == expected
    assert coco.image_ids == [1, 2, 3, 4, 5, 6]
    boxes, labels = coco.targets(1)
    assert np.isfinite(boxes).all() and (boxes[:, :2] < boxes[:, 2:]).all() and boxes.max() <= 64
    assert [50, 50, 64, 64] in boxes.tolist()  # the clipped one
    assert "messy.json: 2 annotations with NaN/inf coordinates dropped" in caplog.messages


@settings(max_examples=300, deadline=None)
@given(bbox=st.lists(st.one_of(st.floats(-100, 200), st.sampled_from([math.nan, math.inf, -math.inf])),
                     min_size=4, max_size=4),
       width=st.integers(1, 120), height=st.integers(1, 120), crowd=st.booleans())
def test_cleaned_boxes_are_the_visible_part_or_dropped(bbox, width, height, crowd):
    box, kind, clipped = clean_box({"bbox": bbox, "iscrowd": int(crowd)}, width, height)
    x, y, w, h = bbox
    if not all(math.isfinite(v) for v in bbox):
        assert kind == "nonfinite"
    elif w <= 0 or h <= 0:
        assert kind == "degenerate"
    elif min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
        assert kind == "outside"
    elif crowd:
        assert kind == "crowd"
    else:
        assert kind is None
        assert box == (max(x, 0), max(y, 0), min(x + w, width), min(y + h, height))
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        assert clipped == (box != (x, y, x + w, y + h))
    if kind is not None:
        assert box is None


def test_scoring_ground_truth_leaves_out_what_cannot_match(tmp_path, caplog):
    """Perfect detections of the usable boxes score AP 1 although the file has every fault: ids 0
    and repeated (COCOeval reads id 0 as 'no match'), no area, no iscrowd, unmatchable boxes."""
    good = [[10, 10, 20, 20], [40, 30, 15, 25], [5, 40, 30, 20]]
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": b} for i, b in zip([0, 0, 5], good)]
    anns += [{"id": 9, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 1.0, "iscrowd": 0}
             for bbox, _, kind in BAD_BOXES if kind in ("nonfinite", "degenerate", "outside", "malformed")]
    path = write_json(tmp_path / "gt.json", {"images": [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}],
                                             "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    with caplog.at_level(logging.WARNING, logger="fcos"):
        coco = load_coco(path)
    assert "gt.json: 6 annotations with a missing, NaN/inf or empty box, or one outside its image, are not " \
           "scored" in caplog.messages
    assert sorted(coco.anns) == [1, 2, 3]
    results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9} for b in good]
    metrics = coco_evaluate(coco, results, str(tmp_path), image_ids=[1])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "eval_result.json").read_text())["num_images"] == 1


# ---- pipelines ----

def test_eval_pipeline_skips_and_counts_unreadable_images(messy):
    dataset, info = create_eval_dataset(messy["img_dir"], messy["ann"], batch_size=2,
                                        geometry=EvalGeometry.make(64, 64), num_parallel_workers=2)
    assert info.skipped_missing == 1 and info.num_images == 7
    seen = []
    for images, ids, sizes, _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        for image, image_id, (h, w) in zip(images, ids, sizes):
            if image_id == PAD_IMAGE_ID:
                continue
            seen.append(int(image_id))
            assert (h, w) == (64, 64) and np.isfinite(image).all() and image.std() > 0.1
    assert sorted(seen) == LOADABLE
    failed = info.failed_images
    assert len(failed) == 2
    assert sorted(os.path.basename(p) for p in failed.paths()) == ["000002.jpg", "000003.jpg"]


def test_eval_pipeline_without_any_image_file(messy, tmp_path):
    with pytest.raises(DatasetError, match=r"none of the 8 image files of .*messy.json is in .*nowhere"):
        create_eval_dataset(str(tmp_path / "nowhere"), messy["ann"], batch_size=2,
                            geometry=EvalGeometry.make(64, 64), num_parallel_workers=1)


@pytest.mark.parametrize("buckets, expected", [
    ([[64, 64, 64]], "expected [[h, w], ...]"),
    ([64, 64], "expected [[h, w], ...]"),
    ([[64, 80]], "64x80 is not a positive multiple of 32"),
])
def test_malformed_pad_buckets(buckets, expected):
    with pytest.raises(PadBucketError) as err:
        resolve_pad_buckets(buckets, [64], 64)
    assert expected in str(err.value)


# ---- checkpoints ----

def test_checkpoint_checks_before_loading(ckpt, tmp_path):
    own = ckpt["network"].parameters_dict()
    params = load_checkpoint_file(ckpt["path"])
    assert set(fitting_params(own, params, "f.ckpt")) == set(own)
    poisoned = dict(params, **{"fpn.output.0.weight": ms.Parameter(
        ms.Tensor(np.full(own["fpn.output.0.weight"].shape, np.nan, np.float32)), name="fpn.output.0.weight")})
    with pytest.raises(ValueError, match=r"f.ckpt holds NaN/inf values in fpn.output.0.weight"):
        fitting_params(own, poisoned, "f.ckpt")
    extra = dict(params, **{"backbone.layer1.9.conv1.weight": params["backbone.conv1.weight"]})
    with pytest.raises(ValueError, match=r"holds 1 parameters the network lacks, e.g. backbone.layer1.9.conv1"):
        fitting_params(own, extra, "f.ckpt")
    # Only the backbone required: a head of another shape is left out, not loaded and not fatal.
    reshaped = dict(params, **{"head.cls_logits.weight": ms.Parameter(
        ms.Tensor(np.zeros((7, 32, 3, 3), np.float32)), name="head.cls_logits.weight")})
    selected = fitting_params(own, reshaped, "f.ckpt", ("backbone.",))
    assert "head.cls_logits.weight" not in selected and "head.cls_logits.bias" in selected
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_checkpoint_file(str(empty))


def _train_step(cfg, schedule):
    network = build_model(cfg)
    return TrainStep(FCOSWithLoss(network, build_loss(cfg, network)),
                     build_optimizer(network.trainable_params(), schedule, 0.9, 1e-4))


def test_resume_keeps_the_schedule_of_the_configuration(ckpt, tmp_path):
    """--resume with another --epochs (schedule length) or --base_lr: weights, momenta and the
    optimiser step come from the checkpoint, the learning rates from this run's configuration."""
    old = _train_step(ckpt["cfg"], np.full(4, 0.01, np.float32))
    path = save_checkpoint_atomic(old, str(tmp_path / "fcos-1_3.ckpt"), {"epoch": 1, "step_in_epoch": 1,
                                                                          "global_step": 3})
    schedule = np.linspace(0.02, 0.001, 8).astype(np.float32)
    new = _train_step(ckpt["cfg"], schedule)
    trainer = Trainer(new, steps_per_epoch=2, epochs=4, global_batch=2, lr_schedule=schedule,
                      output_dir=str(tmp_path))
    trainer.resume_from(read_training_checkpoint(path))
    assert (trainer.epoch, trainer.step_in_epoch, trainer.global_step) == (1, 1, 3)
    saved = {p.name: p.asnumpy() for p in old.get_parameters()}
    for param in new.get_parameters():
        expected = schedule if param.name == "learning_rate" else saved[param.name]
        np.testing.assert_array_equal(param.asnumpy(), expected, err_msg=param.name)


def test_resume_on_another_global_batch(ckpt, tmp_path):
    """Saved with global batch 2 (3 steps an epoch); resumed with 4 (2 steps an epoch): the end of
    epoch 1 continues at step 1 x 2 of this run's schedule, a checkpoint from inside an epoch is
    refused in one line, and the same global batch keeps the saved step."""
    schedule = np.linspace(0.02, 0.001, 8).astype(np.float32)

    def saved(name, step_in_epoch, global_step):
        old = _train_step(ckpt["cfg"], np.full(6, 0.01, np.float32))
        meta = {"epoch": 1, "step_in_epoch": step_in_epoch, "global_step": global_step, "global_batch": 2}
        return read_training_checkpoint(save_checkpoint_atomic(old, str(tmp_path / name), meta))

    def resumed(checkpoint, global_batch):
        trainer = Trainer(_train_step(ckpt["cfg"], schedule), steps_per_epoch=8 // global_batch, epochs=2,
                          global_batch=global_batch, lr_schedule=schedule, output_dir=str(tmp_path))
        trainer.resume_from(checkpoint)
        return trainer

    end_of_epoch = saved("fcos-1_3.ckpt", 0, 3)
    trainer = resumed(end_of_epoch, 4)
    assert (trainer.epoch, trainer.step_in_epoch, trainer.global_step) == (1, 0, 2)
    assert int(trainer.train_step.optimizer.global_step.asnumpy()[0]) == 2  # indexes this run's lr schedule
    assert resumed(end_of_epoch, 2).global_step == 3
    with pytest.raises(ValueError, match="saved inside epoch 2 with global batch 2; this run's is 4: resume "
                                         "from an end-of-epoch checkpoint, or keep devices x batch_size = 2"):
        resumed(saved("fcos-1_4.ckpt", 1, 4), 4)


# ---- entry points: one line, exit code 2 ----

@pytest.fixture(scope="module")
def bad_files(messy, ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_files")
    raw = open(ckpt["path"], "rb").read()
    (folder / "truncated.ckpt").write_bytes(raw[:len(raw) // 2])
    (folder / "list.json").write_text("[1, 2, 3]")
    (folder / "not_json.json").write_text("images: none")
    data = read_coco_json(messy["ann"])
    data["images"].append(dict(data["images"][0]))
    write_json(folder / "duplicate_ids.json", data)
    undecodable = folder / "undecodable"  # 3 of 4 images
    ann = make_synthetic_coco(str(undecodable), 4, 64, 64, seed=2)
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        (undecodable / "images" / name).write_bytes(b"not a jpeg")
    unreadable = folder / "unreadable"  # every image
    unreadable_ann = make_synthetic_coco(str(unreadable), 2, 64, 64, seed=2)
    for name in ("000001.jpg", "000002.jpg"):
        (unreadable / "images" / name).write_bytes(b"\xff\xd8\xff\xe0")
    cfg = load_config(MODEL_ARGS + ["--export_height=64", "--export_width=64", f"--ckpt_file={ckpt['path']}"])
    write_json(folder / "fcos.json", export.model_export_info(cfg, build_inference(cfg, build_model(cfg)), "fcos.mindir"))
    write_json(folder / "preprocess_info.json", {"input_hw": [64, 64], "num_images": 0, "num_skipped": 0, "images": []})
    return {"dir": str(folder), "undecodable": (str(undecodable / "images"), ann),
            "unreadable": (str(unreadable / "images"), unreadable_ann)}


CASES = {
    "eval, images fitting no pad bucket": (
        "eval.py", lambda m, c, b: ["--config_path=configs/deepforest_tiles_cpu.yaml", "--min_size=[480]",
                                    "--max_size=800", "--pad_buckets=[[512,512]]", f"--ckpt_file={c['path']}",
                                    "--num_parallel_workers=1"],
        ["--pad_buckets: a resized image of 517x480 fits none of the pad buckets [[512, 512]]",
         "(min_size 480, max_size 800): data/deepforest/val/"]),
    "eval, truncated checkpoint": (
        "eval.py", lambda m, c, b: MODEL_ARGS + [f"--ckpt_file={b['dir']}/truncated.ckpt",
                                                f"--val_img_dir={m['img_dir']}", f"--val_ann_file={m['ann']}"],
        ["--ckpt_file: checkpoint", "truncated.ckpt cannot be read"]),
    "eval, checkpoint of another class count": (
        "eval.py", lambda m, c, b: MODEL_ARGS + ["--class_num=5", f"--ckpt_file={c['path']}",
                                                f"--val_img_dir={m['img_dir']}", f"--val_ann_file={m['ann']}"],
        ["--ckpt_file:", "does not fit the network: head.cls_logits.weight is (3, 32, 3, 3) there, "
                         "(5, 32, 3, 3) here"]),
    "eval, not a single readable image": (
        "eval.py", lambda m, c, b: MODEL_ARGS + [f"--ckpt_file={c['path']}", f"--val_img_dir={b['unreadable'][0]}",
                                                f"--val_ann_file={b['unreadable'][1]}"],
        ["--val_img_dir: none of the images of", "unreadable/annotations.json could be read"]),
    "train, annotation file that is a list": (
        "train.py", lambda m, c, b: MODEL_ARGS + [f"--train_img_dir={m['img_dir']}",
                                                 f"--train_ann_file={b['dir']}/list.json"],
        ["--train_ann_file: not a COCO annotation file", "list.json"]),
    "train, annotation file that is not JSON": (
        "train.py", lambda m, c, b: MODEL_ARGS + [f"--train_img_dir={m['img_dir']}",
                                                 f"--train_ann_file={b['dir']}/not_json.json"],
        ["--train_ann_file: annotation file is not valid JSON", "not_json.json"]),
    "train, no loadable image left for a batch (2 loading workers)": (
        "train.py", lambda m, c, b: MODEL_ARGS + ["--num_parallel_workers=2", "--epochs=1",
                                                 f"--train_img_dir={b['undecodable'][0]}",
                                                 f"--train_ann_file={b['undecodable'][1]}"],
        ["--train_img_dir: no loadable image left to fill a batch of pad bucket (64, 64); failed:",
         "000001.jpg", "000002.jpg", "000003.jpg"]),
    "train, resume from a checkpoint of another class count": (
        "train.py", lambda m, c, b: MODEL_ARGS + [f"--train_img_dir={m['img_dir']}", f"--train_ann_file={m['ann']}",
                                                 f"--resume={c['train_4_classes']}"],
        ["--resume:", "fcos-1_2.ckpt does not fit the network: head.cls_logits.weight is (4, 32, 3, 3) there, "
                      "(3, 32, 3, 3) here"]),
    "preprocess, duplicate image ids": (
        "preprocess.py", lambda m, c, b: MODEL_ARGS + [f"--val_img_dir={m['img_dir']}",
                                                      f"--val_ann_file={b['dir']}/duplicate_ids.json",
                                                      "--export_height=64", "--export_width=64"],
        ["--val_ann_file: duplicate image ids [1] in annotation file:", "duplicate_ids.json"]),
    "postprocess, annotation file that is a list": (
        "postprocess.py", lambda m, c, b: MODEL_ARGS + [f"--result_dir={b['dir']}",
                                                       f"--info_file={b['dir']}/preprocess_info.json",
                                                       f"--export_info={b['dir']}/fcos.json",
                                                       f"--val_ann_file={b['dir']}/list.json"],
        ["--val_ann_file: not a COCO annotation file", "list.json"]),
    "postprocess, an info file that preprocess.py did not write": (
        "postprocess.py", lambda m, c, b: MODEL_ARGS + [f"--result_dir={b['dir']}", f"--info_file={m['ann']}",
                                                       f"--export_info={b['dir']}/fcos.json",
                                                       f"--val_ann_file={m['ann']}"],
        ["--info_file:", "is not a preprocess.py preprocess_info.json (it lacks 'input_hw')"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_input_ends_with_one_line(case, messy, ckpt, bad_files, tmp_path):
    script, make_args, fragments = CASES[case]
    result = run(script, *make_args(messy, ckpt, bad_files), f"--output_dir={tmp_path}")
    assert_one_line_error(result, *fragments)


# ---- entry points: damaged images skipped and counted, the others used ----

def test_eval_scores_the_images_it_could_read(messy, ckpt, tmp_path):
    result = run("eval.py", *MODEL_ARGS, "--num_parallel_workers=2", f"--ckpt_file={ckpt['path']}",
                 f"--val_img_dir={messy['img_dir']}", f"--val_ann_file={messy['ann']}", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "eval.log").read_text()
    assert "1 evaluation images skipped: file not found (e.g. " in log and "000004.jpg" in log
    assert re.search(r"COCO metrics cover the 5 images run; not run: 1 missing image files, 2 undecodable "
                     r"\['\S+000002.jpg', '\S+000003.jpg'\]", log), log
    saved = json.loads((tmp_path / "eval_result.json").read_text())
    assert saved["num_images"] == 5
    assert {d["image_id"] for d in saved["detections"]} <= set(LOADABLE)


def test_train_replaces_undecodable_images_and_says_so(messy, tmp_path):
    result = run("train.py", *MODEL_ARGS, "--batch_size=1", "--epochs=1", "--log_interval=1",
                 f"--train_img_dir={messy['img_dir']}", f"--train_ann_file={messy['ann']}", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    # 8 images: 2 without a valid box, 1 missing; the truncated and the empty one are replaced.
    assert "messy.json: 2 images without a valid box skipped" in log
    assert "1 training images skipped: file not found" in log
    assert "5 training images, 5 batches of 1 per epoch" in log
    assert re.search(r"after epoch 1: 2 images so far could not be decoded and were replaced in their batches "
                     r"by other images, e.g. \['\S+000002.jpg', '\S+000003.jpg'\]", log), log
    assert "training finished: 5 steps, 0 skipped as non-finite" in log


def test_predict_and_preprocess_skip_damaged_images(messy, ckpt, tmp_path):
    result = run("predict.py", *MODEL_ARGS, f"--ckpt_file={ckpt['path']}", "--input", messy["img_dir"],
                 f"--output_dir={tmp_path / 'pred'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(os.path.basename(i["file"]) for i in predictions["images"]) == [
        "000001.jpg", "000005.png", "000006.png", "000007.jpg", "000008.jpg"]
    skipped = {os.path.basename(s["file"]): s["reason"] for s in predictions["skipped"]}
    assert sorted(skipped) == ["000002.jpg", "000003.jpg"]
    assert skipped["000002.jpg"].startswith("cannot decode image file")
    assert skipped["000003.jpg"].startswith("empty image file (0 bytes)")

    result = run("preprocess.py", *MODEL_ARGS, f"--val_img_dir={messy['img_dir']}", f"--val_ann_file={messy['ann']}",
                 "--export_height=64", "--export_width=64", f"--output_dir={tmp_path / 'pre'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((tmp_path / "pre" / "preprocess_info.json").read_text())
    assert sorted(e["image_id"] for e in info["images"]) == LOADABLE
    reasons = {s["image_id"]: s["reason"] for s in info["skipped"]}
    assert sorted(reasons) == [TRUNCATED, EMPTY, MISSING] and info["num_skipped"] == 3
    assert reasons[MISSING].startswith("image file not found")

    # A second run that stops half-way (here: a bin it must write is a folder) leaves no info file
    # that would pair its new bins with the first run's sizes. Mutation caught: info written only at the end.
    os.remove(tmp_path / "pre" / "images" / "000001.bin")
    os.mkdir(tmp_path / "pre" / "images" / "000001.bin")
    result = run("preprocess.py", *MODEL_ARGS, f"--val_img_dir={messy['img_dir']}", f"--val_ann_file={messy['ann']}",
                 "--export_height=64", "--export_width=64", f"--output_dir={tmp_path / 'pre'}")
    assert result.returncode != 0
    assert not (tmp_path / "pre" / "preprocess_info.json").exists()


def test_resume_from_a_weights_only_checkpoint_names_the_alternatives(ckpt):
    with pytest.raises(ValueError, match="is not a train.py checkpoint .* --pretrained_backbone or --ckpt_file"):
        read_training_checkpoint(ckpt["path"])
    assert read_training_checkpoint(ckpt["train_4_classes"]).epoch == 1
