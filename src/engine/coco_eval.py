"""COCO bbox scoring shared by eval.py, evaluation during training and postprocess.py (310)."""
import contextlib
import io
import json
import logging
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger("fcos")

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_coco(ann_file):
    """Load a COCO annotation file without pycocotools' chatter on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def to_coco_results(image_id, boxes, scores, labels, label_to_cat_id):
    """Detections of one image -> COCO results entries.

    boxes (N,4) x1,y1,x2,y2 in original image pixels; scores (N,); labels (N,) contiguous
    0-based; label_to_cat_id maps them back to the dataset's category ids.
    """
    results = []
    for (x1, y1, x2, y2), score, label in zip(np.asarray(boxes, np.float64), scores, labels):
        results.append({
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id[int(label)]),
            "bbox": [round(float(x1), 2), round(float(y1), 2),
                     round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
            "score": round(float(score), 5),
        })
    return results


def coco_evaluate(coco_gt, results, output_dir=None, image_ids=None):
    """Score ``results`` (COCO results entries) against ``coco_gt`` (a COCO object).

    Prints the standard 12-line table and returns {key: float} for STAT_KEYS. With
    ``output_dir`` it writes eval_result.json (the stats, plus the detections) atomically.
    ``image_ids`` restricts scoring to the images that were actually run.
    """
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        evaluator.summarize()
        stats = [float(s) for s in evaluator.stats]
    else:
        logger.warning("no detections at all: every COCO metric is 0")
        stats = [0.0] * len(STAT_KEYS)
    metrics = dict(zip(STAT_KEYS, stats))
    if output_dir:
        write_json_atomic(os.path.join(output_dir, "eval_result.json"),
                          {**metrics, "num_detections": len(results), "detections": results})
    return metrics


def write_json_atomic(path, obj):
    """Write JSON so that a crash never leaves a half-written file at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
