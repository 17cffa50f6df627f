"""Data-parallel training proven on CPU: two workers under a real msrun against one process.

Two ranks with batch b must train, step by step, on the global batch that one process with
batch 2b trains on (each rank a disjoint half), stay bit-identical to each other, report per
rank losses that average to that one process's loss at every step, and after the first steps
hold that process's parameters up to float round-off (sums are split across ranks and the
gradients averaged). BatchNorm is frozen so that per-device and global batches normalise alike.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from src.engine.checkpoint import load_checkpoint_file, split_meta
from src.tools.synthetic import make_synthetic_coco

pytestmark = pytest.mark.slow

PER_RANK_BATCH = 2
WORKERS = 2
EPOCHS = 2
NUM_IMAGES = 16
# Parameters are compared after COMPARED_STEPS steps. Measured (max |single - 2 ranks| over
# weights and SGD momenta, after each step): 1.1e-7, 3.7e-7, 3.7e-7, 4.0e-7, 3.7e-7, 4.2e-7,
# 4.4e-7, then 1.3e-3 after step 8 on one machine; on another the same jump came at step 3 (see
# src/model/fpn.py). The jump is one step's gradient changing while both runs' losses still agree:
# batch-2 and batch-4 kernels round differently, and a training step from scratch can turn such a
# 1e-7 difference into a different update. So the exact comparison covers the first two steps,
# which already prove sharding, the loss's global normaliser and gradient averaging; the losses
# are compared at every step.
PARAM_TOLERANCE = 1e-5
COMPARED_STEPS = 2
LOSS_LINE = re.compile(r"\(global (\d+)\) loss ([\d.]+) ")
PLAN_LINE = re.compile(r"epoch (\d+): image ids of the \d+ batches of rank (\d+): (\[.*\])$")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data_dir, output_dir, batch_size):
    """train.py flags of a tiny run: resnet18, 32-channel FPN, 64x64 images, frozen BatchNorm."""
    return [f"--config_path={os.path.join(ROOT, 'configs', 'synthetic_cpu.yaml')}",
            f"--train_img_dir={os.path.join(data_dir, 'images')}",
            f"--train_ann_file={os.path.join(data_dir, 'annotations.json')}",
            f"--output_dir={output_dir}", f"--batch_size={batch_size}", f"--epochs={EPOCHS}",
            "--backbone=resnet18", "--pretrained=False", "--class_num=3", "--fpn_out_channels=32",
            "--freeze_bn=True", "--min_size=[64]", "--max_size=64",
            "--max_gt_boxes=6", "--flip_prob=0.5", "--warmup_iters=0", "--lr_base_batch=4",
            "--log_interval=1", "--num_parallel_workers=1", "--save_ckpt_all_ranks=True",
            "--log_batch_ids=True", "--save_ckpt_steps=1", "--keep_ckpt_max=10"]


def run(cmd, log_path, timeout):
    """Run cmd from the repository root with its output in log_path -> (exit code, output)."""
    # msrun starts its workers as `python`: make that this interpreter.
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # msrun's workers and scheduler too
            raise
    with open(log_path, encoding="utf-8") as log:
        return code, log.read()


def batch_plans(log_file):
    """{epoch: [[image ids of step 1], ...]} from a train log written with --log_batch_ids."""
    plans = {}
    with open(log_file, encoding="utf-8") as log:
        for line in log:
            match = PLAN_LINE.search(line.rstrip())
            if match:
                plans[int(match.group(1))] = json.loads(match.group(3))
    return plans


def load_params(path):
    """{name: float64 array} of the weights and optimiser state in a train.py checkpoint."""
    params, _ = split_meta(load_checkpoint_file(path))
    return {name: p.asnumpy().astype(np.float64) for name, p in params.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train the same steps twice: msrun with 2 workers of batch 2, then one process of batch 4."""
    root = tmp_path_factory.mktemp("distributed")
    data_dir = str(root / "data")
    make_synthetic_coco(data_dir, NUM_IMAGES, 64, 64, seed=3)
    dist_dir, single_dir = str(root / "dist"), str(root / "single")
    os.makedirs(dist_dir)
    os.makedirs(single_dir)
    # The msrun command is this module's entry point.
    msrun = [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={WORKERS}",
             f"--local_worker_num={WORKERS}", f"--master_port={free_port()}",
             f"--log_dir={os.path.join(dist_dir, 'msrun_log')}", "--join=True", "train.py",
             *train_args(data_dir, dist_dir, PER_RANK_BATCH)]
    dist = run(msrun, os.path.join(dist_dir, "msrun.out"), timeout=300)
    single = run([sys.executable, "train.py", *train_args(data_dir, single_dir, PER_RANK_BATCH * WORKERS)],
                 os.path.join(single_dir, "train.out"), timeout=200)
    return {"dist": dist, "single": single, "dist_dir": dist_dir, "single_dir": single_dir}


