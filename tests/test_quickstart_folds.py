"""tools/quickstart_folds.py: leave-one-image-out runs of the quick start, end to end on the real
DeepForest sample (a few steps of small windows), and its step and size bookkeeping."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, pycocotools_stats
from tools.make_deepforest import held_out_fold
from tools.quickstart_folds import eval_size_overrides

CONFIG = os.path.join(ROOT, "configs", "deepforest_cpu.yaml")


def test_eval_sizes_keep_tiles_at_their_own_resolution(deepforest_voc, tmp_path):
    held_out_fold(deepforest_voc, "2019_YELL_2_541000_4977000_image_crop", str(tmp_path))
    assert eval_size_overrides(str(tmp_path / "annotations" / "val.json")) == ["--min_size=[345]", "--max_size=417"]


@pytest.mark.slow
def test_one_fold_trains_on_the_other_images_and_scores_the_held_out_one(tmp_path):
    # 160-pixel windows: the configuration's split cuts 50 + 6 windows an epoch and adds as many
    # procedural stands (synthetic_crowns 0.5; 28 batches of 4), the SOAP fold's YELL + OSBS as
    # many, so one epoch each way.
    out = tmp_path / "folds"
    result = subprocess.run(
        [sys.executable, "-m", "tools.quickstart_folds", "--out", str(out), "--held_out", "SOAP_061", "--seeds", "3",
         "--config_path", CONFIG, "--epochs=1", "--train_window=160", "--num_parallel_workers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 folds x 1 seeds, 28 steps each" in result.stdout
    assert "| SOAP_061 |" in result.stdout
    summary = json.load(open(out / "summary.json"))
    metrics = summary["results"]["SOAP_061"]["3"]
    assert summary["steps"] == 28
    train = json.load(open(out / "SOAP_061" / "data" / "annotations" / "train.json"))
    assert sorted(img["file_name"] for img in train["images"]) == [
        "2019_YELL_2_541000_4977000_image_crop.png", "OSBS_029.png"]
    run_dir = out / "SOAP_061" / "seed3"
    log = open(run_dir / "train.out").read()
    assert "28 steps" in log and "56 procedural tree-crown stands an epoch" in log
    evaluated = json.load(open(run_dir / "eval" / "eval_result.json"))
    assert evaluated["num_images"] == 1 and evaluated["AP50"] == metrics["AP50"]
    # every statistic is what pycocotools gives the held-out image's written detections
    reference = pycocotools_stats(str(out / "SOAP_061" / "data" / "annotations" / "val.json"),
                                  evaluated["detections"])
    # (one epoch scores 0 here: the -1 of the area ranges without objects still place every key)
    assert {key: evaluated[key] for key in reference} == pytest.approx(reference, abs=1e-9)
