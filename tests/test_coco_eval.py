"""The metric path: ground truth fed back as detections scores AP 1.0 through real pycocotools, and
faster_coco_eval gives pycocotools' statistics on real boxes."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT
from src.evaluation.coco_eval import STAT_KEYS, coco_evaluate, load_coco, to_coco_results


def _write_gt(path):
    images = [{"id": 7, "file_name": "a.jpg", "height": 200, "width": 300},
              {"id": 9, "file_name": "b.jpg", "height": 200, "width": 300},
              {"id": 11, "file_name": "empty.jpg", "height": 200, "width": 300}]
    anns, boxes = [], {7: [[10, 20, 50, 60, 1], [100, 50, 120, 90, 3]], 9: [[5, 5, 200, 150, 3]]}
    for image_id, rows in boxes.items():
        for x1, y1, x2, y2, cat in rows:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]  # non-contiguous ids
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return boxes


def test_ground_truth_as_detections_scores_ap_one(tmp_path):
    ann = tmp_path / "gt.json"
    boxes = _write_gt(ann)
    label_to_cat_id = {0: 1, 1: 3}
    results = []
    for image_id, rows in boxes.items():
        arr = np.array(rows, dtype=np.float32)
        labels = np.where(arr[:, 4] == 1, 0, 1)
        results += to_coco_results(image_id, arr[:, :4], np.ones(len(arr)), labels, label_to_cat_id)
    metrics = coco_evaluate(load_coco(str(ann)), results, str(tmp_path), image_ids=[7, 9, 11])
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0 and metrics["AR100"] == 1.0
    saved = json.loads((tmp_path / "eval_result.json").read_text())
    assert all(saved[k] == metrics[k] for k in STAT_KEYS)
    assert len(saved["detections"]) == 3 and saved["detections"][0]["category_id"] == 1


def test_wrong_class_or_shifted_box_lowers_ap(tmp_path):
    ann = tmp_path / "gt.json"
    _write_gt(ann)
    label_to_cat_id = {0: 1, 1: 3}
    shifted = to_coco_results(7, np.array([[30, 40, 70, 80]], np.float32), [0.9], [0], label_to_cat_id)
    wrong = to_coco_results(9, np.array([[5, 5, 200, 150]], np.float32), [0.9], [0], label_to_cat_id)
    metrics = coco_evaluate(load_coco(str(ann)), shifted + wrong)
    assert metrics["AP"] < 0.5


def test_no_detections_gives_zeros(tmp_path):
    ann = tmp_path / "gt.json"
    _write_gt(ann)
    metrics = coco_evaluate(load_coco(str(ann)), [], str(tmp_path))
    assert set(metrics) == set(STAT_KEYS) and all(v == 0.0 for v in metrics.values())


def _jittered_detections(coco, seed):
    """Detections near the real tree crowns (shifted, rescaled, some missed), plus false alarms,
    with random scores: a realistic mix of true and false positives over every area range."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in coco.dataset["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, 0.15, 2) * (w, h)
        sw, sh = np.exp(rng.normal(0, 0.2, 2))
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [float(x + dx), float(y + dy), float(w * sw), float(h * sh)],
                        "score": float(rng.random())})
    for image_id in coco.getImgIds():
        for _ in range(20):
            x, y = rng.uniform(0, 350, 2)
            w, h = rng.uniform(4, 120, 2)
            results.append({"image_id": image_id, "category_id": 1, "bbox": [float(x), float(y), float(w), float(h)],
                            "score": float(rng.random() * 0.5)})
    return results


def test_faster_coco_eval_gives_pycocotools_statistics():
    pytest.importorskip("faster_coco_eval")
    for split in ("train", "val"):
        coco = load_coco(os.path.join(ROOT, "data", "deepforest", "annotations", f"{split}.json"))
        results = _jittered_detections(coco, seed=len(split))
        subset = coco.getImgIds()[1:]
        for image_ids in (None, subset):
            theirs = coco_evaluate(coco, results, image_ids=image_ids, backend="pycocotools")
            ours = coco_evaluate(coco, results, image_ids=image_ids, backend="faster_coco_eval")
            assert 0.05 < theirs["AP"] < 0.95  # not a trivial all-or-nothing case
            for key in STAT_KEYS:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-12), (split, key)


def test_scoring_benchmark_reports_both_backends_agreeing(capsys):
    pytest.importorskip("faster_coco_eval")
    from tools.benchmark.coco import main

    main(["--num_images", "40"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_images"] == 40 and report["num_gt"] == 280
    assert set(report["seconds"]) == {"pycocotools", "faster_coco_eval"}
    assert report["max_stat_difference"] <= 1e-12
    assert 0.05 < report["AP"] < 0.95