def final_checkpoint(folder):
    steps = NUM_IMAGES // (PER_RANK_BATCH * WORKERS) * EPOCHS
    return os.path.join(folder, "checkpoints", f"fcos-{EPOCHS}_{steps}.ckpt")


def test_both_ranks_finish(runs):
    code, output = runs["dist"]
    assert code == 0, output[-3000:]
    steps = NUM_IMAGES // (PER_RANK_BATCH * WORKERS) * EPOCHS
    for rank in range(WORKERS):
        with open(os.path.join(runs["dist_dir"], "msrun_log", f"worker_{rank}.log"), encoding="utf-8") as log:
            text = log.read()
        assert f"rank {rank}/{WORKERS}" in text
        assert f"training finished: {steps} steps, 0 skipped" in text
    assert runs["single"][0] == 0, runs["single"][1][-3000:]


def test_ranks_split_each_global_batch(runs):
    rank_logs = [os.path.join(runs["dist_dir"], "train.log" if rank == 0 else f"train_rank{rank}.log")
                 for rank in range(WORKERS)]
    per_rank = [batch_plans(path) for path in rank_logs]
    single = batch_plans(os.path.join(runs["single_dir"], "train.log"))
    assert sorted(single) == list(range(1, EPOCHS + 1))
    for epoch, global_batches in single.items():
        seen = [image_id for plan in per_rank for batch in plan[epoch] for image_id in batch]
        assert len(seen) == len(set(seen)) == NUM_IMAGES  # disjoint shards covering the epoch
        for step, global_batch in enumerate(global_batches):
            halves = [plan[epoch][step] for plan in per_rank]
            assert all(len(half) == PER_RANK_BATCH for half in halves)
            assert sorted(sum(halves, [])) == sorted(global_batch)
    assert single[1] != single[2]  # a new order every epoch


def test_ranks_stay_identical(runs):
    rank0 = load_params(final_checkpoint(runs["dist_dir"]))
    rank1 = load_params(final_checkpoint(os.path.join(runs["dist_dir"], "rank_1")))
    assert rank0.keys() == rank1.keys()
    for name, value in rank0.items():
        np.testing.assert_array_equal(value, rank1[name], err_msg=name)


def step_losses(log_file):
    """{global step: logged total loss} of a train log."""
    with open(log_file, encoding="utf-8") as log:
        return {int(m.group(1)): float(m.group(2)) for m in map(LOSS_LINE.search, log) if m}


def test_rank_losses_average_to_the_one_process_loss(runs):
    ranks = [step_losses(os.path.join(runs["dist_dir"], "train.log" if rank == 0 else f"train_rank{rank}.log"))
             for rank in range(WORKERS)]
    single = step_losses(os.path.join(runs["single_dir"], "train.log"))
    assert sorted(single) == list(range(1, NUM_IMAGES // (PER_RANK_BATCH * WORKERS) * EPOCHS + 1))
    for step, loss in single.items():
        # each rank logs its half's loss over the global normaliser x ranks; 4 decimals in the log
        assert abs(np.mean([r[step] for r in ranks]) - loss) <= 2e-4, step


def test_two_ranks_match_one_process(runs):
    def after(folder, step):
        return load_params(os.path.join(folder, "checkpoints", f"fcos-0_{step}.ckpt"))

    dist = after(runs["dist_dir"], COMPARED_STEPS)
    single = after(runs["single_dir"], COMPARED_STEPS)
    assert dist.keys() == single.keys()
    diff = max(float(np.abs(dist[k] - single[k]).max()) for k in single)
    assert diff <= PARAM_TOLERANCE, diff
    before = after(runs["single_dir"], COMPARED_STEPS - 1)
    moved = max(float(np.abs(before[k] - single[k]).max()) for k in single if not k.startswith("moments."))
    assert moved > 100 * PARAM_TOLERANCE  # the last compared step moved weights far beyond the tolerance
