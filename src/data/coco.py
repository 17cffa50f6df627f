"""COCO-format detection annotations: label maps, the cleaning policy, image decoding.

Boxes are returned as float32 (N,4) x1,y1,x2,y2 in the image's pixel frame (continuous
coordinates: a box covering pixel columns 0..9 is x1=0, x2=10), labels as int32 (N,)
contiguous 0-based indices over the categories sorted by id.

Cleaning policy for training targets (an annotation is counted under the first rule it meets,
in this order; every kind is logged once with its count; ``CocoDataset.stats`` holds the counts):

==================  =====================================================================
unknown_image       ``image_id`` not in ``images``                             -> dropped
malformed           ``bbox`` missing or not 4 numbers                          -> dropped
nonfinite           NaN or infinite coordinates                                -> dropped
degenerate          width or height <= 0                                       -> dropped
outside             no overlap with the image                                  -> dropped
crowd               ``iscrowd`` = 1 (COCO scores them as ignore regions)       -> dropped
unknown_category    ``category_id`` not in ``categories``                      -> dropped
clipped             partly outside the image: clipped to it                    -> kept
==================  =====================================================================

A file that cannot be used at all - not JSON, not COCO's layout, duplicate image or category
ids, an image without a positive size, an annotation without ``image_id`` / ``category_id`` -
raises DatasetError naming the file. Annotation ids that are missing, repeated or below 1 are
renumbered (see ``coco_index``).
"""
import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools.coco import COCO

logger = logging.getLogger("fcos")

DROP_KINDS = ("malformed", "nonfinite", "unknown_category", "unknown_image", "crowd",
              "degenerate", "outside")
_KIND_TEXT = {
    "malformed": "annotations without a valid 4-number bbox dropped",
    "nonfinite": "annotations with NaN/inf coordinates dropped",
    "unknown_category": "annotations whose category_id is not in 'categories' dropped",
    "unknown_image": "annotations whose image_id is not in 'images' dropped",
    "crowd": "crowd annotations excluded from training targets",
    "degenerate": "annotations with width or height <= 0 dropped",
    "outside": "annotations entirely outside their image dropped",
    "clipped": "annotations partly outside their image clipped to it",
    "images_without_boxes": "images have no valid box",
    "skipped_empty_images": "images without a valid box skipped",
}


class DatasetError(ValueError):
    """A problem with a dataset file that a user must fix; the message is one line naming it."""


