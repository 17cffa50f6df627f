"""tools/benchmark/run.py: the tool runs every mode on a small config and reports the documented
JSON line; its timing, compile counting and synthetic ground truth are right. No timing
assertions: the machine is shared."""
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import src  # noqa: F401
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from conftest import ROOT
from src.builder import build_model
from src.config import load_config
from tools.benchmark.common import RESULT_KEYS, summarise, synthetic_ground_truth
from tools.benchmark.convs import layer_spec
from tools.benchmark.run import default_input_shape, time_cell

SMALL = ["--config_path=configs/synthetic_cpu.yaml", "--backbone=resnet18", "--fpn_out_channels=32",
         "--num_head_convs=1", "--batch_size=2", "--height=64", "--width=96", "--steps=2", "--warmup=1",
         "--compile_cache=False"]
REPORT_KEYS = set(RESULT_KEYS) | {"parts", "framework", "mode", "batch_size", "input", "steps", "warmup",
                                  "config", "versions"}


# Runs its arguments as a child and prints the child's peak RSS (KiB, from the OS) last on stderr.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_benchmark(*args, timeout=240, env=None):
    """python -m tools.benchmark args... -> (stdout lines, the JSON of the last one, Measured):
    the run's wall time and peak RSS as measured from outside, the references for its report."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "tools.benchmark", *args],
                          cwd=ROOT, text=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)
    wall_s = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    peak_mb = int(done.stderr.strip().splitlines()[-1]) / 1024.0
    return lines, json.loads(lines[-1]), Measured(wall_s, peak_mb)


class Measured(NamedTuple):
    wall_s: float
    peak_rss_mb: float

    def check(self, result, steps):
        """The report's times fit inside the run's wall time (seconds, not milliseconds), a timed
        step takes at least 0.1 ms (not seconds divided down), and its peak RSS is the one the OS
        saw (MiB, not KiB or bytes)."""
        assert result["compile_s"] + steps * result["min_s"] <= self.wall_s
        assert result["median_s"] >= 1e-4
        assert result["images_per_s"] == pytest.approx(result["batch_size"] / result["median_s"], rel=1e-2)
        assert self.peak_rss_mb * 0.8 <= result["peak_rss_mb"] <= self.peak_rss_mb + 0.05  # reported to 0.1 MiB


@pytest.mark.parametrize("mode, parts", [("infer", {"graph", "select"}), ("train", set()), ("data", set())])
def test_each_mode_prints_a_table_and_the_json_line_last(mode, parts):
    # train as train.py runs it by default (oneDNN convolutions, the ISA cap lifted); infer with MindSpore's
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "FCOS_ISA_CAP_DEFAULT")}
    conv_impl = "auto" if mode == "train" else "mindspore"
    lines, result, measured = run_benchmark(*SMALL, f"--mode={mode}", "--min_size=[64]", "--max_size=96",
                                            "--threads=1", f"--conv_impl={conv_impl}", env=env)
    assert lines[0].split()[:2] == ["framework", "mode"]
    assert lines[1].split()[:4] == ["mindspore", mode, "2", "64x96"]
    assert REPORT_KEYS <= set(result)
    assert (result["framework"], result["mode"]) == ("mindspore", mode)
    assert (result["batch_size"], result["input"]) == (2, "64x96")
    assert set(result["parts"]) == parts
    assert 0 <= result["min_s"] <= result["median_s"] <= result["max_s"] and result["compile_s"] >= 0
    if mode == "data":  # a batch already waiting in the prefetch queue can take ~0 s
        assert result["compile_s"] + 2 * result["min_s"] <= measured.wall_s
        assert measured.peak_rss_mb * 0.8 <= result["peak_rss_mb"] <= measured.peak_rss_mb + 0.05
    else:
        measured.check(result, steps=2)
    config = result["config"]
    assert (config["backbone"], config["fpn_out_channels"], config["num_head_convs"]) == ("resnet18", 32, 1)
    assert (config["height"], config["width"], config["execution_mode"], config["threads"]) == (64, 96, "GRAPH", 1)
    assert len(config["cpus"]) == 1
    if mode == "train":
        assert result["conv_impl"] == "onednn" and config["onednn_isa_cap"] == "none"
    elif mode == "infer":
        assert result["conv_impl"] == "mindspore" and config["onednn_isa_cap"] == "AVX2"
    if mode == "data":
        # Synthetic 64x96 images, resized by min_size/max_size, padded to the landscape bucket.
        assert result["steady_state_compiles"] is None and result["pad_shapes"] == [[64, 96], [96, 64]]
    else:
        assert result["steady_state_compiles"] == 0  # fixed shapes: nothing compiles after the first call
        assert result["compile_s"] > result["median_s"]


def test_onnxruntime_runs_the_exported_inference_cell():
    pytest.importorskip("onnxruntime")
    lines, result, measured = run_benchmark(*SMALL, "--mode=infer", "--runtime=onnxruntime", "--threads=1")
    assert lines[1].split()[:4] == ["onnxruntime", "infer", "2", "64x96"]
    assert (result["framework"], result["compile_cache"]) == ("onnxruntime", "skipped")
    assert set(result["parts"]) == {"graph", "select"} and result["steady_state_compiles"] is None
    assert "onnxruntime" in result["versions"]
    measured.check(result, steps=2)


def test_bad_arguments_end_with_one_line_and_exit_code_2():
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", "--height=100", "--width=96"],
                          cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2 and "multiple of size_divisor=32" in done.stderr
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", "--no_such_key=1"],
                          cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2 and "--no_such_key" in done.stderr
    done = subprocess.run([sys.executable, "-m", "tools.benchmark", "--mode=data", "--compare_torchvision"],
                          cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2 and "only for --mode infer, train or convs" in done.stderr


def _conv_calls_per_forward(argv):
    """How many nn.Conv2d calls one forward makes, counted from the network's cells: the head's
    layers run once per pyramid level, every other conv once."""
    cfg = load_config(argv)
    network = build_model(cfg)
    convs = [name for name, cell in network.cells_and_names() if isinstance(cell, nn.Conv2d)]
    return sum(len(cfg.strides) if name.startswith("head.") else 1 for name in convs)


def test_convs_mode_lists_every_convolution_once_with_its_input_shape_and_times_it():
    lines, result, measured = run_benchmark(*SMALL, "--mode=convs", "--threads=1")
    assert lines[0].split()[:4] == ["count", "input", "out", "kernel"] and lines[-2].startswith("total")
    layers = result["layers"]
    assert sum(layer["count"] for layer in layers) == _conv_calls_per_forward(SMALL[:5])
    keys = [json.dumps({k: v for k, v in layer.items() if not k.endswith("_ms") and k != "count"}, sort_keys=True)
            for layer in layers]
    assert len(set(keys)) == len(keys)  # distinct layers, each counted
    stem = layers[0]
    assert (stem["input"], stem["out_channels"], stem["kernel"], stem["stride"], stem["padding"], stem["count"]) == (
        [2, 3, 64, 96], 64, [7, 7], [2, 2], [3, 3], 1)
    # 32-channel head convs on P3 (64x96 / 8): each of the two towers' layer and the three predictors
    p3 = [layer for layer in layers if layer["input"] == [2, 32, 8, 12]]
    assert sorted((layer["out_channels"], layer["count"]) for layer in p3) == [
        (1, 1), (3, 1), (4, 1), (32, 3)]  # FPN output conv of P3 + the two tower layers; centreness, classes, box
    for layer in layers:  # milliseconds of one call, within the run's wall time
        assert 0 < layer["fwd_ms"] and 0 < layer["fwd_bwd_ms"] and layer["fwd_bwd_ms"] * 1e-3 < measured.wall_s
    assert result["totals"]["fwd_bwd_ms"] == pytest.approx(sum(l["count"] * l["fwd_bwd_ms"] for l in layers), abs=0.2)


def test_a_convolution_the_side_by_side_cannot_describe_is_refused():
    with pytest.raises(ValueError, match="symmetric pad_mode='pad'"):
        layer_spec(nn.Conv2d(3, 4, 3, pad_mode="same"), (1, 3, 8, 8))
    spec = layer_spec(nn.Conv2d(3, 4, (3, 1), stride=2, pad_mode="pad", padding=(1, 1, 0, 0)), (1, 3, 8, 8))
    assert (spec["kernel"], spec["stride"], spec["padding"]) == ([3, 1], [2, 2], [1, 0])


@pytest.mark.skipif(not os.environ.get("TORCH_PYTHON"), reason="set TORCH_PYTHON to a Python with torch + torchvision")
def test_compare_torchvision_reports_both_sides_and_the_ratio():
    _, result, _ = run_benchmark(*SMALL, "--mode=infer", "--compare_torchvision", "--threads=1")
    theirs = result["torchvision"]
    assert theirs["framework"] == "torchvision" and theirs["input"] == "64x96" and theirs["batch_size"] == 2
    assert theirs["threads"] == 1
    assert set(theirs["parts"]) == {"forward", "postprocess"}
    assert result["ratio"]["median_s"] == pytest.approx(result["median_s"] / theirs["median_s"], rel=1e-2)


@pytest.mark.slow
def test_conv_impl_onednn_times_the_custom_ops_alone_and_in_the_network(tmp_path, monkeypatch):
    from src.ops.build import OpsUnavailable, build

    monkeypatch.setenv("FCOS_OPS_CACHE", str(tmp_path))
    try:
        build()
    except OpsUnavailable as err:
        pytest.skip(str(err))
    _, ours, _ = run_benchmark(*SMALL, "--mode=convs", "--threads=1", "--conv_impl=onednn")
    assert ours["conv_impl"] == "onednn" and ours["channels_last"] is True
    shapes = [(layer["input"], layer["out_channels"], layer["kernel"], layer["count"]) for layer in ours["layers"]]
    assert len(shapes) > 10 and shapes[0] == ([2, 3, 64, 96], 64, [7, 7], 1)
    # each layer timed in the storage the network keeps its tensors in: NCHW image in, NCHW outputs out
    storages = [tuple(layer["channels_last"]) for layer in ours["layers"]]
    assert storages[0] == (False, True) and (True, False) in storages and storages.count((True, True)) > 10
    assert all(layer["fwd_ms"] > 0 and layer["fwd_bwd_ms"] > 0 for layer in ours["layers"])
    # The backward is timed too. Compared over the whole layer set: a single layer of a few
    # microseconds measured forward+backward under its forward once in a full clean-clone run
    # (446 passed; it passed alone), timer noise on 2 loaded cores, not a missing backward.
    assert sum(layer["fwd_bwd_ms"] for layer in ours["layers"]) > 1.5 * sum(layer["fwd_ms"] for layer in ours["layers"])
    _, network, measured = run_benchmark(*SMALL, "--mode=infer", "--threads=1", "--conv_impl=onednn")
    assert network["conv_impl"] == "onednn"
    measured.check(network, steps=2)


@pytest.mark.skipif(not os.environ.get("TORCH_PYTHON"), reason="set TORCH_PYTHON to a Python with torch + torchvision")
def test_convs_mode_times_the_same_layers_in_torch():
    _, result, _ = run_benchmark(*SMALL, "--mode=convs", "--compare_torchvision", "--threads=1")
    assert all(layer["torch_fwd_ms"] > 0 and layer["torch_fwd_bwd_ms"] > 0 for layer in result["layers"])
    theirs = result["torchvision"]
    assert theirs["framework"] == "torch" and theirs["threads"] == 1
    assert result["ratio"]["fwd_bwd_ms"] == pytest.approx(
        result["totals"]["fwd_bwd_ms"] / theirs["totals"]["fwd_bwd_ms"], rel=1e-2)


def test_compile_count_sees_a_graph_compiled_during_the_timed_steps():
    """A step that feeds a new input shape on every call compiles on every timed call."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell = nn.Dense(3, 2)
    calls = []

    def step():
        calls.append(None)
        cell(ms.Tensor(np.ones((len(calls), 3), np.float32))).asnumpy()

    class Args:
        steps, warmup = 3, 1

    first, times, _, compiles = time_cell(step, Args, cell)
    assert len(calls) == 5 and len(times) == 3 and first > 0
    assert compiles == 3


