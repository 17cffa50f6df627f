"""A torchvision FCOS, converted by tools/convert_weights.py and evaluated by eval.py, gives
torchvision's detections.

The parity fixture holds torchvision's detections (in original image pixels) of its two photos;
here the photos become a COCO validation set on disk, the fixture's weights go through the
converter's command line into a .ckpt, and eval.py (its own process) runs its normal pipeline (decode, resize,
normalise, pad, network, decoder, selection, rescale) with the fixture's settings. Every size
comes from the fixture: the pad shape is its batch's, so points and padding are torchvision's.
Both runtimes of eval.py must give them: MindSpore, and onnxruntime on the ONNX export.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, assert_same_detections, parity_dir, skip_without_runtime
from src.inference.runtime import RUNTIMES


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(parity_dir(), "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return manifest, dict(np.load(os.path.join(parity_dir(), "expected.npz")))


def write_validation_set(folder, arrays, num_classes):
    """The fixture's photos as PNG files (lossless) and a COCO file with its GT -> (img_dir, ann)."""
    img_dir = folder / "images"
    img_dir.mkdir()
    images, annotations = [], []
    for i in range(len(arrays["orig_sizes"])):
        image = arrays[f"images_uint8_{i}"]
        cv2.imwrite(str(img_dir / f"photo_{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": f"photo_{i}.png", "height": image.shape[0],
                       "width": image.shape[1]})
        ratio = np.array(arrays["orig_sizes"][i] / arrays["image_sizes"][i], np.float64)[[1, 0, 1, 0]]
        for box, label in zip(arrays[f"gt_boxes_{i}"] * ratio, arrays[f"gt_labels_{i}"]):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                                "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
    categories = [{"id": c + 1, "name": f"class_{c}"} for c in range(num_classes)]
    ann = folder / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(img_dir), str(ann)


def converted_checkpoint(folder):
    """The fixture's torchvision weights -> .npz (its weights.py) -> .ckpt (the converter's CLI)."""
    npz, ckpt = str(folder / "tv_fcos.npz"), str(folder / "fcos.ckpt")
    subprocess.run([sys.executable, os.path.join(parity_dir(), "..", "weights.py"),
                    os.path.join(parity_dir(), "manifest.json"), npz], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "tools.convert_weights", "--input", npz, "--output", ckpt,
                    "--kind", "fcos"], cwd=ROOT, check=True, capture_output=True)
    return ckpt


def fixture_settings(manifest, pad_hw):
    """The fixture's model and selection settings as entry-point flags."""
    config = manifest["config"]
    return [f"--backbone=resnet{manifest['depth']}", f"--fpn_out_channels={manifest['fpn_out_channels']}",
            f"--class_num={config['num_classes']}", f"--strides={manifest['strides']}",
            f"--point_offset={manifest['point_offset']}", "--point_strides=torchvision",
            f"--min_size=[{config['min_size']}]", f"--max_size={config['max_size']}",
            f"--pad_buckets=[[{pad_hw[0]},{pad_hw[1]}]]",
            f"--score_threshold={config['score_thresh']}", f"--nms_iou_threshold={config['nms_thresh']}",
            f"--detections_per_img={config['detections_per_img']}",
            f"--max_detection_boxes_num={config['topk_candidates']}", "--compile_cache=False"]


@pytest.fixture(scope="module")
def prepared(fixture, tmp_path_factory):
    """(folder, img_dir, ann_file, checkpoint, settings flags) for the fixture's photos."""
    manifest, arrays = fixture
    if any(f"images_uint8_{i}" not in arrays for i in range(len(arrays["orig_sizes"]))):
        pytest.skip("this parity fixture holds no raw images (images_uint8_<i>) to evaluate")
    folder = tmp_path_factory.mktemp("parity_eval")
    img_dir, ann = write_validation_set(folder, arrays, manifest["config"]["num_classes"])
    settings = fixture_settings(manifest, arrays["batch_input"].shape[2:])
    return folder, img_dir, ann, converted_checkpoint(folder), settings


@pytest.fixture(scope="module")
def eval_result(prepared):
    """runtime -> eval_result.json of eval.py run with it on the fixture's photos (run once each)."""
    folder, img_dir, ann, ckpt, settings = prepared
    results = {}

    def run(runtime):
        if runtime not in results:
            out = folder / f"eval_{runtime}"
            done = subprocess.run([sys.executable, "eval.py", *settings, "--batch_size=1", "--num_parallel_workers=1",
                                   f"--ckpt_file={ckpt}", f"--val_img_dir={img_dir}", f"--val_ann_file={ann}",
                                   f"--output_dir={out}", f"--runtime={runtime}"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-2000:]
            with open(out / "eval_result.json", encoding="utf-8") as f:
                results[runtime] = json.load(f)
        return results[runtime]

    return run


def torchvision_detections(arrays, i):
    """Image i's detections by torchvision: boxes (D, 4) x1, y1, x2, y2 in its pixels, scores,
    0-based labels. Ours must match them within the 5 and 2 decimals of the JSON files plus the
    round-off of a 6e-5 input difference (measured on the shared fixture: 5.1e-6 and 0.0097 px at
    most over 200 detections)."""
    return arrays[f"det_boxes_orig_{i}"], arrays[f"det_scores_{i}"], arrays[f"det_labels_{i}"]


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r != "onnxruntime_int8"])  # 8 bits: tests/test_int8.py
def test_eval_of_converted_weights_gives_torchvision_detections(fixture, eval_result, runtime):
    skip_without_runtime(runtime)
    _, arrays = fixture
    detections = eval_result(runtime)["detections"]
    for i in range(len(arrays["orig_sizes"])):
        ours = [d for d in detections if d["image_id"] == i + 1]
        got = ([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ours)], [d["score"] for d in ours],
               [d["category_id"] - 1 for d in ours])
        assert_same_detections(torchvision_detections(arrays, i), got, what=f"image {i}")


def test_predict_of_converted_weights_gives_torchvision_detections(fixture, prepared):
    """predict.py (its own engine, src.inference.predictor) on the same photos: torchvision's
    detections, an external reference rather than eval.py's."""
    _, arrays = fixture
    folder, img_dir, _, ckpt, settings = prepared
    out = folder / "predict"
    done = subprocess.run([sys.executable, "predict.py", *settings, f"--ckpt_file={ckpt}", "--input", img_dir,
                           f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "predictions.json", encoding="utf-8") as f:
        images = {os.path.basename(image["file"]): image for image in json.load(f)["images"]}
    for i in range(len(arrays["orig_sizes"])):
        ours = images[f"photo_{i}.png"]["detections"]
        assert_same_detections(torchvision_detections(arrays, i), ([d["bbox"] for d in ours],
                               [d["score"] for d in ours], [d["label"] for d in ours]), what=f"image {i}")
