"""Benchmark FCOS on this machine: inference, a training step, or the training data pipeline,
optionally side by side with torchvision's FCOS.

    python -m tools.benchmark --mode infer --height 800 --width 1216 --batch_size 1
    python -m tools.benchmark --mode infer --height 800 --width 1216 --batch_size 1 --runtime onnxruntime
    python -m tools.benchmark --mode infer --height 800 --width 1216 --batch_size 1 --runtime onnxruntime_int8
    python -m tools.benchmark --mode train --config_path configs/synthetic_cpu.yaml
    python -m tools.benchmark --mode data --config_path configs/deepforest_cpu.yaml
    python -m tools.benchmark --mode train --compare_torchvision --torch_python /path/venv/bin/python
    python -m tools.benchmark --mode convs --compare_torchvision --config_path configs/synthetic_cpu.yaml

Every configuration key is accepted as --key=value (--backbone, --fpn_out_channels, --class_num,
--batch_size, --config_path, ...); the configuration's own ``mode`` (GRAPH/PYNATIVE) is
--execution_mode here. --height/--width default to the first pad shape of the configuration (train
and convs in window mode, train_window > 0: the training windows' shape).
--threads N pins both frameworks to N CPUs: on cores shared with other processes, --threads 1
compares per-core speed, which multi-threaded timings (threads waiting for a descheduled peer)
then do not. Thread-count settings alone are not enough: MindSpore's oneDNN convolutions use
every CPU of the process's affinity whatever threads_num says.

One step is:
  infer: FCOSInference (network + in-graph top-k decoding) on a fixed random batch, outputs copied
         to NumPy, then the NumPy selection (threshold, clip, class-aware NMS) of every image, as
         evaluation runs it. parts: ``graph`` and ``select``. With --runtime onnxruntime the same
         cell is exported to ONNX first and onnxruntime runs it (a CPU deployment route);
         onnxruntime_int8 runs its 8-bit model (src.inference.quantize), calibrated on the batch.
  train: one TrainStep as train.py builds it (forward, loss, backward, non-finite guard, SGD
         momentum update) on a fixed random batch with fixed synthetic ground truth
         (--num_gt_boxes real boxes, padded to max_gt_boxes).
  data:  one batch of create_train_dataset (decode, augment, resize, normalise, pad; the
         configured workers, augmentation, min_size/max_size and pad shapes) over synthetic JPEGs
         of --height x --width, generated first into a temporary folder.
  convs: each distinct convolution layer of the network alone, forward and forward + backward
         (tools/benchmark/convs.py): whether a gap is in the convolution kernels or elsewhere.
The first call (graph compilation in GRAPH_MODE) and --warmup calls are not timed.

Output: a table, then, as the last line, one JSON object: median_s, min_s, max_s (seconds per
step), images_per_s (batch_size / median step; data: / mean step, as workers deliver batches in
bursts), compile_s (seconds to the end of the first call: compilation - or loading the graph from
<output_dir>/compile_cache, as train.py does; compile_cache says which: compiled, stored, loaded,
skipped in PYNATIVE; --compile_cache=False always compiles - plus one step), peak_rss_mb,
steady_state_compiles (graphs MindSpore compiled during the timed steps, from the cell's compile
cache; 0 expected), slow_steps (timed steps over 1.5x the median), load_1min (load average at the
end: the cores may be shared), parts, steps, warmup,
framework, mode, batch_size, input, config. With --compare_torchvision also ``torchvision`` (the
same keys, measured by tools.benchmark.torchvision_side in --torch_python) and ``ratio`` (ours /
theirs seconds per step: above 1 means slower than torchvision).
--mode convs prints a table of layers instead and its JSON holds ``layers`` (each: input shape,
out_channels, kernel, stride, padding, dilation, groups, bias, count, fwd_ms, fwd_bwd_ms and, with
--compare_torchvision, torch_fwd_ms and torch_fwd_bwd_ms), ``totals`` (count-weighted sums),
``torchvision`` (its totals, versions, threads) and ``ratio`` (of the fwd_bwd_ms totals).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import mindspore as ms
import numpy as np

from src.builder import (build_inference, build_model, build_train_dataset, build_train_step, native_ops,
                         precompile_graphs, selection_kwargs)
from src.geometry import resolve_pad_buckets, window_pad_shape

from src.inference.quantize import Calibration
from src.inference.runtime import RUNTIMES, make_runtime
from src.engine.compile_cache import PlannedGraph
from src.utils.context import init_context
from src.engine.lr_schedule import scaled_lr
from src.inference.select import postprocess_batch
from src.config import ConfigError, guard_main, load_config, schema
from src.ops.backend import isa_cap
from tools.benchmark.common import (CONV_TIME_KEYS, format_table, json_line, peak_rss_mb, summarise,
                                    synthetic_ground_truth, time_steps)
from tools.benchmark.convs import format_layers, time_layer, totals, trace_layers
from tools.synthetic import make_synthetic_coco

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_input_shape(cfg, mode):
    """(height, width) of the input when --height/--width are not given: the first pad shape, or for
    train and convs in window mode (train_window > 0) the shape every training batch has."""
    if mode in ("train", "convs") and cfg.train_window:
        return window_pad_shape(cfg.train_window, cfg.size_divisor)
    return resolve_pad_buckets(cfg.pad_buckets, cfg.min_size, cfg.max_size, cfg.size_divisor)[0]


def parse_args(argv=None):
    """-> (benchmark options, Config). Options this parser does not know go to load_config.

    Not load_config's Flag mechanism: the benchmark's --mode (what to time) has the name of the
    configuration's mode key (GRAPH/PYNATIVE, here --execution_mode), so it is parsed first."""
    parser = argparse.ArgumentParser(
        description="Benchmark FCOS (inference, training step, data pipeline); every configuration "
                    "key is also accepted as --key=value.", allow_abbrev=False)
    parser.add_argument("--mode", choices=("infer", "train", "data", "convs"), default="infer")
    parser.add_argument("--height", type=int, help="input height (default: the first pad shape; train and "
                             "convs in window mode: the training window's)")
    parser.add_argument("--width", type=int, help="input width (default: the first pad shape; train and "
                             "convs in window mode: the training window's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    parser.add_argument("--num_gt_boxes", type=int, default=8, help="real boxes per image (train)")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin the benchmark (and the torchvision process) to this many CPUs and "
                             "use as many kernel threads in both frameworks (0: all CPUs, defaults)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="mindspore",
                        help="infer: run the network in MindSpore, or export it to ONNX and run it in "
                             "onnxruntime (CPU), float or 8-bit (calibrated on the random input: speed "
                             "only), the same NumPy selection after either")
    parser.add_argument("--execution_mode", choices=("GRAPH", "PYNATIVE"),
                        help="the configuration's mode key (default: the configuration's)")
    parser.add_argument("--compare_torchvision", action="store_true",
                        help="also time torchvision's FCOS (infer, train) or torch's convolutions "
                             "(convs) in --torch_python")
    parser.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON", sys.executable),
                        help="Python with torch and torchvision (default: $TORCH_PYTHON, else this one)")
    args, rest = parser.parse_known_args(argv)
    if args.execution_mode:
        rest.append(f"--mode={args.execution_mode}")
    cfg = load_config(rest, description="FCOS benchmark")
    if args.height is None or args.width is None:
        bucket = default_input_shape(cfg, args.mode)
        args.height = args.height or bucket[0]
        args.width = args.width or bucket[1]
    if args.height % cfg.size_divisor or args.width % cfg.size_divisor:
        raise ConfigError(f"--height/--width: {args.height}x{args.width} is not a multiple of "
                          f"size_divisor={cfg.size_divisor}")
    if args.threads < 0 or (args.threads and not hasattr(os, "sched_setaffinity")):
        raise ConfigError("--threads: must be 0 (default) or positive, and needs Linux CPU affinity")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be at least 1 and --warmup at least 0")
    if args.runtime != "mindspore" and args.mode != "infer":
        raise ConfigError(f"--runtime={args.runtime}: only for --mode infer")
    if args.compare_torchvision and args.mode == "data":
        raise ConfigError("--compare_torchvision: only for --mode infer, train or convs")
    return args, cfg


