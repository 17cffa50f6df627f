"""src/data/coco.py: label maps, the cleaning policy with exact counts, image decoding, errors."""
import json
import logging
import os

import src  # noqa: F401  (sets the CPU oneDNN cap before anything imports mindspore)
import cv2
import numpy as np
import pytest

from src.data.coco import CocoDataset, DatasetError, label_maps, load_image_rgb

# The 80 category ids of COCO 2017, scattered over 1..90.
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def test_label_maps_round_trip_with_gaps():
    shuffled = [{"id": i, "name": f"c{i}"} for i in reversed(COCO_IDS)]
    label_to_cat_id, cat_id_to_label, names = label_maps(shuffled)
    assert label_to_cat_id == COCO_IDS
    assert sorted(cat_id_to_label.values()) == list(range(80))
    assert all(label_to_cat_id[cat_id_to_label[c]] == c for c in COCO_IDS)
    assert cat_id_to_label[90] == 79 and cat_id_to_label[13] == 11
    assert names[11] == "c13"


@pytest.fixture()
def crafted(tmp_path):
    """An annotation file with every bad case; image 1 is 100 wide, 80 high."""
    anns = [
        {"bbox": [10, 10, 20, 30], "category_id": 3},                  # good
        {"bbox": [50, 20, 10, 10], "category_id": 7},                  # good, other class
        {"bbox": [0, 0, 50, 50], "category_id": 3, "iscrowd": 1},      # crowd
        {"bbox": [float("nan"), 1, 5, 5], "category_id": 3},           # nonfinite
        {"bbox": [1, 1, float("inf"), 5], "category_id": 3},           # nonfinite
        {"bbox": [30, 30, -4, 10], "category_id": 3},                  # degenerate (w < 0)
        {"bbox": [30, 30, 10, 0], "category_id": 3},                   # degenerate (h = 0)
        {"bbox": [120, 10, 10, 10], "category_id": 3},                 # outside (right)
        {"bbox": [-30, 10, 20, 10], "category_id": 3},                 # outside (left)
        {"bbox": [90, 70, 20, 20], "category_id": 7},                  # partly out -> clipped
        {"bbox": [-5, -5, 15, 10], "category_id": 3},                  # partly out -> clipped
        {"bbox": [10, 10, 5, 5], "category_id": 99},                   # unknown category
        {"bbox": [10, 10, 5], "category_id": 3},                       # malformed
    ]
    for i, ann in enumerate(anns):
        ann.update(id=i + 1, image_id=1)
    anns.append({"id": 100, "image_id": 555, "bbox": [1, 1, 5, 5], "category_id": 3})
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 80, "width": 100},
                       {"id": 2, "file_name": "b.png", "height": 50, "width": 60}],
            "annotations": anns,
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    return _write_json(tmp_path / "crafted.json", data)


def test_cleaning_policy_exact_counts(crafted, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fcos"):
        coco = CocoDataset(str(tmp_path), crafted)
    stats = coco.stats
    assert stats["images"] == 2 and stats["annotations"] == 14
    assert {k: stats[k] for k in ("crowd", "nonfinite", "degenerate", "outside", "clipped",
                                  "unknown_category", "malformed", "unknown_image",
                                  "kept_boxes", "images_without_boxes")} == {
        "crowd": 1, "nonfinite": 2, "degenerate": 2, "outside": 2, "clipped": 2,
        "unknown_category": 1, "malformed": 1, "unknown_image": 1, "kept_boxes": 4,
        "images_without_boxes": 1}
    boxes, labels = coco.targets(1)
    assert boxes.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(boxes, [[10, 10, 30, 40], [50, 20, 60, 30], [90, 70, 100, 80],
                                          [0, 0, 10, 5]])
    np.testing.assert_array_equal(labels, [0, 1, 1, 0])  # id 3 -> 0, id 7 -> 1
    assert coco.targets(2)[0].shape == (0, 4)
    assert coco.image_ids == [1, 2]
    # Each kind is logged once, with its count.
    fcos_records = [r.getMessage() for r in caplog.records if r.name == "fcos"]
    assert len(fcos_records) == 9
    assert any("2 annotations with NaN/inf" in m for m in fcos_records)


def test_skip_empty_images(crafted, tmp_path):
    coco = CocoDataset(str(tmp_path), crafted, skip_empty=True)
    assert coco.image_ids == [1]
    assert coco.stats["skipped_empty_images"] == 1


@pytest.mark.parametrize("content, expected", [
    ("[1, 2, 3]", "not a COCO annotation file"),
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": []}', "not a COCO annotation file"),
    ('{"images": [{"id": 1}], "categories": []}', "not a COCO annotation file"),
    ('{"images": [{"id": 1, "file_name": "a", "height": 2, "width": 2},'
     ' {"id": 1, "file_name": "b", "height": 2, "width": 2}], "categories": []}',
     "duplicate image ids [1]"),
])
def test_bad_annotation_files_name_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as err:
        CocoDataset(str(tmp_path), str(path))
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDataset(str(tmp_path), str(tmp_path / "nope.json"))


def test_image_modes_become_rgb_uint8(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[:, :, ::-1])
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((6, 5, 1), 7, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((6, 5), 77, np.uint8))
    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((6, 5), 65535, np.uint16))
    colour16 = (rgb[:, :, ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "rgb16.png"), colour16)
    for name, expected in (("rgb", (200, 100, 30)), ("rgba", (200, 100, 30)), ("gray", (77,) * 3),
                           ("gray16", (255,) * 3), ("rgb16", (200, 100, 30))):
        image = load_image_rgb(str(tmp_path / f"{name}.png"))
        assert image.dtype == np.uint8 and image.shape == (6, 5, 3), name
        assert (image == np.array(expected, np.uint8)).all(), name


def test_missing_and_corrupt_images_raise_one_line(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DatasetError, match="image file not found") as err:
        load_image_rgb(str(missing))
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DatasetError, match="cannot decode") as err:
        load_image_rgb(str(corrupt))
    assert str(corrupt) in str(err.value) and "\n" not in str(err.value)


def test_load_image_checks_size_against_annotation(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 30, 3), np.uint8))
    ann = _write_json(tmp_path / "ann.json", {
        "images": [{"id": 5, "file_name": "a.png", "height": 30, "width": 40}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    coco = CocoDataset(str(tmp_path), ann)
    assert coco.image_path(5) == os.path.join(str(tmp_path), "a.png")
    with pytest.raises(DatasetError, match="40x30 but the annotation file says 30x40"):
        coco.load_image(5)


def test_annotation_without_annotations_key_is_an_image_list(tmp_path):
    ann = _write_json(tmp_path / "test.json", {
        "images": [{"id": 3, "file_name": "a.png", "height": 8, "width": 8}],
        "categories": [{"id": 1, "name": "x"}]})
    coco = CocoDataset(str(tmp_path), ann)
    assert coco.image_ids == [3] and coco.stats["annotations"] == 0
    assert len(coco.label_to_cat_id) == 1 and coco.targets(3)[0].shape == (0, 4)
