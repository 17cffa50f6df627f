"""Framework-neutral parts of the benchmarks: step timing, peak memory, synthetic ground truth and
the report (table + JSON line).

Imports neither MindSpore nor torch: tools.benchmark (MindSpore) and
tools.benchmark.torchvision_side (torch, run from another Python environment) both use it, so the
two sides are timed, summarised and fed the same way.
"""
import json
import os
import resource
import statistics
import time

import numpy as np

# Summary keys every result carries, in table order (see summarise).
RESULT_KEYS = ("median_s", "min_s", "max_s", "images_per_s", "compile_s", "peak_rss_mb",
               "steady_state_compiles", "slow_steps", "load_1min")
SLOW_FACTOR = 1.5  # a timed step this many times the median is counted in slow_steps
# What --mode convs measures of each convolution layer, in milliseconds (see best_ms).
CONV_TIME_KEYS = ("fwd_ms", "fwd_bwd_ms")


def time_steps(step, steps, warmup, before_timed=None):
    """Call ``step()`` 1 + warmup + steps times; only the last ``steps`` calls are timed.

    ``step`` must return only when its work is done (results copied to host memory), and may
    return a dict {part name: seconds} of its own sub-timings. ``before_timed()``, when given,
    runs once between the warmup and the timed calls.
    Returns (seconds of the first call, [seconds of each timed call], {part: [seconds of each
    timed call]}). The first call carries graph compilation in GRAPH_MODE, one-off kernel and
    allocator set-up otherwise.
    """
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    if before_timed is not None:
        before_timed()
    times, parts = [], {}
    for _ in range(steps):
        start = time.perf_counter()
        split = step() or {}
        times.append(time.perf_counter() - start)
        for name, seconds in split.items():
            parts.setdefault(name, []).append(seconds)
    return first, times, parts


def best_ms(step, steps, warmup):
    """time_steps -> the fastest timed call in milliseconds: a kernel's own speed, as far as
    other load on the machine lets it show."""
    return round(min(time_steps(step, steps, warmup)[1]) * 1e3, 3)


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _seconds(value):
    """4 significant digits: a prefetched data batch takes microseconds, which fixed decimals
    would report as 0."""
    return float(f"{value:.4g}")


def summarise(first, times, parts, batch_size, steady_state_compiles=None, throughput="median"):
    """Timing lists from time_steps -> the result dict (RESULT_KEYS plus 'parts': medians).

    images_per_s is batch_size over the median step, or over the mean step with
    throughput="mean" (for sources that deliver in bursts, such as parallel loading workers).
    compile_s is the first call's seconds (compilation plus one step); slow_steps counts timed
    steps over SLOW_FACTOR x the median, a sign of recompilation or of other load on the machine;
    load_1min is the machine's load average at the end (above the core count: shared cores).
    """
    median = statistics.median(times)
    per_step = median if throughput == "median" else statistics.fmean(times)
    return {
        "median_s": _seconds(median),
        "min_s": _seconds(min(times)),
        "max_s": _seconds(max(times)),
        "images_per_s": round(batch_size / per_step, 3),
        "compile_s": round(first, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "steady_state_compiles": steady_state_compiles,
        "slow_steps": sum(t > SLOW_FACTOR * median for t in times),
        "load_1min": round(os.getloadavg()[0], 2),
        "parts": {name: _seconds(statistics.median(values)) for name, values in parts.items()},
    }


def synthetic_ground_truth(batch_size, height, width, num_boxes, max_gt_boxes, num_classes, seed=0):
    """Random boxes for a training step, padded as the data pipeline pads them.

    Returns gt_boxes (B, M, 4) float32 x1,y1,x2,y2 inside the image, gt_labels (B, M) int32 in
    [0, num_classes), gt_mask (B, M) bool with the first min(num_boxes, M) rows True;
    M = max_gt_boxes. Sides are log-uniform in [16, min(H, W) / 2] px, so every FPN level gets
    positives at typical input sizes.
    """
    rng = np.random.default_rng(seed)
    count = min(num_boxes, max_gt_boxes)
    boxes = np.zeros((batch_size, max_gt_boxes, 4), np.float32)
    labels = np.zeros((batch_size, max_gt_boxes), np.int32)
    mask = np.zeros((batch_size, max_gt_boxes), np.bool_)
    largest = max(min(height, width) / 2.0, 17.0)
    sides = np.exp(rng.uniform(np.log(16.0), np.log(largest), size=(batch_size, count, 2)))
    sides = np.minimum(sides, [width - 1, height - 1])
    x1 = rng.uniform(0, 1, size=(batch_size, count)) * (width - sides[..., 0])
    y1 = rng.uniform(0, 1, size=(batch_size, count)) * (height - sides[..., 1])
    boxes[:, :count] = np.stack([x1, y1, x1 + sides[..., 0], y1 + sides[..., 1]], axis=-1)
    labels[:, :count] = rng.integers(0, num_classes, size=(batch_size, count))
    mask[:, :count] = True
    return boxes, labels, mask


def aligned(rows):
    """Rows of strings (the first is the header) -> lines with the columns left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]


def format_table(results):
    """Rows of result dicts (with 'framework', 'mode', 'batch_size', 'input') -> aligned text."""
    columns = [("framework", "framework"), ("mode", "mode"), ("batch", "batch_size"),
               ("input", "input"), ("median s", "median_s"), ("min s", "min_s"),
               ("img/s", "images_per_s"), ("first call s", "compile_s"),
               ("peak RSS MB", "peak_rss_mb"), ("compiles", "steady_state_compiles"),
               ("slow", "slow_steps"), ("load", "load_1min")]
    rows = [[title for title, _ in columns]]
    for result in results:
        rows.append(["-" if result.get(key) is None else str(result[key]) for _, key in columns])
    lines = aligned(rows)
    for result in results:
        if result.get("parts"):
            parts = ", ".join(f"{name} {seconds} s" for name, seconds in result["parts"].items())
            lines.append(f"{result['framework']} {result['mode']} median parts: {parts}")
    return "\n".join(lines)


def json_line(result):
    """The machine-readable report: one line of JSON, keys sorted."""
    return json.dumps(result, sort_keys=True)
