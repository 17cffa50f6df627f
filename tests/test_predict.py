"""predict.py (detections as eval.py computes them, drawn and listed, in MindSpore and in onnxruntime)
and src/utils/visualize.py."""
import json
import os
import subprocess
import sys

import cv2
import mindspore as ms
import numpy as np
import pytest

from conftest import skip_without_runtime

import predict
from src.builder import build_model
from src.inference.runtime import RUNTIMES
from src.config import load_config
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



def test_test_time_augmentation_in_eval_and_predict(data, eval_detections, tmp_path):
    """--tta=dihedral: eval.py and predict.py fuse the same 8 views (landscape images, so the turned
    views run at the transposed pad shape) into the same detections, inside each image."""
    tta = ["--tta=dihedral"]
    result = command("eval.py", f"--ckpt_file={data['ckpt']}", f"--val_img_dir={data['img_dir']}",
                     f"--val_ann_file={data['ann_file']}", f"--output_dir={tmp_path / 'eval'}", "--batch_size=2", *tta)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 graphs ready" in result.stdout + result.stderr  # 96x128 and its transpose
    fused = read_json(tmp_path / "eval" / "eval_result.json")["detections"]
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(data["img_dir"]),
                     f"--val_ann_file={data['ann_file']}", f"--output_dir={tmp_path / 'pred'}", *tta)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predictions = read_json(tmp_path / "pred" / "predictions.json")
    assert predictions["tta"] == "dihedral"
    ids = {img["file_name"]: img["id"] for img in read_json(data["ann_file"])["images"]}
    for image in predictions["images"]:
        expected = [d for d in fused if d["image_id"] == ids[os.path.basename(image["file"])]]
        single = [d for d in eval_detections if d["image_id"] == ids[os.path.basename(image["file"])]]
        assert len(image["detections"]) == len(expected) > 0
        assert [d["score"] for d in expected] != [d["score"] for d in single]
        for det, ref in zip(image["detections"], expected):
            # both rounded to 5 decimals: float round-off between runtimes may flip the last one
            assert det["score"] == pytest.approx(ref["score"], abs=1.5e-5)
            x1, y1, x2, y2 = det["bbox"]
            assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(ref["bbox"], abs=0.02)
            assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 96

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
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    result = command("predict.py", f"--ckpt_file={data['ckpt']}", "--input", str(bad),
                     f"--output_dir={tmp_path / 'pred'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --input: none of the 1 images could be read"


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
