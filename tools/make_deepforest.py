"""Build the shipped quick-start dataset data/deepforest from the raw DeepForest sample.

    python -m tools.make_deepforest --voc_dir data/deepforest_voc --out data/deepforest

One class, "Tree": the sample's Tree, Alive and Dead labels all mark tree crowns.

Held-out-image split (annotations/heldout_train.json, heldout_val.json; what the quick start
trains and validates on): whole source images, ``--held_out`` (default OSBS_029, a site of its
own) for validation and the others for training, referring to the PNGs of --voc_dir (no copies).

Tile split (annotations/train.json, val.json with train/, val/): the large
1249x1035 image is split at x = 929: the 320 px strip to the right is validation (three
non-overlapping 320x345 tiles), the rest is cut into 4x4 overlapping 320x320 training tiles.
The two 400x400 images (OSBS_029 and SOAP_061, two other sites) are split at x = 240: the left
240x400 part is training, the right 160x400 part validation - so every site is in both splits
(with one site held out entirely, 17 images from scratch cannot learn its look) and no pixel is
in both. A box cut by a tile edge is clipped to the tile; it stays a normal box when at least
half its area is inside, and becomes an ignore region (iscrowd=1: not a training target, not
counted by COCO scoring) when less is. Tiles are JPEG quality 95. The output is deterministic.
"""
import argparse
import json
import os
import shutil

import cv2
import numpy as np

from src.data.coco import load_image_rgb
from tools.voc2coco import parse_voc_xml, voc_box_to_coco

LARGE = "2019_YELL_2_541000_4977000_image_crop"
VAL_STRIP_X = 929   # the large image's columns from here on are validation
TRAIN_TILE = 320
TRAIN_TILES_PER_AXIS = 4
VAL_TILES = 3       # stacked vertically in the validation strip
SMALL = ("SOAP_061", "OSBS_029")
SMALL_SPLIT_X = 240  # the small images' columns from here on are validation
MIN_VISIBLE = 0.5
HELD_OUT = "OSBS_029"  # validation image of the held-out-image split
VAL_TILE_MAX = 420  # held_out_fold validates a larger held-out image as tiles of at most this side
CLASS_NAME = "Tree"


def tile_starts(length, tile, count):
    """count evenly spaced starts of ``tile``-long windows covering [0, length)."""
    return [int(round(s)) for s in np.linspace(0, length - tile, count)]


def _windows(width, height):
    """Windows (x0, y0, x1, y1) of the large image -> {'train': [...], 'val': [...]}."""
    train = [(x, y, x + TRAIN_TILE, y + TRAIN_TILE)
             for y in tile_starts(height, TRAIN_TILE, TRAIN_TILES_PER_AXIS)
             for x in tile_starts(VAL_STRIP_X, TRAIN_TILE, TRAIN_TILES_PER_AXIS)]
    edges = [int(round(e)) for e in np.linspace(0, height, VAL_TILES + 1)]
    val = [(VAL_STRIP_X, y0, width, y1) for y0, y1 in zip(edges[:-1], edges[1:])]
    return {"train": train, "val": val}


def cut(image, boxes, window):
    """Crop ``window`` (x0, y0, x1, y1) -> (tile, boxes (K,4) x1,y1,x2,y2 in the tile, crowd (K,)).

    Boxes are clipped to the tile; those with nothing inside are dropped, those with under
    MIN_VISIBLE of their area inside are flagged crowd (ignore regions).
    """
    x0, y0, x1, y1 = window
    moved = boxes - np.array([x0, y0, x0, y0], np.float64)
    clipped = moved.copy()
    clipped[:, 0::2] = np.clip(moved[:, 0::2], 0, x1 - x0)
    clipped[:, 1::2] = np.clip(moved[:, 1::2], 0, y1 - y0)
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    inside = visible > 0
    return image[y0:y1, x0:x1], clipped[inside], (visible < MIN_VISIBLE * area)[inside]


