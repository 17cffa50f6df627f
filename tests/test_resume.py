"""Faults: a run killed with SIGKILL resumes from its last checkpoint and ends with the step count,
learning-rate schedule and weights of an uninterrupted run; SIGTERM saves and exits cleanly."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

from src.engine.checkpoint import load_checkpoint_file, split_meta
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, IMAGES, BATCH = 3, 8, 2  # 4 steps per epoch, 12 in all


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    ann = make_synthetic_coco(str(out), IMAGES, 64, 64, seed=3, max_objects=2)
    return os.path.join(str(out), "images"), ann


def _train_cmd(shapes, out, *extra):
    img_dir, ann = shapes
    return [sys.executable, "train.py", "--config_path=configs/synthetic_cpu.yaml", f"--train_img_dir={img_dir}",
            f"--train_ann_file={ann}", f"--output_dir={out}", "--min_size=[64]", "--max_size=64",
            f"--batch_size={BATCH}", f"--epochs={EPOCHS}", "--fpn_out_channels=32", "--num_head_convs=1",
            "--warmup_iters=5", "--lr_steps=[2]", "--log_interval=1", "--save_ckpt_steps=1",
            "--keep_ckpt_max=20", "--num_parallel_workers=1", "--flip_prob=0.5", *extra]


def _final(out):
    path = sorted(glob.glob(os.path.join(out, "checkpoints", "fcos-*.ckpt")), key=os.path.getmtime)[-1]
    params, meta = split_meta(load_checkpoint_file(path))
    return params, meta


def _logged_lrs(out):
    text = open(os.path.join(out, "train.log")).read()
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"step \d+/\d+ .*?\(global (\d+)\).*? lr ([0-9.e-]+)", text)}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(shapes, tmp_path):
    ref_out, cut_out = str(tmp_path / "ref"), str(tmp_path / "cut")
    subprocess.run(_train_cmd(shapes, ref_out), cwd=ROOT, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(shapes, cut_out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not glob.glob(os.path.join(cut_out, "checkpoints", "fcos-*_6.ckpt")):  # mid epoch 2
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = sorted(glob.glob(os.path.join(cut_out, "checkpoints", "fcos-*.ckpt")), key=os.path.getmtime)[-1]
    subprocess.run(_train_cmd(shapes, cut_out, f"--resume={latest}"), cwd=ROOT, check=True,
                   capture_output=True, timeout=600)

    ref_params, ref_meta = _final(ref_out)
    cut_params, cut_meta = _final(cut_out)
    assert ref_meta == cut_meta == {"epoch": EPOCHS, "step_in_epoch": 0, "global_step": EPOCHS * IMAGES // BATCH,
                                   "global_batch": BATCH}
    assert int(cut_params["global_step"].asnumpy().item()) == EPOCHS * IMAGES // BATCH  # optimiser's lr index
    worst = max(float(np.abs(ref_params[k].asnumpy() - cut_params[k].asnumpy()).max())
                for k in ref_params if k.startswith(("backbone", "fpn", "head")))
    assert worst < 1e-4, worst
    assert _logged_lrs(cut_out) == pytest.approx(_logged_lrs(ref_out))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(shapes, tmp_path):
    out = str(tmp_path / "term")
    # Periodic checkpoints off: at ~0.1 s/step an epoch can end (and save) before the signal lands.
    cmd = _train_cmd(shapes, out, "--save_ckpt_steps=0", "--save_ckpt_epochs=0", "--epochs=50")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "train.log")
    deadline = time.time() + 400
    while not (os.path.exists(log) and "step 2/" in open(log).read()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    saved = glob.glob(os.path.join(out, "checkpoints", "fcos-*.ckpt"))
    assert len(saved) == 1
    _, meta = split_meta(ms.load_checkpoint(saved[0]))
    assert meta["global_step"] >= 2 and meta["epoch"] == meta["global_step"] // (IMAGES // BATCH)