def load_image_rgb(path: str) -> np.ndarray:
    """Decode an image file -> (H,W,3) uint8 RGB.

    Grayscale is replicated to three channels, alpha is dropped, 16-bit is rescaled to 8 bits.
    A missing, empty, truncated or undecodable file raises DatasetError naming it.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"image file not found: {path}")
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as err:
        raise DatasetError(f"cannot read image file ({err.strerror}): {path}") from None
    if data.size == 0:
        raise DatasetError(f"empty image file (0 bytes): {path}")
    # imdecode, not imread: reading a file, libjpeg fills a cut-off JPEG with grey and only
    # prints a warning; decoding from memory, OpenCV rejects it.
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DatasetError(f"cannot decode image file (corrupt, truncated or unsupported format): "
                           f"{path}")
    if image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DatasetError(f"unsupported pixel type {image.dtype} in image file: {path}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise DatasetError(f"unsupported channel count {image.shape[2]} in image file: {path}")


def label_maps(categories: Sequence[Dict[str, Any]]) -> Tuple[List[int], Dict[int, int], List[str]]:
    """COCO categories -> (label_to_cat_id list, cat_id_to_label dict, class names list).

    Labels are 0..C-1 over the category ids in ascending order, so COCO's 80 ids scattered over
    1..90 become 0..79 and ``label_to_cat_id[label]`` maps a prediction back for scoring.
    """
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    label_to_cat_id = [int(c["id"]) for c in ordered]
    cat_id_to_label = {cat_id: label for label, cat_id in enumerate(label_to_cat_id)}
    names = [str(c.get("name", c["id"])) for c in ordered]
    return label_to_cat_id, cat_id_to_label, names


def read_coco_json(ann_file: str) -> Dict[str, Any]:
    """Load and validate a COCO annotation file -> its dict; DatasetError names the file."""
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"annotation file is not valid JSON ({err}): {ann_file}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"not a COCO annotation file (needs 'images' and 'categories' lists): "
                           f"{ann_file}")
    try:
        ids = [int(img["id"]) for img in data["images"]]
        for img in data["images"]:
            str(img["file_name"]), int(img["height"]), int(img["width"])
        cat_ids = [int(c["id"]) for c in data["categories"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"not a COCO annotation file (image or category entry lacks {err}): "
                           f"{ann_file}") from None
    for what, values in (("image", ids), ("category", cat_ids)):
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})[:5]
            raise DatasetError(f"duplicate {what} ids {dup} in annotation file: {ann_file}")
    for img in data["images"]:
        if int(img["height"]) <= 0 or int(img["width"]) <= 0:
            raise DatasetError(f"image {img['id']} ({img['file_name']}) has size "
                               f"{img['height']}x{img['width']}, not a positive one: {ann_file}")
    for index, ann in enumerate(data.get("annotations", [])):
        if not (isinstance(ann, dict) and isinstance(ann.get("image_id"), (int, float, str))
                and isinstance(ann.get("category_id"), (int, float, str))):
            raise DatasetError(f"not a COCO annotation file (annotation {index} has no image_id "
                               f"or category_id): {ann_file}")
    return data


def coco_index(data: Dict[str, Any], ann_file: str) -> COCO:
    """pycocotools COCO over ``data`` (a read_coco_json dict), built without its chatter.

    Annotation ids that are missing, repeated or below 1 are renumbered 1..N first (logged):
    pycocotools keys annotations by id, and COCOeval takes id 0 for "no match", so such ids
    would silently lose boxes or score true matches as false positives.
    """
    anns = data.get("annotations", [])
    ids = [ann.get("id") for ann in anns]
    if not all(type(i) is int and i >= 1 for i in ids) or len(set(ids)) != len(ids):
        for new_id, ann in enumerate(anns, 1):
            ann["id"] = new_id
        logger.warning("%s: annotation ids missing, repeated or below 1: renumbered 1..%d",
                       os.path.basename(ann_file), len(anns))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def clean_box(ann: Dict[str, Any], width: float,
              height: float) -> Tuple[Optional[Tuple[float, float, float, float]], Optional[str], bool]:
    """One annotation of an image of ``width`` x ``height`` -> (box, drop_kind, was_clipped).

    box is (x1,y1,x2,y2) clipped to the image, or None with drop_kind naming the first rule of the
    cleaning policy (module docstring) that drops it; the category is not checked here.
    """
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, "malformed", False
    if not np.all(np.isfinite([x, y, w, h])):
        return None, "nonfinite", False
    if w <= 0 or h <= 0:
        return None, "degenerate", False
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return None, "outside", False
    if ann.get("iscrowd", 0):
        return None, "crowd", False
    return (x1, y1, x2, y2), None, (x1, y1, x2, y2) != (x, y, x + w, y + h)


class CocoDataset:
    """A cleaned COCO-format dataset: per image its file, size and training targets.

    Args:
        img_dir: folder that ``file_name`` entries are relative to.
        ann_file: COCO annotation JSON.
        skip_empty: leave images without any valid box out of ``image_ids`` (training).

    Holds only plain Python/numpy data, so it is cheap to hand to data-loading workers.
    """

    def __init__(self, img_dir: str, ann_file: str, *, skip_empty: bool = False) -> None:
        self.img_dir = img_dir
        self.ann_file = ann_file
        data = read_coco_json(ann_file)
        coco = coco_index(data, ann_file)
        self.label_to_cat_id, self.cat_id_to_label, self.class_names = label_maps(
            data["categories"])
        self.stats = {"images": len(data["images"]),
                      "annotations": len(data.get("annotations", [])),
                      **{kind: 0 for kind in DROP_KINDS}, "clipped": 0, "kept_boxes": 0,
                      "images_without_boxes": 0, "skipped_empty_images": 0}
        self._infos = {}
        self._targets = {}
        for image_id in sorted(coco.imgs):
            img = coco.imgs[image_id]
            info = {"file_name": str(img["file_name"]), "height": int(img["height"]),
                    "width": int(img["width"])}
            self._infos[image_id] = info
            self._targets[image_id] = self._clean(coco.imgToAnns.get(image_id, []), info)
        self.stats["unknown_image"] = sum(len(anns) for i, anns in coco.imgToAnns.items()
                                          if i not in coco.imgs)
        empty = [i for i, (boxes, _) in self._targets.items() if len(boxes) == 0]
        self.stats["images_without_boxes"] = len(empty)
        if skip_empty:
            self.stats["skipped_empty_images"] = len(empty)
            empty = set(empty)
            self.image_ids = [i for i in self._infos if i not in empty]
        else:
            self.image_ids = list(self._infos)
        self._log_stats()

    def _clean(self, anns, info):
        """Annotations of one image -> (boxes (N,4) float32, labels (N,) int32), counting drops."""
        boxes, labels = [], []
        for ann in anns:
            label = self.cat_id_to_label.get(ann.get("category_id"))
            box, kind, clipped = clean_box(ann, info["width"], info["height"])
            if kind is None and label is None:
                kind = "unknown_category"
            if kind is not None:
                self.stats[kind] += 1
                continue
            self.stats["clipped"] += int(clipped)
            boxes.append(box)
            labels.append(label)
        self.stats["kept_boxes"] += len(boxes)
        return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32))

    def _log_stats(self):
        for kind, text in _KIND_TEXT.items():
            if self.stats[kind]:
                logger.warning("%s: %d %s", os.path.basename(self.ann_file), self.stats[kind], text)

    def image_info(self, image_id: int) -> Dict[str, Any]:
        """{'file_name', 'height', 'width'} of an image, as the annotation file gives them."""
        return self._infos[image_id]

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.img_dir, self._infos[image_id]["file_name"])

    def targets(self, image_id: int) -> Tuple[np.ndarray, np.ndarray]:
        """Cleaned targets: boxes (N,4) float32 x1,y1,x2,y2, labels (N,) int32 (copies)."""
        boxes, labels = self._targets[image_id]
        return boxes.copy(), labels.copy()

    def load_image(self, image_id: int) -> np.ndarray:
        """(H,W,3) uint8 RGB; DatasetError if unreadable or its size differs from the annotation
        (boxes would then be in another frame)."""
        path = self.image_path(image_id)
        image = load_image_rgb(path)
        info = self._infos[image_id]
        if image.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(f"image is {image.shape[0]}x{image.shape[1]} but the annotation "
                               f"file says {info['height']}x{info['width']}: {path}")
        return image
