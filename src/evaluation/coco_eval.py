"""COCO bbox scoring shared by eval.py, evaluation during training and postprocess.py (310)."""
import contextlib
import io
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

try:  # same statistics as pycocotools, computed in C++ (about 10x faster evaluate + accumulate)
    import faster_coco_eval
except ImportError:
    faster_coco_eval = None

from src.data.coco import clean_box, coco_index, read_coco_json
from src.config import ConfigError
from src.utils.io import write_json_atomic

logger = logging.getLogger("fcos")

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# Cleaning rules (src/data/coco.py) whose annotations no detection can match.
UNSCORABLE = ("malformed", "nonfinite", "degenerate", "outside")


def load_coco(ann_file: str) -> COCO:
    """Ground truth for scoring -> a pycocotools COCO; DatasetError names an unusable file.

    Annotations that no detection can match - bbox missing, NaN/inf, empty or entirely outside
    its image - are left out and counted in the log, where pycocotools would fail on them or
    count them as misses. Crowd boxes stay (detections on them are ignored) and boxes are not
    clipped, so a clean file scores exactly as with pycocotools alone. A missing 'area' is the
    box area and a missing 'iscrowd' is 0, as COCO defines them.
    """
    data = read_coco_json(ann_file)
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    kept = []
    for ann in data.get("annotations", []):
        # unknown images get no size limit: COCOeval ignores their annotations anyway
        width, height = sizes.get(ann["image_id"], (math.inf, math.inf))
        if clean_box(ann, width, height)[1] in UNSCORABLE:
            continue
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        kept.append(ann)
    dropped = len(data.get("annotations", [])) - len(kept)
    if dropped:
        logger.warning("%s: %d annotations with a missing, NaN/inf or empty box, or one outside its "
                       "image, are not scored", os.path.basename(ann_file), dropped)
    data["annotations"] = kept
    return coco_index(data, ann_file)


def check_category_count(num_categories: int, class_num: int, ann_file: str) -> None:
    """The one policy of train.py, eval.py and postprocess.py: an annotation file with more
    categories than the model has classes is a ConfigError; with fewer, the labels beyond them
    have no category (nothing to learn, and to_coco_results leaves their detections out): a
    warning."""
    if num_categories > class_num:
        raise ConfigError(f"{ann_file} has {num_categories} categories, more than the model's "
                          f"class_num={class_num}")
    if num_categories < class_num:
        logger.warning("%s has %d categories for class_num=%d: labels %d..%d have no category (never trained, "
                       "never scored)", ann_file, num_categories, class_num, num_categories, class_num - 1)


def to_coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    label_to_cat_id: Sequence[int], plus_one: bool = False) -> List[Dict[str, Any]]:
    """Detections of one image -> COCO results entries.

    boxes (N,4) x1,y1,x2,y2 in original image pixels; scores (N,); labels (N,) contiguous
    0-based; label_to_cat_id maps them back to the dataset's category ids. Labels it does not
    reach (a model with more classes than the file has categories) have no category to be
    scored under and are left out. plus_one: width x2 - x1 + 1 and height y2 - y1 + 1, as
    maskrcnn-benchmark writes its json (the FCOS authors' evaluation).
    """
    one = float(plus_one)
    results = []
    for (x1, y1, x2, y2), score, label in zip(np.asarray(boxes, np.float64), scores, labels):
        if label >= len(label_to_cat_id):
            continue
        results.append({
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id[int(label)]),
            "bbox": [round(float(x1), 2), round(float(y1), 2),
                     round(float(x2 - x1) + one, 2), round(float(y2 - y1) + one, 2)],
            "score": round(float(score), 5),
        })
    return results


BACKENDS = ("faster_coco_eval", "pycocotools")


def default_backend() -> str:
    """faster_coco_eval when it is installed, else pycocotools."""
    return BACKENDS[0] if faster_coco_eval is not None else BACKENDS[1]


def _evaluator(coco_gt, results, backend):
    """A bbox COCOeval of ``backend`` over coco_gt (a pycocotools COCO) and results."""
    if backend == "faster_coco_eval":
        if faster_coco_eval is None:
            raise ImportError("coco_eval backend faster_coco_eval: the package is not installed "
                              "(pip install faster-coco-eval)")
        gt = faster_coco_eval.COCO(coco_gt.dataset)
        return faster_coco_eval.COCOeval_faster(gt, gt.loadRes(results), "bbox", print_function=print)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    return COCOeval(coco_gt, coco_dt, "bbox")


def coco_evaluate(coco_gt: COCO, results: Sequence[Dict[str, Any]], output_dir: Optional[str] = None,
                  image_ids: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> Dict[str, float]:
    """Score ``results`` (COCO results entries) against ``coco_gt`` (a COCO object).

    Prints the standard 12-line table and returns {key: float} for STAT_KEYS. With
    ``output_dir`` it writes eval_result.json (the stats, the number of images scored and the
    detections) atomically. ``image_ids`` restricts scoring to the images that were actually run.
    ``backend``: one of BACKENDS, default_backend() when None; both give the same statistics
    (tests/test_coco_eval.py).
    """
    if results:
        backend = backend or default_backend()
        start = time.perf_counter()
        # copies: both libraries add fields (area, id, ...) to the entries they load
        evaluator = _evaluator(coco_gt, [dict(r) for r in results], backend)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        evaluator.summarize()
        stats = [float(s) for s in evaluator.stats[:len(STAT_KEYS)]]
        logger.info("COCO scoring (%s) took %.2f s", backend, time.perf_counter() - start)
    else:
        logger.warning("no detections at all: every COCO metric is 0")
        stats = [0.0] * len(STAT_KEYS)
    metrics = dict(zip(STAT_KEYS, stats))
    if output_dir:
        num_images = len(coco_gt.imgs) if image_ids is None else len(set(image_ids))
        write_json_atomic(os.path.join(output_dir, "eval_result.json"),
                          {**metrics, "num_images": num_images, "num_detections": len(results),
                           "detections": results})
    return metrics

