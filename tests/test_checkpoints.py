"""Checkpoints belong to the run that wrote them (src/engine/checkpoint.py): rotation removes only
this run's files, another run's are never overwritten, best.ckpt keeps the best AP across resumes,
and a save killed mid-write leaves loadable checkpoints and, after the next start, no temporaries."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mindspore import Tensor, nn

from src.engine.checkpoint import (CheckpointKeeper, load_checkpoint_file, read_best_ap, save_best,
                                   split_meta)
from src.engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Net(nn.Cell):
    def __init__(self, width=4):
        super().__init__()
        self.dense = nn.Dense(width, width)

    def construct(self, x):
        return self.dense(x)


def _names(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))


def _weights(path):
    params, meta = split_meta(load_checkpoint_file(path))
    (weight,) = [value for name, value in params.items() if name.endswith("weight")]
    return weight.asnumpy(), meta


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_checkpoints(tmp_path):
    """Mutation caught: rotation over every fcos-*.ckpt of the folder (the first run's newest went)."""
    folder = str(tmp_path / "checkpoints")
    first = CheckpointKeeper(folder, keep=2)
    for step in (10, 20, 30):
        first.save(_Net(), 1, 0, step, 2)
    assert _names(folder) == ["fcos-1_20.ckpt", "fcos-1_30.ckpt"]  # its own rotation
    kept = {name: os.path.getmtime(os.path.join(folder, name)) for name in _names(folder)}

    second = CheckpointKeeper(folder, keep=2)  # a new run: steps start again at the bottom
    paths = [second.save(_Net(), 1, 0, step, 2) for step in (1, 2, 3)]
    assert second.latest() == paths[-1] and os.path.basename(paths[-1]) == "fcos-1_3.ckpt"
    assert _names(folder) == ["fcos-1_2.ckpt", "fcos-1_20.ckpt", "fcos-1_3.ckpt", "fcos-1_30.ckpt"]
    for name, mtime in kept.items():
        assert os.path.getmtime(os.path.join(folder, name)) == mtime


def test_a_resume_on_a_larger_batch_never_overwrites_or_deletes_the_old_files(tmp_path):
    """The resumed run's global steps restart lower (epoch x fewer steps per epoch) and can hit an
    old name. Mutation caught: saving over an existing name (the old run's weights replaced)."""
    folder = str(tmp_path / "checkpoints")
    old = CheckpointKeeper(folder, keep=5)
    old_net = _Net()
    old.save(old_net, 2, 0, 8, 2)
    old_weights, _ = _weights(os.path.join(folder, "fcos-2_8.ckpt"))

    resumed = CheckpointKeeper(folder, keep=1)
    new_net = _Net()
    new_net.dense.weight.set_data(Tensor(np.full((4, 4), 7.0, np.float32)))
    first = resumed.save(new_net, 2, 0, 8, 4)  # the same name as the old run's
    second = resumed.save(new_net, 3, 0, 12, 4)
    assert os.path.basename(first) == "fcos-2_8-1.ckpt" and not os.path.exists(first)  # rotated away
    np.testing.assert_array_equal(_weights(os.path.join(folder, "fcos-2_8.ckpt"))[0], old_weights)
    assert _weights(second)[1]["global_batch"] == 4
    assert _names(folder) == ["fcos-2_8.ckpt", "fcos-3_12.ckpt"]


class _Step(nn.Cell):
    """A train step's shape as Trainer sees it: a cell holding the network."""

    def __init__(self):
        super().__init__()
        self.network = _Net()

    def construct(self, x):
        return self.network(x)


def _trainer(out, aps):
    results = iter(aps)
    return Trainer(_Step(), steps_per_epoch=1, epochs=10, global_batch=2, lr_schedule=[0.1] * 10,
                   output_dir=out, eval_interval=1, evaluate=lambda: {"AP": next(results)})


def test_best_ckpt_survives_a_worse_evaluation_after_a_resume(tmp_path):
    """Mutation caught: best_ap starting at -1 in every run (a resumed run's first, worse,
    evaluation replaced best.ckpt)."""
    out = str(tmp_path)
    run = _trainer(out, [0.30, 0.45, 0.40])
    for _ in range(3):
        run.epoch += 1
        run._end_of_epoch()
    best = os.path.join(out, "checkpoints", "best.ckpt")
    assert read_best_ap(best) == pytest.approx(0.45)
    written, meta = _weights(best)
    assert meta["epoch"] == 2

    resumed = _trainer(out, [0.20, 0.50])
    assert resumed.best_ap == pytest.approx(0.45)
    resumed.epoch = 3
    resumed._end_of_epoch()  # 0.20: kept
    np.testing.assert_array_equal(_weights(best)[0], written)
    resumed.epoch = 4
    resumed._end_of_epoch()  # 0.50: replaced
    assert read_best_ap(best) == pytest.approx(0.50) and _weights(best)[1]["epoch"] == 4


def test_best_ap_round_trips_and_an_old_best_without_ap_reads_as_none(tmp_path):
    path = str(tmp_path / "best.ckpt")
    assert read_best_ap(path) == -1.0
    save_best(_Net(), path, 0.123456, {"epoch": 1})
    assert read_best_ap(path) == pytest.approx(0.123456, abs=1e-6)
    CheckpointKeeper(str(tmp_path)).save(_Net(), 1, 0, 1, 2)
    assert read_best_ap(str(tmp_path / "fcos-1_1.ckpt")) == -1.0


SAVER = """
import sys, numpy as np
from mindspore import Tensor, nn
from src.engine.checkpoint import CheckpointKeeper
net = nn.Dense(1024, 2048)  # 8 MB: a save takes long enough to be cut
keeper = CheckpointKeeper(sys.argv[1], keep=3)
step = 0
while True:
    step += 1
    net.weight.set_data(Tensor(np.full((2048, 1024), step, np.float32)))
    keeper.save(net, 1, 0, step, 2)
    print(step, flush=True)
"""


def test_sigkill_during_a_save_leaves_loadable_checkpoints_and_the_next_start_cleans_up(tmp_path):
    """Kills a saving process while its temporary file exists (three times); every fcos-*.ckpt left
    must load whole, and a new keeper on the folder removes the dead writer's temporaries (ours and
    MindSpore's own). Mutation caught: no cleanup on start (the .tmp files stay for good)."""
    folder = str(tmp_path / "checkpoints")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, folder], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        proc.stdout.readline()  # one save done: the module is loaded
        deadline = time.time() + 60
        while not glob.glob(os.path.join(folder, "*.tmp*")):
            assert proc.poll() is None and time.time() < deadline, "the saver stopped"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert [name for name in _names(folder) if ".tmp" in name]
        CheckpointKeeper(folder)  # the next run's start
        assert not [name for name in _names(folder) if ".tmp" in name]
        for path in glob.glob(os.path.join(folder, "fcos-*.ckpt")):
            weights, meta = _weights(path)
            assert weights.shape == (2048, 1024) and meta["global_step"] >= 1
            assert np.all(weights == weights.flat[0])  # one save's values throughout


def test_newest_checkpoint_is_the_last_written_of_any_run(tmp_path):
    from src.engine.checkpoint import newest_checkpoint

    folder = str(tmp_path)
    assert newest_checkpoint(folder) is None
    CheckpointKeeper(folder).save(_Net(), 3, 0, 30, 2)
    time.sleep(0.05)
    later = CheckpointKeeper(folder).save(_Net(), 1, 0, 2, 2)  # a later run, lower step
    assert newest_checkpoint(folder) == later