def pin_cpus(count):
    """Restrict every thread of this process, and so the threads and processes it starts later,
    to the first ``count`` CPUs it may run on -> those CPUs."""
    cpus = sorted(os.sched_getaffinity(0))[:count]
    for thread_id in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread_id), cpus)
    return cpus


def fixed_batch(args, cfg):
    """The random input batch every timed step reuses: images (B,3,H,W), gt boxes/labels/mask."""
    rng = np.random.default_rng(cfg.seed)
    images = rng.standard_normal((cfg.batch_size, 3, args.height, args.width), np.float32)
    targets = synthetic_ground_truth(cfg.batch_size, args.height, args.width, args.num_gt_boxes,
                                     cfg.max_gt_boxes, cfg.class_num, cfg.seed)
    return (images, *targets)


def infer_step(args, cfg, workdir):
    """-> (compiled cell or None, step, PlannedGraph or None) for FCOSInference + the NumPy
    selection; step returns its parts. --runtime onnxruntime(_int8) runs the cell's ONNX export in
    onnxruntime instead (src.inference.runtime; no MindSpore graph to compile), the 8-bit model
    calibrated on the timed batch and cached in workdir."""
    cell = build_inference(cfg, build_model(cfg, portable=args.runtime != "mindspore"))
    cell.set_train(False)
    images = fixed_batch(args, cfg)[0]
    if args.runtime != "mindspore":
        calibration = Calibration(f"the benchmark's random batch, seed {cfg.seed}", lambda shape: iter([images]))
        runtime = make_runtime(args.runtime, cell, args.threads, calibration, workdir)
        runtime.prepare(images.shape)
        return None, selecting_step(lambda: runtime(images), args, cfg), None
    tensor = ms.Tensor(images)
    step = selecting_step(lambda: [x.asnumpy() for x in cell(tensor)], args, cfg)
    return cell, step, PlannedGraph(cell, [(images.shape, np.float32)], training=False)


