"""Precompiling and the compile cache: the folder digest covers what decides a graph, a second
process loads the stored graphs and computes the same numbers, graphs outside the plan are never
stored, and train.py started twice trains bit for bit the same with its graphs loaded."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

# A child process: one small cell, precompiled for two input shapes (cached under argv[1]), then
# run on both and on a third, unplanned shape; prints the outcome and the outputs as JSON.
CHILD = r"""
import json, sys
import src
import mindspore as ms
import numpy as np
from mindspore import nn
from src.engine.compile_cache import PlannedGraph, precompile

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_seed(int(sys.argv[2]))

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=True)
    def construct(self, x):
        return self.conv(x).sum(axis=(2, 3))

net = Net()
shapes = [(1, 3, 8, 8), (2, 3, 6, 10)]
outcome = precompile([PlannedGraph(net, [(s, np.float32)], training=False) for s in shapes],
                     {"class_num": 4}, sys.argv[1])
again = precompile([PlannedGraph(net, [(shapes[0], np.float32)], training=False)], {"class_num": 4}, sys.argv[1])
rng = np.random.default_rng(0)
outs = [net(ms.Tensor(rng.standard_normal(s).astype(np.float32))).asnumpy().tolist()
        for s in shapes + [(1, 3, 5, 5)]]
print("RESULT " + json.dumps({"outcome": outcome, "again": again, "outs": outs}))
"""


def run_child(cache_root, seed):
    script = os.path.join(os.path.dirname(str(cache_root)), "child.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(CHILD)
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, script, str(cache_root), str(seed)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def graph_files(cache_root):
    return sorted(os.path.relpath(os.path.join(d, f), cache_root) for d, _, files in os.walk(cache_root)
                  for f in files if f.endswith(".mindir"))


def test_digest_follows_what_decides_the_graphs():
    import mindspore as ms
    from mindspore import nn

    from src.engine.compile_cache import PlannedGraph, plan_digest

    ms.set_context(mode=ms.GRAPH_MODE)

    def digest(cfg, shape=(1, 3, 8, 8), out_channels=4, training=False):
        cell = nn.Conv2d(3, out_channels, 3)
        return plan_digest(cfg, [PlannedGraph(cell, [(shape, np.float32)], training)])

    cfg = {"class_num": 4, "output_dir": "a", "ckpt_file": "x.ckpt"}
    base = digest(cfg)
    assert digest(dict(cfg)) == base
    assert digest(dict(cfg, output_dir="b", ckpt_file="y.ckpt")) == base  # where things live: same graphs
    assert digest(dict(cfg, class_num=5)) != base
    assert digest(cfg, shape=(1, 3, 8, 16)) != base
    assert digest(cfg, out_channels=5) != base
    assert digest(cfg, training=True) != base


def test_second_process_loads_the_graphs_and_agrees(tmp_path):
    cache_root = tmp_path / "cache"
    first = run_child(cache_root, seed=1)
    assert first["outcome"] == "stored"
    assert first["again"] == "compiled"  # MindSpore numbers cached graphs per process: one use only
    files = graph_files(cache_root)
    assert len(files) == 2, files  # the unplanned third shape was not stored
    assert not [p for p in os.listdir(cache_root) if ".tmp-" in p]

    second = run_child(cache_root, seed=1)
    assert second["outcome"] == "loaded"
    assert graph_files(cache_root) == files
    np.testing.assert_array_equal(np.array(second["outs"][0]), np.array(first["outs"][0]))
    np.testing.assert_array_equal(np.array(second["outs"][1]), np.array(first["outs"][1]))
    np.testing.assert_array_equal(np.array(second["outs"][2]), np.array(first["outs"][2]))

    # Other weights, same graphs: the cache holds no weights.
    other = run_child(cache_root, seed=2)
    assert other["outcome"] == "loaded"
    fresh = run_child(tmp_path / "fresh", seed=2)
    assert fresh["outcome"] == "stored"
    assert other["outs"] == fresh["outs"]
    assert other["outs"] != first["outs"]


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "tools.synthetic", "--out", str(out), "--num_images", "8",
                    "--size", "256", "256"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.slow
def test_train_twice_loads_its_graphs_and_trains_the_same(tmp_path, shapes_set):
    images, ann = str(shapes_set / "images"), str(shapes_set / "annotations.json")
    cmd = [sys.executable, "train.py", "--config_path", "configs/synthetic_cpu.yaml", "--train_img_dir", images,
           "--train_ann_file", ann, "--val_img_dir", images, "--val_ann_file", ann, "--eval_interval", "1",
           "--epochs", "1", "--output_dir", str(tmp_path / "run")]
    logs, stderrs = [], []
    for _ in range(2):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        logs.append(done.stdout)
        stderrs.append(done.stderr)
    # the first run's empty-cache warnings are MindSpore's, not actionable (src/__init__.py)
    assert "Open the hash file" not in stderrs[0] + logs[0]
    ready = [re.search(r"(\d+) graphs ready in ([\d.]+) s \((\w+) ", log) for log in logs]
    assert [m.group(1) for m in ready] == ["2", "2"]  # the training step and the evaluation
    assert [m.group(3) for m in ready] == ["stored", "loaded"]
    assert float(ready[1].group(2)) < float(ready[0].group(2)) / 3

    def numbers(log):
        losses = re.findall(r"loss ([\d.]+) \(cls ([\d.]+) reg ([\d.]+) ctr ([\d.]+)\)", log)
        stats = re.findall(r"Average Precision.*= ([-\d.]+)", log)
        return losses, stats

    assert numbers(logs[0])[0] and numbers(logs[0])[1]
    assert numbers(logs[1]) == numbers(logs[0])
    # two runs into one output folder: each run's checkpoint and each evaluation's result kept
    run_dir = tmp_path / "run"
    assert len(list((run_dir / "checkpoints").glob("fcos-*.ckpt"))) == 2
    assert len(list((run_dir / "train_eval").glob("*/eval_result.json"))) == 2
