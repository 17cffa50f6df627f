"""tools/voc2coco.py on the real DeepForest sample and on broken or special XML, and
tools/make_deepforest.py: the shipped data/deepforest is what the documented command makes."""
import glob
import json
import os
import subprocess
import sys

import src  # noqa: F401
import numpy as np
import pytest

from conftest import ROOT
from src.data.coco import CocoDataset, DatasetError
from tools.make_deepforest import grid_windows, held_out_fold, make_deepforest
from tools.voc2coco import parse_voc_xml, voc_box_to_coco, voc_to_coco

VOC_XML = """<annotation><filename>{filename}</filename>
<size><width>50</width><height>40</height><depth>3</depth></size>
<object><name>cat</name><difficult>0</difficult>
 <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
<object><name>dog</name><difficult>1</difficult>
 <bndbox><xmin>11</xmin><ymin>5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.voc2coco", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_real_sample_counts_sizes_and_classes(deepforest_voc, tmp_path):
    out = tmp_path / "ann.json"
    result = _run_cli("--xml_dir", deepforest_voc, "--img_dir", deepforest_voc,
                      "--output", str(out))
    assert result.returncode == 0, result.stderr
    coco = json.load(open(out))
    assert [c["name"] for c in coco["categories"]] == ["Alive", "Dead", "Tree"]
    per_image = {img["file_name"]: (img["height"], img["width"],
                                    sum(a["image_id"] == img["id"] for a in coco["annotations"]))
                 for img in coco["images"]}
    assert per_image == {"OSBS_029.png": (400, 400, 61), "SOAP_061.png": (400, 400, 37),
                         "2019_YELL_2_541000_4977000_image_crop.png": (1035, 1249, 279)}
    # OSBS_029.xml names OSBS_029.tif; the PNG next to it is found instead.
    dataset = CocoDataset(deepforest_voc, str(out))
    assert dataset.stats["kept_boxes"] == 377 and dataset.stats["clipped"] == 0
    assert dataset.stats["outside"] == dataset.stats["degenerate"] == 0
    first = parse_voc_xml(os.path.join(deepforest_voc, "OSBS_029.xml"))["objects"][0]
    assert first["box"] == (203, 67, 227, 90)
    first_ann = next(a for a in coco["annotations"]
                     if a["image_id"] == per_image_id(coco, "OSBS_029.png"))
    assert first_ann["bbox"] == [202, 66, 25, 24] and first_ann["iscrowd"] == 0


def per_image_id(coco, file_name):
    return next(img["id"] for img in coco["images"] if img["file_name"] == file_name)


def test_merge_classes(deepforest_voc):
    xmls = glob.glob(os.path.join(deepforest_voc, "*.xml"))
    coco = voc_to_coco(xmls, deepforest_voc, classes=["Tree"], merge_classes=True)
    assert coco["categories"] == [{"id": 1, "name": "Tree", "supercategory": "none"}]
    assert len(coco["annotations"]) == 377
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    with pytest.raises(DatasetError, match="'(Alive|Dead)' is not in --classes"):
        voc_to_coco(xmls, deepforest_voc, classes=["Tree"])


def test_coordinates_and_difficult_policies(tmp_path):
    (tmp_path / "a.xml").write_text(VOC_XML.format(filename="a.jpg"))
    (tmp_path / "a.jpg").write_bytes(b"")  # only its existence matters when <size> is given
    xml = [str(tmp_path / "a.xml")]
    assert voc_box_to_coco((1, 1, 10, 20)) == [0, 0, 10, 20]
    crowd = voc_to_coco(xml, str(tmp_path))
    assert [a["bbox"] for a in crowd["annotations"]] == [[0, 0, 10, 20], [10, 4, 40, 36]]
    assert [a["iscrowd"] for a in crowd["annotations"]] == [0, 1]
    keep = voc_to_coco(xml, str(tmp_path), difficult="keep")
    assert [a["iscrowd"] for a in keep["annotations"]] == [0, 0]
    drop = voc_to_coco(xml, str(tmp_path), difficult="drop")
    assert len(drop["annotations"]) == 1
    ordered = voc_to_coco(xml, str(tmp_path), classes=["dog", "cat"])
    assert [a["category_id"] for a in ordered["annotations"]] == [2, 1]
    # A VOC box reaching the last column ends exactly on the image border.
    assert crowd["annotations"][1]["bbox"][0] + crowd["annotations"][1]["bbox"][2] == 50


@pytest.mark.parametrize("content, expected", [
    ("<annotation><object><name>x</name", "not a readable XML file"),
    ("<notvoc/>", "not a VOC annotation"),
    ("<annotation><object><name>x</name><bndbox><xmin>1</xmin></bndbox></object></annotation>",
     "lacks <bndbox/ymin>"),
    ("<annotation><object><name>x</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax>"
     "<ymax>2</ymax></bndbox></object></annotation>", "is not a number"),
])
def test_bad_xml_is_one_clear_line(tmp_path, content, expected):
    bad = tmp_path / "bad.xml"
    bad.write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        parse_voc_xml(str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_a_broken_xml_in_one_line(tmp_path):
    (tmp_path / "broken.xml").write_text("<annotation><size>")
    result = _run_cli("--xml_dir", str(tmp_path), "--img_dir", str(tmp_path), "--output",
                      str(tmp_path / "out.json"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.xml" in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "out.json").exists()


def test_shipped_deepforest_is_reproducible_and_split_cleanly(deepforest_voc, tmp_path):
    rebuilt = make_deepforest(deepforest_voc, str(tmp_path))
    shipped = os.path.join(ROOT, "data", "deepforest")
    for split in ("train", "val"):
        assert rebuilt[split] == json.load(open(os.path.join(shipped, "annotations",
                                                             f"{split}.json")))
        for img in rebuilt[split]["images"]:
            assert os.path.isfile(os.path.join(shipped, split, img["file_name"]))
    assert len(rebuilt["train"]["images"]) == 18 and len(rebuilt["val"]["images"]) == 5
    # The held-out-image split: whole source images, the validation one in no training image.
    for split in ("heldout_train", "heldout_val"):
        assert rebuilt[split] == json.load(open(os.path.join(shipped, "annotations", f"{split}.json")))
        for img in rebuilt[split]["images"]:
            assert os.path.isfile(os.path.join(deepforest_voc, img["file_name"]))
    held_out = {img["file_name"] for img in rebuilt["heldout_val"]["images"]}
    assert held_out == {"OSBS_029.png"}
    assert not held_out & {img["file_name"] for img in rebuilt["heldout_train"]["images"]}
    assert len(rebuilt["heldout_train"]["images"]) == 2
    # No pixel in both splits: in every source image the train tiles end where validation starts.
    train = {img["file_name"]: img["width"] for img in rebuilt["train"]["images"]}
    val = {img["file_name"] for img in rebuilt["val"]["images"]}
    for site in ("YELL", "SOAP_061", "OSBS_029"):
        train_right = max(int(n.split("_x")[1][:4]) + w for n, w in train.items() if n.startswith(site))
        val_left = min(int(n.split("_x")[1][:4]) for n in val if n.startswith(site))
        assert train_right <= val_left, site
    for split in ("train", "val"):
        boxes = np.array([a["bbox"] for a in rebuilt[split]["annotations"]])
        assert (boxes[:, 2:] > 0).all()
    assert os.path.getsize(os.path.join(shipped, "LICENSE")) == \
        os.path.getsize(os.path.join(deepforest_voc, "LICENSE"))


@pytest.mark.parametrize("width,height,max_tile", [(1249, 1035, 420), (400, 400, 420), (421, 90, 420), (7, 5, 2)])
def test_grid_windows_tile_the_image_exactly(width, height, max_tile):
    windows = grid_windows(width, height, max_tile)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in windows:
        assert 0 < x1 - x0 <= max_tile and 0 < y1 - y0 <= max_tile
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()
    assert len(windows) == -(-width // max_tile) * -(-height // max_tile)


def test_held_out_fold_validates_a_large_image_as_tiles(deepforest_voc, tmp_path):
    large = "2019_YELL_2_541000_4977000_image_crop"
    train_dir, val_dir = held_out_fold(deepforest_voc, large, str(tmp_path))
    train = json.load(open(tmp_path / "annotations" / "train.json"))
    val = json.load(open(tmp_path / "annotations" / "val.json"))
    assert train_dir == deepforest_voc and val_dir == str(tmp_path / "val")
    assert {img["file_name"] for img in train["images"]} == {"OSBS_029.png", "SOAP_061.png"}
    assert len(val["images"]) == 9
    for img in val["images"]:
        assert max(img["height"], img["width"]) <= 420
        tile = CocoDataset(val_dir, str(tmp_path / "annotations" / "val.json")).load_image(img["id"])
        assert tile.shape[:2] == (img["height"], img["width"])
    # every crown is in some tile, whole or as an ignore region where a tile edge cuts it
    assert sum(not a["iscrowd"] for a in val["annotations"]) >= 279 - 2 * sum(a["iscrowd"] for a in val["annotations"])
    assert sum(img["height"] * img["width"] for img in val["images"]) == 1249 * 1035
    # a small held-out image stays whole, referring to the source PNG
    train_dir, val_dir = held_out_fold(deepforest_voc, "OSBS_029", str(tmp_path / "osbs"))
    val = json.load(open(tmp_path / "osbs" / "annotations" / "val.json"))
    assert val_dir == deepforest_voc and [img["file_name"] for img in val["images"]] == ["OSBS_029.png"]
    assert len(val["annotations"]) == 61
