"""tools/synthetic.py: deterministic, valid COCO, boxes tight around the drawn shapes."""
import filecmp
import json
import os
import subprocess
import sys

import src  # noqa: F401
import numpy as np

from conftest import ROOT
from src.data.coco import CocoDataset, load_image_rgb
from tools.synthetic import CLASSES, make_synthetic_coco


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = make_synthetic_coco(str(tmp_path / "a"), 4, 96, 128, seed=3)
    b = make_synthetic_coco(str(tmp_path / "b"), 4, 96, 128, seed=3)
    c = make_synthetic_coco(str(tmp_path / "c"), 4, 96, 128, seed=4)
    assert filecmp.cmp(a, b, shallow=False) and not filecmp.cmp(a, c, shallow=False)
    for name in os.listdir(tmp_path / "a" / "images"):
        assert filecmp.cmp(tmp_path / "a" / "images" / name, tmp_path / "b" / "images" / name,
                           shallow=False)


def test_valid_coco_with_objects_of_the_documented_sizes(tmp_path):
    ann_file = make_synthetic_coco(str(tmp_path), 30, 256, 256, seed=0)
    data = json.load(open(ann_file))
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=31)[1:]
    assert counts.min() >= 1 and counts.max() <= 6
    sides = np.array([a["bbox"][2:] for a in data["annotations"]])
    assert sides.min() >= 12 and sides.max() <= 120
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    dataset = CocoDataset(str(tmp_path / "images"), ann_file)
    assert dataset.stats["kept_boxes"] == len(data["annotations"])
    assert dataset.stats["clipped"] == dataset.stats["outside"] == 0


def test_boxes_are_tight_around_the_shape_pixels(tmp_path):
    """The last shape of an image is drawn on top, so all of it is visible. In a lossless PNG its
    pixels share one exact colour (of its class's hue), and they span exactly its box."""
    ann_file = make_synthetic_coco(str(tmp_path), 12, 160, 200, seed=1, ext="png")
    data = json.load(open(ann_file))
    for img in data["images"]:
        last = [a for a in data["annotations"] if a["image_id"] == img["id"]][-1]
        image = load_image_rgb(str(tmp_path / "images" / img["file_name"]))
        x, y, w, h = last["bbox"]
        colours, counts = np.unique(image[y:y + h, x:x + w].reshape(-1, 3), axis=0,
                                    return_counts=True)
        colour = colours[counts.argmax()]
        assert counts.max() > 0.4 * w * h  # a triangle fills half its box, the noise no pixel
        assert colour.argmax() == last["category_id"] - 1  # red, green, blue by class
        ys, xs = np.nonzero((image == colour).all(axis=-1))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.synthetic", "--out", str(tmp_path),
                             "--num_images", "3", "--size", "64", "80", "--seed", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.load(open(tmp_path / "annotations.json"))
    assert [(i["height"], i["width"]) for i in data["images"]] == [(64, 80)] * 3
    assert sorted(os.listdir(tmp_path / "images")) == ["000001.jpg", "000002.jpg", "000003.jpg"]
