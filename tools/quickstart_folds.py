"""Leave-one-image-out validation of the quick start: for every held-out source image and seed,
train on the other images with the quick-start recipe and score on the held-out one.

    python -m tools.quickstart_folds --out output/folds [--held_out OSBS_029 ...] [--seeds 1 2 3]
        [--config_path configs/deepforest_cpu.yaml] [--key=value ...]

Runs train.py and eval.py (the quick start's own steps) once per fold and seed, one after the
other; any further --key=value goes to both. Every fold trains the same number of steps as the
configuration does on its own split (its epochs x batches an epoch), so that folds whose training
images cut fewer windows an epoch are not trained less. The held-out image is scored at its own
resolution, whole or (larger than tools.make_deepforest.VAL_TILE_MAX) as a grid of tiles.
Prints one line per run and a table; writes <out>/summary.json. Logs: <out>/<fold>/seed<s>/.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from src.data.coco import CocoDataset
from src.data.pipeline import window_samples
from src.data.synthetic_crowns import CrownStands
from src.engine.checkpoint import newest_checkpoint
from src.config import load_config
from tools.make_deepforest import held_out_fold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches_per_epoch(img_dir, ann_file, cfg):
    """Training batches an epoch of ``cfg`` (window mode, procedural stands included) on one
    annotation file."""
    coco = CocoDataset(img_dir, ann_file)
    real = len(window_samples(coco, coco.image_ids, cfg.train_window))
    return (real + CrownStands(cfg.synthetic_crowns, 1).count(real)) // cfg.batch_size


def eval_size_overrides(ann_file):
    """--min_size/--max_size that score every validation image at (within a pixel of) its own
    resolution: the shortest short side and the longest long side."""
    images = json.load(open(ann_file, encoding="utf-8"))["images"]
    short = min(min(img["height"], img["width"]) for img in images)
    long = max(max(img["height"], img["width"]) for img in images)
    return [f"--min_size=[{short}]", f"--max_size={long}"]


def run(args, log_path):
    """Run a python script of the repository, its output to log_path; exit on failure."""
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {code}), see {log_path}")


def prepare_fold(stem, voc_dir, out_dir, config_path, cfg, steps, extra):
    """Write one fold's split (once for all its seeds) -> (fold folder, train.py/eval.py arguments
    without the seed, training epochs)."""
    fold_dir = os.path.join(out_dir, stem)
    train_dir, val_dir = held_out_fold(voc_dir, stem, os.path.join(fold_dir, "data"))
    train_ann = os.path.join(fold_dir, "data", "annotations", "train.json")
    val_ann = os.path.join(fold_dir, "data", "annotations", "val.json")
    epochs = math.ceil(steps / batches_per_epoch(train_dir, train_ann, cfg))
    common = [f"--config_path={config_path}", f"--train_img_dir={train_dir}", f"--train_ann_file={train_ann}",
              f"--val_img_dir={val_dir}", f"--val_ann_file={val_ann}", *eval_size_overrides(val_ann), *extra]
    return fold_dir, common, epochs


def run_fold(fold_dir, seed, common, epochs):
    """Train and score one fold and seed -> eval_result.json's metrics."""
    run_dir = os.path.join(fold_dir, f"seed{seed}")
    common = [*common, f"--seed={seed}"]
    os.makedirs(run_dir, exist_ok=True)
    run(["train.py", *common, f"--epochs={epochs}", f"--save_ckpt_epochs={epochs}", f"--output_dir={run_dir}"],
        os.path.join(run_dir, "train.out"))
    ckpt = newest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {run_dir}/checkpoints")
    run(["eval.py", *common, f"--ckpt_file={ckpt}", f"--output_dir={os.path.join(run_dir, 'eval')}"],
        os.path.join(run_dir, "eval.out"))
    with open(os.path.join(run_dir, "eval", "eval_result.json"), encoding="utf-8") as f:
        result = json.load(f)
    return {key: result[key] for key in ("AP50", "AP", "AR100")}


def summarise(results):
    """{fold: {seed: metrics}} -> markdown table lines: per fold mean and range of AP50 and AP over
    seeds, and the mean over folds."""
    lines = ["| held out | AP50 mean (range) | AP mean (range) | seeds |", "|---|---|---|---|"]
    means = []
    for stem, runs in results.items():
        ap50 = np.array([r["AP50"] for r in runs.values()])
        ap = np.array([r["AP"] for r in runs.values()])
        means.append((ap50.mean(), ap.mean()))
        lines.append(f"| {stem} | {ap50.mean():.3f} ({ap50.min():.3f}-{ap50.max():.3f}) | "
                     f"{ap.mean():.3f} ({ap.min():.3f}-{ap.max():.3f}) | {len(runs)} |")
    if len(means) > 1:
        lines.append(f"| mean of folds | {np.mean([m[0] for m in means]):.3f} | {np.mean([m[1] for m in means]):.3f} | |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/folds")
    parser.add_argument("--config_path", default="configs/deepforest_cpu.yaml")
    parser.add_argument("--held_out", nargs="+", default=None,
                        help="source images (file stems) to hold out, one fold each (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    args, extra = parser.parse_known_args(argv)
    cfg = load_config([f"--config_path={args.config_path}", *extra])
    if not cfg.train_window:
        raise SystemExit(f"{args.config_path}: the folds need window-mode training (train_window > 0)")
    voc_dir = os.path.join(ROOT, cfg.train_img_dir)
    steps = cfg.epochs * batches_per_epoch(voc_dir, os.path.join(ROOT, cfg.train_ann_file), cfg)
    stems = args.held_out or sorted(name[:-4] for name in os.listdir(voc_dir) if name.endswith(".xml"))
    out_dir = os.path.abspath(args.out)
    print(f"{len(stems)} folds x {len(args.seeds)} seeds, {steps} steps each, results in {out_dir}", flush=True)
    results = {}
    for stem in stems:
        fold_dir, common, epochs = prepare_fold(stem, voc_dir, out_dir, os.path.abspath(args.config_path), cfg,
                                                steps, extra)
        for seed in args.seeds:
            start = time.time()
            metrics = run_fold(fold_dir, seed, common, epochs)
            results.setdefault(stem, {})[seed] = metrics
            print(f"held out {stem} seed {seed}: AP50 {metrics['AP50']:.3f} AP {metrics['AP']:.3f} "
                  f"AR100 {metrics['AR100']:.3f} ({time.time() - start:.0f} s)", flush=True)
    table = summarise(results)
    print("\n".join(table))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"config": args.config_path, "overrides": extra, "steps": steps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