def selecting_step(run_graph, args, cfg):
    """step: run_graph() -> NumPy (boxes, scores, labels), then the selection of every image."""
    image_sizes = np.tile([[args.height, args.width]], (cfg.batch_size, 1))
    selection = selection_kwargs(cfg)

    def step():
        start = time.perf_counter()
        boxes, scores, labels = run_graph()
        graph_done = time.perf_counter()
        postprocess_batch(boxes, scores, labels, image_sizes, **selection)
        return {"graph": graph_done - start, "select": time.perf_counter() - graph_done}

    return step


def train_step(args, cfg):
    """-> (compiled cell, step, PlannedGraph) for one training step exactly as train.py builds it."""
    calls = 1 + args.warmup + args.steps
    cell, _ = build_train_step(cfg, build_model(cfg), steps_per_epoch=calls, group_size=1)
    batch = fixed_batch(args, cfg)
    inputs = [ms.Tensor(x) for x in batch]

    def step():
        cell(*inputs)[0].asnumpy()

    return cell, step, PlannedGraph(cell, [(x.shape, x.dtype) for x in batch], training=True)


def data_step(args, cfg, workdir):
    """-> step taking the next batch of the training pipeline over a synthetic set made in workdir."""
    calls = 1 + args.warmup + args.steps
    cfg.train_ann_file = make_synthetic_coco(workdir, calls * cfg.batch_size, args.height, args.width,
                                             cfg.seed)
    cfg.train_img_dir = os.path.join(workdir, "images")
    dataset, info = build_train_dataset(cfg)
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)

    def step():
        next(batches)

    return step, info.buckets


