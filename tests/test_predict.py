"""predict.py (detections as eval.py computes them, drawn and listed, in MindSpore and in onnxruntime)
and src/utils/visualize.py."""
import json
import logging
import os
import subprocess
import sys

import cv2
import mindspore as ms
import numpy as np
import pytest

from conftest import assert_same_detections, skip_without_runtime

import predict
from src.builder import build_model
from src.inference.runtime import RUNTIMES
from src.config import ConfigError, load_config
from src.utils.visualize import caption, draw_detections, label_colour, save_image
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
              "--min_size=[96]", "--max_size=128"]


def command(script, *args):
    """An entry point in its own process (each sets the device, possible only before running)."""
    return subprocess.run([sys.executable, script, *MODEL_ARGS, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A randomly initialised checkpoint (its scores sit just above the 0.05 threshold, so every image
    gets detections) and three landscape synthetic images with annotations."""
    root = tmp_path_factory.mktemp("predict")
    ms.set_seed(0)
    ckpt = str(root / "fcos.ckpt")
    ms.save_checkpoint(build_model(load_config(MODEL_ARGS)), ckpt)
    ann_file = make_synthetic_coco(str(root / "set"), 3, 96, 128, seed=2)
    return {"root": root, "ckpt": ckpt, "ann_file": ann_file, "img_dir": root / "set" / "images"}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def eval_detections(data, tmp_path_factory):
    """eval.py's detections (MindSpore) of the three images."""
    out = tmp_path_factory.mktemp("eval")
    result = command("eval.py", f"--ckpt_file={data['ckpt']}", f"--val_img_dir={data['img_dir']}",
                     f"--val_ann_file={data['ann_file']}", f"--output_dir={out}", "--batch_size=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_json(out / "eval_result.json")["detections"]


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "onnxruntime_int8"])  # int8: tests/test_int8.py
def test_predictions_equal_eval_detections(data, eval_detections, runtime, tmp_path):
    skip_without_runtime(runtime)
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(data["img_dir"]),
                     f"--val_ann_file={data['ann_file']}", f"--output_dir={tmp_path / 'pred'}", f"--runtime={runtime}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    predictions = read_json(tmp_path / "pred" / "predictions.json")
    eval_dets = eval_detections
    ids = {img["file_name"]: img["id"] for img in read_json(data["ann_file"])["images"]}
    names = [c["name"] for c in read_json(data["ann_file"])["categories"]]
    assert len(predictions["images"]) == 3 and predictions["skipped"] == []
    for image in predictions["images"]:
        expected = [d for d in eval_dets if d["image_id"] == ids[os.path.basename(image["file"])]]
        got = image["detections"]
        assert len(got) == len(expected) > 0
        for det, ref in zip(got, expected):
            assert det["category_id"] == ref["category_id"] and det["class_name"] == names[det["label"]]
            # both rounded to 5 decimals: float round-off between runtimes may flip the last one
            assert det["score"] == pytest.approx(ref["score"], abs=1.5e-5)
            x1, y1, x2, y2 = det["bbox"]
            assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(ref["bbox"], abs=0.02)
        drawn = cv2.imread(image["output"])
        assert drawn.shape == (96, 128, 3)



def test_eval_in_pynative_mode_gives_the_graph_modes_detections(data, eval_detections, tmp_path):
    """eval.py --mode=PYNATIVE (eager, for debugging) runs the same network: the same detections."""
    result = command("eval.py", f"--ckpt_file={data['ckpt']}", f"--val_img_dir={data['img_dir']}",
                     f"--val_ann_file={data['ann_file']}", f"--output_dir={tmp_path}", "--batch_size=1",
                     "--mode=PYNATIVE")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 3 images in mindspore (PYNATIVE mode)" in result.stdout + result.stderr
    eager = read_json(tmp_path / "eval_result.json")["detections"]
    assert len(eager) == len(eval_detections) > 0
    for det, ref in zip(eager, eval_detections):
        assert (det["image_id"], det["category_id"]) == (ref["image_id"], ref["category_id"])
        assert det["score"] == pytest.approx(ref["score"], abs=2e-5)
        assert det["bbox"] == pytest.approx(ref["bbox"], abs=0.02)


def mirrored_set(data, folder):
    """The three images and their left-right mirrors (100 wide in a 128-wide pad, so a flip of the
    padded canvas instead of the image would show) -> (img_dir, ann_file, {mirror id: original id})."""
    img_dir = folder / "images"
    img_dir.mkdir(parents=True)
    coco = read_json(data["ann_file"])
    images, pairs = [], {}
    for entry in coco["images"]:
        image = cv2.imread(str(data["img_dir"] / entry["file_name"]))[:, :100]
        for mirrored in (False, True):
            name = ("mirror_" if mirrored else "") + os.path.splitext(entry["file_name"])[0] + ".png"  # lossless
            cv2.imwrite(str(img_dir / name), image[:, ::-1] if mirrored else image)
            images.append({"id": len(images) + 1, "file_name": name, "height": 96, "width": 100})
        pairs[len(images)] = len(images) - 1
    ann = folder / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": coco["categories"]}))
    return img_dir, ann, pairs


def assert_mirror_invariant(detections, pairs, width):
    """Test-time views closed under the left-right flip (hflip, dihedral) see an image and its
    mirror through the same forward passes: the mirror's detections are the image's, mirrored
    (a view mapped back with the wrong width, or about the pad, breaks this)."""
    def as_arrays(detections, mirrored):
        boxes = [[width - x - w, y, w, h] if mirrored else [x, y, w, h] for x, y, w, h in
                 (d["bbox"] for d in detections)]
        return boxes, [d["score"] for d in detections], [d["category_id"] for d in detections]

    for mirror, original in pairs.items():
        ours = [d for d in detections if d["image_id"] == original]
        assert ours, f"image {original} has no detections to compare"
        assert_same_detections(as_arrays(ours, False),
                               as_arrays([d for d in detections if d["image_id"] == mirror], True),
                               what=f"image {original} and its mirror")


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["hflip", "dihedral"])
def test_test_time_augmentation_in_eval_and_predict(data, tta, tmp_path):
    """--tta: the fused detections of an image's mirror are its own, mirrored (eval.py); with dihedral
    the landscape images' turned views run at the transposed pad shape; with hflip predict.py fuses
    the same views into the same detections as eval.py, inside each image."""
    img_dir, ann, pairs = mirrored_set(data, tmp_path / "set")
    result = command("eval.py", f"--ckpt_file={data['ckpt']}", f"--val_img_dir={img_dir}",
                     f"--val_ann_file={ann}", f"--output_dir={tmp_path / 'eval'}", "--batch_size=2", f"--tta={tta}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fused = read_json(tmp_path / "eval" / "eval_result.json")["detections"]
    assert_mirror_invariant(fused, pairs, width=100)
    if tta == "dihedral":
        assert "2 graphs ready" in result.stdout + result.stderr  # 96x128 and its transpose
        return
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(img_dir),
                     f"--val_ann_file={ann}", f"--output_dir={tmp_path / 'pred'}", f"--tta={tta}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = read_json(tmp_path / "pred" / "predictions.json")
    assert predictions["tta"] == tta
    ids = {img["file_name"]: img["id"] for img in read_json(ann)["images"]}
    for image in predictions["images"]:
        expected = [d for d in fused if d["image_id"] == ids[os.path.basename(image["file"])]]
        assert len(image["detections"]) == len(expected) > 0
        for det, ref in zip(image["detections"], expected):
            # both rounded to 5 decimals: float round-off between runtimes may flip the last one
            assert det["score"] == pytest.approx(ref["score"], abs=1.5e-5)
            x1, y1, x2, y2 = det["bbox"]
            assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(ref["bbox"], abs=0.02)
            assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 96


def test_predict_outputs_skips_and_class_names(data, tmp_path):
    other = tmp_path / "other"
    os.makedirs(other)
    first = sorted(os.listdir(data["img_dir"]))[0]
    portrait = cv2.imread(str(data["img_dir"] / first)).transpose(1, 0, 2)
    cv2.imwrite(str(other / first), portrait)  # same name as an image of the first folder
    (other / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(data["img_dir"]), str(other),
                     "--class_names=box,blob,wedge", "--draw_score_threshold=0.0", f"--output_dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = read_json(out / "predictions.json")
    assert [os.path.basename(s["file"]) for s in predictions["skipped"]] == ["broken.png"]
    assert "cannot decode image file" in predictions["skipped"][0]["reason"]
    outputs = [os.path.basename(i["output"]) for i in predictions["images"]]
    stem = os.path.splitext(first)[0]
    assert len(outputs) == 4 and f"{stem}_pred.png" in outputs and f"{stem}_pred_1.png" in outputs
    portrait_entry = predictions["images"][outputs.index(f"{stem}_pred_1.png")]
    assert (portrait_entry["height"], portrait_entry["width"]) == (128, 96)
    for image in predictions["images"]:
        dets = image["detections"]
        assert dets and all(d["class_name"] == ["box", "blob", "wedge"][d["label"]] for d in dets)
        assert all("category_id" not in d for d in dets)
        assert all(0 <= d["bbox"][0] <= d["bbox"][2] <= image["width"] for d in dets)
        drawn = cv2.imread(image["output"])
        original = cv2.imread(image["file"])
        assert drawn.shape == original.shape and np.any(drawn != original)


def test_predict_fails_when_no_image_is_readable(data, tmp_path):
    """An undecodable file and an image no pad bucket holds (a portrait with landscape buckets only)
    are each skipped with the reason; with nothing left, one line and exit code 2."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    portrait = tmp_path / "portrait.png"
    first = sorted(os.listdir(data["img_dir"]))[0]
    cv2.imwrite(str(portrait), cv2.imread(str(data["img_dir"] / first)).transpose(1, 0, 2))
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(bad), str(portrait),
                     "--pad_buckets=[[96,128]]", f"--output_dir={tmp_path / 'pred'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --input: none of the 2 images could be read"
    skipped = read_json(tmp_path / "pred" / "predictions.json")["skipped"]
    assert [os.path.basename(s["file"]) for s in skipped] == ["bad.jpg", "portrait.png"]
    assert "cannot decode image file" in skipped[0]["reason"]
    assert "a resized image of 128x96 fits none of the pad buckets [[96, 128]]" in skipped[1]["reason"]


def test_class_names_come_from_the_annotations_and_a_count_mismatch_warns(data, tmp_path, caplog):
    cfg = load_config(MODEL_ARGS + [f"--val_ann_file={data['ann_file']}"])
    names, label_to_cat_id = predict.class_info(cfg, None)
    categories = read_json(data["ann_file"])["categories"]
    assert names == [c["name"] for c in categories] and label_to_cat_id == [c["id"] for c in categories]
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="fcos"):
        assert predict.class_info(cfg, ["a", "b"])[0] == ["a", "b"]
    assert "2 class names for --class_num=3" in caplog.text
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="^--val_ann_file: "):
        predict.class_info(load_config(MODEL_ARGS + [f"--val_ann_file={broken}"]), None)


@pytest.mark.parametrize("args, message", [
    ([], "--input: required, but empty"),
    (["--input", "/no/such/image.jpg"], "--input: no such file or folder: /no/such/image.jpg"),
    (["--input", ROOT + "/src/inference"], "--input: no image files"),
    (["--input", "x.jpg", "--draw_score_threshold=high"], "--draw_score_threshold: expected a number"),
])
def test_predict_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--ckpt_file=unused.ckpt", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_draw_detections_draws_boxes_and_captions(tmp_path):
    image = np.full((120, 160, 3), 40, np.uint8)
    boxes = np.array([[20.0, 50.0, 100.0, 110.0], [0.0, 0.0, 30.0, 30.0]], np.float32)
    drawn = draw_detections(image, boxes, np.array([0.9, 0.4]), np.array([2, 0]), ["a", "b", "c"])
    assert np.array_equal(image, np.full((120, 160, 3), 40, np.uint8)), "the input is not modified"
    assert tuple(drawn[110, 60]) == label_colour(2), "bottom edge of the first box"
    assert tuple(drawn[80, 20]) == label_colour(2), "left edge of the first box"
    assert tuple(drawn[80, 60]) == (40, 40, 40), "inside a box stays untouched"
    # The first caption sits above its box, filled with the box colour.
    assert np.sum(np.all(drawn[35:50, 20:100] == label_colour(2), axis=-1)) > 50
    assert np.array_equal(draw_detections(image, boxes[:0], np.zeros(0), np.zeros(0, int)), image)
    assert caption(2, 0.876, ["a", "b", "c"]) == "c 0.88"
    assert caption(5, 0.5, ["a"]) == "5 0.50" and caption(1, 0.5) == "1 0.50"
    assert len({label_colour(i) for i in range(20)}) == 20
    path = str(tmp_path / "drawn.png")
    save_image(path, drawn)
    assert os.listdir(tmp_path) == ["drawn.png"]
    np.testing.assert_array_equal(cv2.imread(path)[:, :, ::-1], drawn)
