"""Convergence: a short CPU training run on synthetic shapes must learn to detect them.

Measured with exactly these settings (64 training images of 128x128, 96 steps, ResNet-18 from
scratch, 32-channel FPN): validation AP50 0.20 (AP 0.07). A broken loss, target assignment or
decoding leaves AP50 near 0, so the bar below keeps a wide margin both ways. The trained
checkpoint is then evaluated in onnxruntime too (eval.py --runtime=onnxruntime): every COCO
statistic within 1e-4 of the MindSpore path's; and through its 8-bit model
(--runtime=onnxruntime_int8, calibrated on the training images): AP50 within INT8_AP50_LOSS of the
float path's and most confident float detections found again (INT8_MATCHED at IoU 0.9).
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from src.evaluation.coco_eval import STAT_KEYS
from src.geometry import iou_one_to_many
from src.inference.runtime import RUNTIMES
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_AP50 = 0.10
# measured 2026-12-07: int8 AP50 0.301, 94% of the float detections scoring >= 0.3 found again at IoU
# 0.9, scores within 0.011 (docs/int8.md); on 16 images one detection more or less moves AP50 by points
INT8_AP50_LOSS = 0.03
INT8_MATCHED = 0.8


def matched_share(reference, candidate, min_score=0.3, min_iou=0.9):
    """Share of reference detections (COCO json entries, score >= min_score) that a candidate detection
    of the same image and category overlaps by IoU >= min_iou, and the largest score difference of
    those matches."""
    def iou(a, b):  # COCO x, y, w, h boxes
        xyxy = [np.array([[x, y, x + w, y + h]], np.float64) for x, y, w, h in (a, b)]
        return float(iou_one_to_many(xyxy[0][0], xyxy[1])[0])
    confident = [d for d in reference if d["score"] >= min_score]
    matched, score_error = 0, 0.0
    for ref in confident:
        best = max((c for c in candidate if (c["image_id"], c["category_id"]) == (ref["image_id"], ref["category_id"])),
                   key=lambda c: iou(ref["bbox"], c["bbox"]), default=None)
        if best is not None and iou(ref["bbox"], best["bbox"]) >= min_iou:
            matched += 1
            score_error = max(score_error, abs(best["score"] - ref["score"]))
    return matched / max(len(confident), 1), score_error


@pytest.mark.slow
def test_short_training_run_detects_synthetic_shapes(tmp_path):
    train_ann = make_synthetic_coco(str(tmp_path / "train"), 64, 128, 128, seed=1, max_objects=3)
    val_ann = make_synthetic_coco(str(tmp_path / "val"), 16, 128, 128, seed=99, max_objects=3)
    out = str(tmp_path / "out")
    common = ["--config_path=configs/synthetic_cpu.yaml", "--min_size=[128]", "--max_size=128",
              "--fpn_out_channels=32", f"--val_img_dir={tmp_path / 'val' / 'images'}", f"--val_ann_file={val_ann}"]
    subprocess.run([sys.executable, "train.py", *common, f"--train_img_dir={tmp_path / 'train' / 'images'}",
                    f"--train_ann_file={train_ann}", f"--output_dir={out}", "--batch_size=8", "--lr_base_batch=8",
                    "--base_lr=0.02", "--epochs=12", "--lr_steps=[10]", "--log_interval=8"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    ckpt = os.path.join(out, "checkpoints", "fcos-12_96.ckpt")
    metrics = {}
    for runtime in [r for r in RUNTIMES if r == "mindspore" or importlib.util.find_spec("onnxruntime")]:
        subprocess.run([sys.executable, "eval.py", *common, f"--ckpt_file={ckpt}", f"--output_dir={out}/{runtime}",
                        f"--runtime={runtime}", f"--train_img_dir={tmp_path / 'train' / 'images'}",
                        f"--train_ann_file={train_ann}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
        with open(os.path.join(out, runtime, "eval_result.json")) as f:
            metrics[runtime] = json.load(f)
    ours = metrics["mindspore"]
    assert ours["AP50"] >= MIN_AP50, ours
    if "onnxruntime" not in metrics:
        pytest.skip("onnxruntime is not installed (optional): the MindSpore path passed, the ONNX one was not run")
    onnx = metrics["onnxruntime"]
    assert onnx["num_images"] == ours["num_images"] == 16
    print({key: (ours[key], onnx[key]) for key in STAT_KEYS})
    for key in STAT_KEYS:
        assert onnx[key] == pytest.approx(ours[key], abs=1e-4), key
    int8 = metrics["onnxruntime_int8"]
    share, score_error = matched_share(ours["detections"], int8["detections"])
    print("int8 AP50", int8["AP50"], "AP", int8["AP"], "matched", share, "score error", score_error)
    assert int8["AP50"] >= ours["AP50"] - INT8_AP50_LOSS
    assert share >= INT8_MATCHED