def time_cell(step, args, cell=None):
    """time_steps -> (first, times, parts, graphs compiled during the timed steps or None).

    The count comes from the top cell's compile cache (one entry per compiled input signature);
    it is None without a cell (data) and stays 0 in PYNATIVE_MODE, which compiles no whole graph.
    """
    seen = {}

    def remember_cache_size():
        seen["warm"] = len(cell.compile_cache)

    first, times, parts = time_steps(step, args.steps, args.warmup,
                                     remember_cache_size if cell is not None else None)
    compiles = None if cell is None else len(cell.compile_cache) - seen["warm"]
    return first, times, parts, compiles


def init_mindspore(args, cfg):
    """Context, kernel threads and seed of our side."""
    init_context(cfg.device_target, cfg.mode, cfg.device_id, distributed=False)
    if args.threads and cfg.device_target == "CPU":
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_seed(cfg.seed)


def describe_run(args, cfg):
    """The keys of our result that say what was timed."""
    versions = {"mindspore": ms.__version__}
    if args.runtime != "mindspore":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    convolutions = None  # data: no network
    if args.mode != "data":
        convolutions = ("onednn" if native_ops(cfg) else "mindspore") if args.runtime == "mindspore" else args.runtime
    return {"framework": args.runtime, "mode": args.mode, "batch_size": cfg.batch_size,
            "input": f"{args.height}x{args.width}", "steps": args.steps, "warmup": args.warmup,
            "conv_impl": convolutions, "channels_last": convolutions == "onednn" and cfg.channels_last,
            "versions": versions}


def run_mindspore(args, cfg):
    """Time our side -> result dict (see the module docstring)."""
    init_mindspore(args, cfg)
    extra = {}
    if args.mode == "data":
        with tempfile.TemporaryDirectory(prefix="fcos_bench_") as workdir:
            step, extra["pad_shapes"] = data_step(args, cfg, workdir)
            first, times, parts, compiles = time_cell(step, args)
        result = summarise(first, times, parts, cfg.batch_size, throughput="mean")
    else:
        with tempfile.TemporaryDirectory(prefix="fcos_bench_") as workdir:
            start = time.perf_counter()
            cell, step, graph = infer_step(args, cfg, workdir) if args.mode == "infer" else train_step(args, cfg)
            # with onnxruntime, the export and the session are its preparation; MindSpore's is compiling
            ready_s = time.perf_counter() - start if graph is None else 0.0
            start = time.perf_counter()
            extra["compile_cache"] = precompile_graphs(cfg, [graph] if graph else [])
            ready_s += time.perf_counter() - start
            first, times, parts, compiles = time_cell(step, args, cell)
        result = summarise(ready_s + first, times, parts, cfg.batch_size, compiles)
    result.update(extra)
    result.update(describe_run(args, cfg))
    return result


def run_convs(args, cfg):
    """--mode convs: trace the layers, time them on both sides -> (result dict, table text)."""
    init_mindspore(args, cfg)
    layers = trace_layers(cfg, args.height, args.width)
    result = describe_run(args, cfg)
    if args.compare_torchvision:
        theirs = run_torchvision(args, cfg, layers)
        for layer, timing in zip(layers, theirs.pop("layers")):
            layer.update({"torch_" + key: timing[key] for key in CONV_TIME_KEYS})
        result["torchvision"] = dict(theirs, totals=totals(layers, "torch_"))
    for index, layer in enumerate(layers, 1):
        print(f"layer {index}/{len(layers)}: {layer['input']} -> {layer['out_channels']} channels, "
              f"kernel {layer['kernel']}, stride {layer['stride']}", file=sys.stderr, flush=True)
        layer.update(time_layer(layer, args.steps, args.warmup, "onednn" if native_ops(cfg) else "mindspore"))
    result.update({"layers": layers, "totals": totals(layers), "peak_rss_mb": round(peak_rss_mb(), 1)})
    if args.compare_torchvision:
        result["ratio"] = {"fwd_bwd_ms": round(result["totals"]["fwd_bwd_ms"] /
                                               result["torchvision"]["totals"]["fwd_bwd_ms"], 3)}
    return result, format_layers(layers, args.compare_torchvision)