def test_summary_statistics():
    result = summarise(2.0, [0.5, 0.1, 0.2, 0.2, 0.2], {"a": [1.0, 3.0, 2.0]}, batch_size=4, steady_state_compiles=0)
    assert (result["median_s"], result["min_s"], result["max_s"]) == (0.2, 0.1, 0.5)
    assert result["images_per_s"] == 20.0 and result["compile_s"] == 2.0
    assert result["slow_steps"] == 1 and result["parts"] == {"a": 2.0}
    assert summarise(2.0, [0.1, 0.3], {}, batch_size=4, throughput="mean")["images_per_s"] == 20.0


def test_synthetic_ground_truth_is_padded_inside_the_image_and_reproducible():
    boxes, labels, mask = synthetic_ground_truth(3, 64, 96, num_boxes=5, max_gt_boxes=7, num_classes=4, seed=2)
    assert boxes.shape == (3, 7, 4) and boxes.dtype == np.float32
    assert labels.dtype == np.int32 and mask.dtype == np.bool_
    assert mask[:, :5].all() and not mask[:, 5:].any()
    real = boxes[mask]
    assert (real[:, 0] >= 0).all() and (real[:, 1] >= 0).all()
    assert (real[:, 2] <= 96).all() and (real[:, 3] <= 64).all()
    assert (real[:, 2] - real[:, 0] >= 15.99).all() and (real[:, 3] - real[:, 1] >= 15.99).all()
    assert set(labels[mask].tolist()) <= {0, 1, 2, 3} and (boxes[~mask] == 0).all()
    again = synthetic_ground_truth(3, 64, 96, num_boxes=5, max_gt_boxes=7, num_classes=4, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip((boxes, labels, mask), again))
    assert synthetic_ground_truth(1, 64, 96, num_boxes=9, max_gt_boxes=4, num_classes=1)[2].sum() == 4


def test_training_modes_default_to_the_training_windows_shape():
    # configs/deepforest_cpu.yaml evaluates 400x400 images (pad 416x416) but trains on 320x320 windows
    cfg = load_config(["--config_path=configs/deepforest_cpu.yaml", "--train_window=300"])
    assert default_input_shape(cfg, "train") == default_input_shape(cfg, "convs") == (320, 320)
    assert default_input_shape(cfg, "infer") == default_input_shape(cfg, "data") == (416, 416)
    cfg = load_config(["--config_path=configs/deepforest_cpu.yaml", "--train_window=0"])
    assert default_input_shape(cfg, "train") == (416, 416)