def _read_sample(voc_dir, stem):
    """-> (image (H,W,3) uint8 RGB, boxes (N,4) float64 x1,y1,x2,y2 0-based)."""
    record = parse_voc_xml(os.path.join(voc_dir, stem + ".xml"))
    boxes = [voc_box_to_coco(obj["box"]) for obj in record["objects"]]
    xywh = np.asarray(boxes, np.float64).reshape(-1, 4)
    return load_image_rgb(os.path.join(voc_dir, stem + ".png")), np.concatenate(
        [xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


class _SplitWriter:
    """Collects the tiles of one split into out_dir/<split>/ and a COCO dict."""

    def __init__(self, out_dir, split):
        self.split = split
        self.img_dir = os.path.join(out_dir, split)
        os.makedirs(self.img_dir, exist_ok=True)
        self.images, self.annotations = [], []

    def add(self, name, tile, boxes, crowd):
        image_id = len(self.images) + 1
        file_name = f"{name}.jpg"
        cv2.imwrite(os.path.join(self.img_dir, file_name), tile[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        self.images.append({"id": image_id, "file_name": file_name, "height": tile.shape[0],
                            "width": tile.shape[1]})
        for (x1, y1, x2, y2), is_crowd in zip(boxes.tolist(), crowd.tolist()):
            w, h = x2 - x1, y2 - y1
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": 1, "bbox": [x1, y1, w, h], "area": w * h,
                                     "iscrowd": int(is_crowd)})

    def coco(self):
        return {"images": self.images, "annotations": self.annotations,
                "categories": [{"id": 1, "name": CLASS_NAME, "supercategory": "plant"}]}


def whole_image_split(voc_dir, held_out):
    """The held-out-image split -> {"heldout_train": COCO dict, "heldout_val": COCO dict}, file
    names relative to voc_dir; every box is a normal box (nothing is cut)."""
    stems = sorted(name[:-4] for name in os.listdir(voc_dir) if name.endswith(".xml"))
    if held_out not in stems:
        raise SystemExit(f"--held_out {held_out}: no {held_out}.xml in {voc_dir} (have {stems})")
    result = {}
    for split, chosen in (("heldout_train", [s for s in stems if s != held_out]), ("heldout_val", [held_out])):
        coco = {"images": [], "annotations": [],
                "categories": [{"id": 1, "name": CLASS_NAME, "supercategory": "plant"}]}
        for stem in chosen:
            image, boxes = _read_sample(voc_dir, stem)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": stem + ".png", "height": image.shape[0],
                                   "width": image.shape[1]})
            for x1, y1, x2, y2 in boxes.tolist():
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        result[split] = coco
    return result


def grid_windows(width, height, max_tile):
    """Non-overlapping windows (x0, y0, x1, y1) of a near-equal grid covering width x height with
    sides of at most max_tile (one window when the image is no larger)."""
    xs = np.linspace(0, width, -(-width // max_tile) + 1).round().astype(int)
    ys = np.linspace(0, height, -(-height // max_tile) + 1).round().astype(int)
    return [(int(x0), int(y0), int(x1), int(y1)) for y0, y1 in zip(ys[:-1], ys[1:])
            for x0, x1 in zip(xs[:-1], xs[1:])]


def held_out_fold(voc_dir, held_out, out_dir, max_tile=VAL_TILE_MAX):
    """One fold of leave-one-image-out validation, written to out_dir/annotations/{train,val}.json
    -> (train_img_dir, val_img_dir). Training is the whole other images (files in voc_dir); the
    held-out image is validated whole when no side exceeds max_tile, else as a grid of tiles
    (out_dir/val/*.jpg, cut as the tile split cuts) - one image of the large orthophoto holds
    more crowns than COCO's 100 scored detections."""
    split = whole_image_split(voc_dir, held_out)
    image, boxes = _read_sample(voc_dir, held_out)
    height, width = image.shape[:2]
    val_img_dir = voc_dir
    if max(height, width) > max_tile:
        writer = _SplitWriter(out_dir, "val")
        for x0, y0, x1, y1 in grid_windows(width, height, max_tile):
            tile, tile_boxes, crowd = cut(image, boxes, (x0, y0, x1, y1))
            writer.add(f"{held_out}_x{x0:04d}_y{y0:04d}", tile, tile_boxes, crowd)
        split["heldout_val"], val_img_dir = writer.coco(), writer.img_dir
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    for name, key in (("train", "heldout_train"), ("val", "heldout_val")):
        with open(os.path.join(ann_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(split[key], f, indent=1)
    return voc_dir, val_img_dir


def make_deepforest(voc_dir, out_dir, held_out=HELD_OUT):
    """Write the dataset (see the module notes) -> {split: COCO dict}."""
    writers = {split: _SplitWriter(out_dir, split) for split in ("train", "val")}
    image, boxes = _read_sample(voc_dir, LARGE)
    for split, windows in _windows(image.shape[1], image.shape[0]).items():
        for x0, y0, x1, y1 in windows:
            tile, tile_boxes, crowd = cut(image, boxes, (x0, y0, x1, y1))
            writers[split].add(f"YELL_x{x0:04d}_y{y0:04d}", tile, tile_boxes, crowd)
    for stem in SMALL:
        image, boxes = _read_sample(voc_dir, stem)
        height, width = image.shape[:2]
        for split, x0, x1 in (("train", 0, SMALL_SPLIT_X), ("val", SMALL_SPLIT_X, width)):
            tile, tile_boxes, crowd = cut(image, boxes, (x0, 0, x1, height))
            writers[split].add(f"{stem}_x{x0:04d}", tile, tile_boxes, crowd)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    result = {split: writer.coco() for split, writer in writers.items()}
    result.update(whole_image_split(voc_dir, held_out))
    for split in result:
        with open(os.path.join(ann_dir, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(result[split], f, indent=1)
    shutil.copyfile(os.path.join(voc_dir, "LICENSE"), os.path.join(out_dir, "LICENSE"))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build data/deepforest from the raw sample.")
    parser.add_argument("--voc_dir", default="data/deepforest_voc")
    parser.add_argument("--out", default="data/deepforest")
    parser.add_argument("--held_out", default=HELD_OUT,
                        help="source image (file stem) the held-out-image split validates on")
    args = parser.parse_args(argv)
    for split, coco in make_deepforest(args.voc_dir, args.out, args.held_out).items():
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations']) - crowd} boxes, "
              f"{crowd} ignore regions")


if __name__ == "__main__":
    main()