def torchvision_spec(args, cfg):
    """What tools.benchmark.torchvision_side needs to build and time the same model and input."""
    spec = {key: cfg[key] for key in schema().group("benchmark")}
    spec.update({"mode": args.mode, "height": args.height, "width": args.width,
                 "batch_size": cfg.batch_size, "steps": args.steps, "warmup": args.warmup,
                 "num_gt_boxes": args.num_gt_boxes, "threads": args.threads,
                 "lr": scaled_lr(cfg.base_lr, cfg.lr_base_batch, cfg.batch_size)})
    return spec


def run_torchvision(args, cfg, layers=None):
    """Time torchvision's FCOS (or, given ``layers``, torch's convolutions) in a separate process
    of --torch_python -> its result dict.

    It runs before our side so that the two never hold memory at the same time, with oneDNN at
    its default ISA (the AVX2 cap is for MindSpore's NCHW convolutions, see src/__init__.py).
    """
    # Not "import torchvision": a CUDA-built torchvision imports only after benchmark_torchvision's fix.
    probe = subprocess.run([args.torch_python, "-c", "import importlib.util, sys, torch; "
                            "sys.exit(importlib.util.find_spec('torchvision') is None)"], capture_output=True)
    if probe.returncode:
        raise ConfigError(f"--torch_python: {args.torch_python} cannot import torch and torchvision "
                          "(make a separate environment for them: they are not dependencies of this project)")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="ALL")
    spec = torchvision_spec(args, cfg)
    if layers is not None:
        spec["layers"] = layers
    command = [args.torch_python, "-m", "tools.benchmark.torchvision_side", "--spec", json.dumps(spec)]
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the torchvision benchmark failed (exit code {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_config(args, cfg):
    """The configuration part of the JSON line."""
    config = {key: cfg[key] for key in schema().group("benchmark")}
    config.update({"config_path": os.path.relpath(cfg.config_path, ROOT), "device_target": cfg.device_target,
                   "execution_mode": cfg.mode, "height": args.height, "width": args.width,
                   "batch_size": cfg.batch_size, "num_parallel_workers": cfg.num_parallel_workers,
                   "num_gt_boxes": args.num_gt_boxes, "threads": args.threads,
                   "onednn_isa_cap": isa_cap()})
    return config


@guard_main
def main(argv=None):
    args, cfg = parse_args(argv)
    cpus = pin_cpus(args.threads) if args.threads else None  # None: not pinned
    if args.mode == "convs":
        result, table = run_convs(args, cfg)
        result["config"] = dict(report_config(args, cfg), cpus=cpus)
        print(table)
        print(json_line(result), flush=True)
        return
    theirs = run_torchvision(args, cfg) if args.compare_torchvision else None
    result = run_mindspore(args, cfg)
    result["config"] = report_config(args, cfg)
    result["config"]["cpus"] = cpus
    rows = [result]
    if theirs is not None:
        result["torchvision"] = theirs
        result["ratio"] = {key: round(result[key] / theirs[key], 3) for key in ("median_s", "min_s")}
        rows.append(theirs)
    print(format_table(rows))
    if theirs is not None:
        print(f"ours / torchvision seconds per step: median {result['ratio']['median_s']}, "
              f"min {result['ratio']['min_s']}")
    print(json_line(result), flush=True)


if __name__ == "__main__":
    main()
