"""Pascal-VOC XML annotations -> one COCO-format JSON.

    python -m tools.voc2coco --xml_dir D --img_dir D --output ann.json \\
        [--classes a,b,c] [--merge_classes] [--difficult crowd|keep|drop]

Conventions:
- Coordinates: VOC boxes are 1-based inclusive pixel indices (xmin=1 is the first column,
  xmax=W the last), so the COCO box is x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1,
  h = ymax - ymin + 1 (0-based continuous coordinates, a box of pixel columns 0..9 is x=0, w=10).
- Categories: ids 1..C in the order of --classes, or of the sorted object names found. With
  --classes, an object of another name is an error (naming the file); with --merge_classes every
  object becomes the single class given by --classes (default "object").
- difficult="1" objects become iscrowd=1 by default ("crowd"): COCO scoring then ignores
  detections on them, close to the VOC protocol, and training leaves them out. "keep" treats them
  as normal objects, "drop" removes them.
- Images: file_name is the XML's <filename> when that file exists in --img_dir, else the first
  existing file named like the XML with a common image extension (VOC exports often name a .tif
  that was converted). width/height come from <size>, or from the image when <size> is absent.
- Image ids are 1..N in the sorted order of the XML file names.
"""
import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

import cv2

from src.data.coco import DatasetError

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DIFFICULT_POLICIES = ("crowd", "keep", "drop")


def _text(node, path, xml_path, cast=str):
    found = node.find(path)
    if found is None or found.text is None:
        raise DatasetError(f"VOC XML lacks <{path}>: {xml_path}")
    try:
        return cast(found.text.strip())
    except ValueError:
        raise DatasetError(f"VOC XML <{path}> is not a number ('{found.text.strip()}'): "
                           f"{xml_path}") from None


def parse_voc_xml(xml_path):
    """One VOC XML -> {'filename', 'width', 'height' (0 when absent), 'objects': [{'name',
    'box' (xmin, ymin, xmax, ymax) as written, 'difficult' bool}]}."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DatasetError(f"not a readable XML file ({err}): {xml_path}") from None
    if root.tag != "annotation":
        raise DatasetError(f"not a VOC annotation (root <{root.tag}>): {xml_path}")
    size = root.find("size")
    width = _text(size, "width", xml_path, int) if size is not None else 0
    height = _text(size, "height", xml_path, int) if size is not None else 0
    objects = []
    for obj in root.findall("object"):
        box = tuple(_text(obj, f"bndbox/{k}", xml_path, float)
                    for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.find("difficult")
        objects.append({"name": _text(obj, "name", xml_path), "box": box,
                        "difficult": difficult is not None
                        and (difficult.text or "0").strip() == "1"})
    filename = root.find("filename")
    return {"filename": (filename.text or "").strip() if filename is not None else "",
            "width": width, "height": height, "objects": objects}


def voc_box_to_coco(box):
    """VOC (xmin, ymin, xmax, ymax), 1-based inclusive -> COCO [x, y, w, h], 0-based."""
    xmin, ymin, xmax, ymax = box
    return [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0]


def _image_file(record, xml_path, img_dir):
    """The image file of an XML, relative to img_dir (see the module notes)."""
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    names = [record["filename"]] if record["filename"] else []
    names += [stem + ext for ext in _IMAGE_EXTENSIONS]
    for name in names:
        if os.path.isfile(os.path.join(img_dir, name)):
            return name
    raise DatasetError(f"no image for {xml_path} in {img_dir} (tried {names[0]})")


def _image_size(record, img_dir, file_name):
    if record["width"] > 0 and record["height"] > 0:
        return record["height"], record["width"]
    image = cv2.imread(os.path.join(img_dir, file_name), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"cannot decode image file: {os.path.join(img_dir, file_name)}")
    return image.shape[:2]


def voc_to_coco(xml_paths, img_dir, classes=None, merge_classes=False, difficult="crowd"):
    """VOC XML files -> COCO dict (images, annotations, categories); see the module notes."""
    if difficult not in DIFFICULT_POLICIES:
        raise ValueError(f"difficult must be one of {DIFFICULT_POLICIES}, got '{difficult}'")
    xml_paths = sorted(xml_paths, key=os.path.basename)
    records = [(path, parse_voc_xml(path)) for path in xml_paths]
    if merge_classes:
        classes = list(classes or ["object"])
        if len(classes) != 1:
            raise ValueError(f"--merge_classes needs one class name in --classes, got {classes}")
    elif not classes:
        classes = sorted({obj["name"] for _, rec in records for obj in rec["objects"]})
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, (path, rec) in enumerate(records, start=1):
        file_name = _image_file(rec, path, img_dir)
        height, width = _image_size(rec, img_dir, file_name)
        images.append({"id": image_id, "file_name": file_name, "height": int(height),
                       "width": int(width)})
        for obj in rec["objects"]:
            name = classes[0] if merge_classes else obj["name"]
            if name not in cat_ids:
                raise DatasetError(f"object class '{name}' is not in --classes {classes}: {path}")
            if obj["difficult"] and difficult == "drop":
                continue
            x, y, w, h = voc_box_to_coco(obj["box"])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_ids[name], "bbox": [x, y, w, h],
                                "area": w * h,
                                "iscrowd": int(obj["difficult"] and difficult == "crowd")})
    categories = [{"id": cat_id, "name": name, "supercategory": "none"}
                  for name, cat_id in cat_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pascal-VOC XML annotations -> COCO JSON")
    parser.add_argument("--xml_dir", required=True, help="folder of VOC .xml files")
    parser.add_argument("--img_dir", required=True, help="folder of the images")
    parser.add_argument("--output", required=True, help="COCO annotation JSON to write")
    parser.add_argument("--classes", default="",
                        help="comma-separated class names, in category id order (default: sorted "
                             "names found)")
    parser.add_argument("--merge_classes", action="store_true",
                        help="map every object to the one class of --classes (default 'object')")
    parser.add_argument("--difficult", choices=DIFFICULT_POLICIES, default="crowd",
                        help="what difficult objects become")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.xml_dir):
            raise DatasetError(f"--xml_dir: no such folder: {args.xml_dir}")
        xml_paths = [os.path.join(args.xml_dir, f) for f in os.listdir(args.xml_dir)
                     if f.lower().endswith(".xml")]
        if not xml_paths:
            raise DatasetError(f"--xml_dir: no .xml files in {args.xml_dir}")
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        coco = voc_to_coco(xml_paths, args.img_dir, classes, args.merge_classes, args.difficult)
    except ValueError as err:  # DatasetError included
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(coco['categories'])} categories to {args.output}")


if __name__ == "__main__":
    main()
