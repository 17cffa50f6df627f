"""Time COCO bbox scoring with both backends of src.evaluation.coco_eval on a COCO-sized synthetic set:

    python -m tools.benchmark.coco [--num_images 5000] [--boxes_per_image 7] [--detections_per_image 100]

Ground truth: --boxes_per_image boxes of every COCO area range per image over 80 categories;
detections: each box found again with jitter (some missed, some with the wrong class) plus false
alarms, up to --detections_per_image per image, random scores. Each backend scores the same
detections (loadRes, evaluate, accumulate, summarize); printed: a table, then one JSON line with
each backend's seconds, the speed-up and whether all 12 statistics agree.
"""
import argparse
import contextlib
import io
import json
import time

import numpy as np

from src.data.coco import coco_index
from src.evaluation.coco_eval import BACKENDS, STAT_KEYS, coco_evaluate, faster_coco_eval

NUM_CATEGORIES = 80


def synthetic_set(num_images, boxes_per_image, detections_per_image, seed):
    """-> (COCO ground-truth dict, COCO results list)."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": 480, "width": 640})
        sizes = np.minimum(rng.choice([16, 48, 160], boxes_per_image) *
                           np.exp(rng.normal(0, 0.3, (2, boxes_per_image))), 400)
        for w, h in sizes.T:
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(1, NUM_CATEGORIES + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.8:
                found = cat if rng.random() < 0.9 else int(rng.integers(1, NUM_CATEGORIES + 1))
                dx, dy = rng.normal(0, 0.1, 2) * (w, h)
                results.append({"image_id": image_id, "category_id": found, "score": float(rng.random()),
                                "bbox": [float(x + dx), float(y + dy), float(w), float(h)]})
        for _ in range(detections_per_image - boxes_per_image):
            w, h = rng.uniform(8, 300, 2)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)),
                            "score": float(rng.random() * 0.3),
                            "bbox": [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w),
                                     float(h)]})
    categories = [{"id": i, "name": str(i)} for i in range(1, NUM_CATEGORIES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time COCO scoring: pycocotools and faster_coco_eval.")
    parser.add_argument("--num_images", type=int, default=5000)
    parser.add_argument("--boxes_per_image", type=int, default=7)
    parser.add_argument("--detections_per_image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gt, results = synthetic_set(args.num_images, args.boxes_per_image, args.detections_per_image, args.seed)
    coco = coco_index(gt, "synthetic")
    backends = BACKENDS if faster_coco_eval is not None else BACKENDS[1:]
    seconds, stats = {}, {}
    for backend in backends:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            stats[backend] = coco_evaluate(coco, results, backend=backend)
        seconds[backend] = round(time.perf_counter() - start, 2)
    report = {"num_images": args.num_images, "num_gt": len(gt["annotations"]), "num_detections": len(results),
              "seconds": seconds, "AP": stats["pycocotools"]["AP"]}
    if len(backends) == 2:
        report["speedup"] = round(seconds["pycocotools"] / seconds["faster_coco_eval"], 1)
        report["max_stat_difference"] = max(abs(stats[b][k] - stats["pycocotools"][k])
                                            for b in backends for k in STAT_KEYS)
    for backend in backends:
        print(f"{backend:<18} {seconds[backend]:>8.2f} s   AP {stats[backend]['AP']:.4f}")
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
