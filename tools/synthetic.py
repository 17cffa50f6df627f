"""Deterministic synthetic COCO-format detection data: coloured shapes on noisy backgrounds.

Three classes - rectangle, ellipse, triangle - each with its own hue, 1-6 objects per image,
sides of about 16-120 px at 256x256 (scaled with the image), on a smooth random gradient with
blotchy and per-pixel noise. A small FCOS learns them in minutes, which makes the set useful for
smoke tests and for checking that training actually learns.

    python -m tools.synthetic --out DIR --num_images 64 --size 256 256 --seed 0

writes DIR/images/000001.jpg ... and DIR/annotations.json (img_dir = DIR/images).
"""
import argparse
import json
import os

import cv2
import numpy as np

from src.data.synthetic_crowns import overlap_of_smaller

CLASSES = ("rectangle", "ellipse", "triangle")
_COLOURS = {"rectangle": (215, 50, 45), "ellipse": (45, 175, 60), "triangle": (55, 85, 220)}
_SIDE_RANGE = (16, 120)  # at a 256-pixel short side
_MAX_OVERLAP = 0.25  # of the smaller box, so that no shape hides most of another


def _background(rng, height, width):
    """(H,W,3) uint8: a gradient between two random colours, low-frequency blotches, pixel noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    lo, hi = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    image = lo + t[..., None] * (hi - lo)
    grid = (max(2, height // 32), max(2, width // 32), 3)
    blotches = rng.normal(0, 25, size=grid).astype(np.float32)
    image += cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 8, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(kind, box, height, width, rng):
    """Filled mask (H,W) uint8 of a shape inscribed in box (x1, y1, x2, y2) (integers)."""
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), np.uint8)
    if kind == "rectangle":
        cv2.rectangle(mask, (x1, y1), (x2 - 1, y2 - 1), 1, thickness=-1)
    elif kind == "ellipse":
        centre = ((x1 + x2 - 1) // 2, (y1 + y2 - 1) // 2)
        axes = ((x2 - x1 - 1) // 2, (y2 - y1 - 1) // 2)
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1)
    else:
        apex = int(rng.integers(x1, x2))
        cv2.fillPoly(mask, [np.array([[x1, y2 - 1], [x2 - 1, y2 - 1], [apex, y1]], np.int32)], 1)
    return mask


def make_image(rng, height, width, min_objects=1, max_objects=6):
    """One synthetic image -> (image (H,W,3) uint8 RGB, [(class index, x, y, w, h)]).

    Boxes are the tight bounds of each shape's pixels; a later shape may hide part of an earlier
    one, but placements covering over a quarter of a box (the smaller of the two) are redrawn.
    """
    image = _background(rng, height, width)
    scale = min(height, width) / 256.0
    lo, hi = (max(4, int(round(s * scale))) for s in _SIDE_RANGE)
    hi = min(hi, height, width)
    objects, boxes = [], []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(20):
            side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
            aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
            bw = int(np.clip(side * np.sqrt(aspect), lo, min(hi, width)))
            bh = int(np.clip(side / np.sqrt(aspect), lo, min(hi, height)))
            x1, y1 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            box = (x1, y1, x1 + bw, y1 + bh)
            if not (overlap_of_smaller(np.array(box, np.float64), boxes) > _MAX_OVERLAP).any():
                break
        else:
            continue
        label = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(CLASSES[label], box, height, width, rng)
        colour = np.clip(np.array(_COLOURS[CLASSES[label]]) + rng.integers(-20, 21, size=3), 0, 255)
        image[mask > 0] = colour.astype(np.uint8)
        ys, xs = np.nonzero(mask)
        tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        boxes.append(tight)
        objects.append((label, tight[0], tight[1], tight[2] - tight[0], tight[3] - tight[1]))
    return image, objects


def make_synthetic_coco(out_dir, num_images, height, width, seed, *, min_objects=1, max_objects=6,
                        ext="jpg"):
    """Write num_images images to out_dir/images and out_dir/annotations.json -> the json path.

    Image i comes from the generator seeded with (seed, i), so a set is reproducible and its first
    images do not depend on num_images.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        image, objects = make_image(rng, height, width, min_objects, max_objects)
        file_name = f"{index + 1:06d}.{ext}"
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ("jpg", "jpeg") else []
        if not cv2.imwrite(os.path.join(img_dir, file_name), image[:, :, ::-1], params):
            raise OSError(f"could not write {os.path.join(img_dir, file_name)}")
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        for label, x, y, w, h in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": label + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    ann_file = os.path.join(out_dir, "annotations.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_objects", type=int, default=1)
    parser.add_argument("--max_objects", type=int, default=6)
    parser.add_argument("--ext", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)
    ann_file = make_synthetic_coco(args.out, args.num_images, args.size[0], args.size[1], args.seed,
                                   min_objects=args.min_objects, max_objects=args.max_objects,
                                   ext=args.ext)
    print(f"wrote {args.num_images} images to {os.path.join(args.out, 'images')} and {ann_file}")


if __name__ == "__main__":
    main()
