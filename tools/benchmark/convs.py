"""``python -m tools.benchmark --mode convs``: every convolution of the network, timed alone.

A training step of this model is mostly convolutions; this mode tells whether a gap to
torchvision is in the convolution kernels (the framework's) or in the rest of the step (ours to
shorten). It traces the network once on the benchmark's input to list its convolution layers
(nn.Conv2d: in/out channels, kernel, stride, padding, input shape), then times each distinct
layer alone: the forward, and forward + backward (gradients of the input and of the weights, as
a trainable layer in the middle of a network needs). With --compare_torchvision the same list
is timed with torch.nn.Conv2d in --torch_python.

The head's stacked convolutions (src/model/head.py) are listed as the layers they stack, so
both frameworks time the same convolutions; the totals are the convolution time of a step of
the unstacked network. Times are the minimum over the timed calls: a kernel's speed, with
the noise of a shared machine removed as far as it can be.
"""
import collections

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.builder import build_model
from tools.benchmark.common import CONV_TIME_KEYS, aligned, best_ms


def layer_spec(cell, input_shape):
    """An nn.Conv2d and the (B, C, H, W) shape it is called with -> a JSON-able description;
    channels_last: whether its input and output are in channels-last storage in the network
    (src/ops/backend.py; the custom ops only)."""
    pad = cell.padding if isinstance(cell.padding, tuple) else (cell.padding,) * 4
    if cell.pad_mode != "pad" or pad[0] != pad[1] or pad[2] != pad[3]:
        raise ValueError(f"{cell.cls_name}: only symmetric pad_mode='pad' convolutions can be timed "
                         f"side by side (got pad_mode={cell.pad_mode}, padding={cell.padding})")
    return {"input": [int(v) for v in input_shape], "out_channels": cell.out_channels,
            "kernel": list(cell.kernel_size), "stride": list(cell.stride), "padding": [pad[0], pad[2]],
            "dilation": list(cell.dilation), "groups": cell.group, "bias": cell.has_bias,
            "channels_last": [bool(v) for v in getattr(cell, "layout", (0, 0))]}


def trace_layers(cfg, height, width):
    """The network's convolutions on a (batch_size, 3, height, width) input -> [spec with 'count'].

    One forward in PyNative mode with a hook on every nn.Conv2d (hooks do not run in graph mode),
    the head's stacking off so that its layers are called one by one. Distinct layers in order of
    first call; the mode is set back to what it was.
    """
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    network = build_model(cfg)
    network.head.set_stacking(False)
    counts = collections.Counter()

    def record(cell, inputs, _output):
        spec = layer_spec(cell, inputs[0].shape)
        counts[_key(spec)] += 1

    handles = [cell.register_forward_hook(record) for _, cell in network.cells_and_names()
               if isinstance(cell, nn.Conv2d)]
    try:
        network(ms.Tensor(np.zeros((cfg.batch_size, 3, height, width), np.float32)))
    finally:
        for handle in handles:
            handle.remove()
        ms.set_context(mode=previous)
    return [dict(dict(key), count=count) for key, count in counts.items()]


def _key(spec):
    """A hashable form of a layer spec (lists to tuples)."""
    return tuple((name, tuple(value) if isinstance(value, list) else value) for name, value in spec.items())


class _ConvForwardBackward(nn.Cell):
    """(x, dy) -> (y, (dx,), (dweight[, dbias])): one conv's forward and backward, dy being
    d loss / d y. y is returned because a conv's gradients do not need it: MindSpore would drop
    the forward from a graph that only returns gradients."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.weights = ms.ParameterTuple(conv.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, dy):
        y = self.conv(x)
        inputs_grads, weight_grads = self.grad(self.conv, self.weights)(x, dy)
        return y, inputs_grads, weight_grads


def _conv_cell(spec, impl="mindspore"):
    """spec -> the nn.Conv2d it describes (random weights); impl "onednn": as OneDNNConv2d, with
    its input and output in the storage the network keeps them in."""
    pad_h, pad_w = spec["padding"]
    options = {}
    if impl == "onednn":
        from src.ops.conv import OneDNNConv2d

        cell_class = OneDNNConv2d
        options = dict(zip(("x_channels_last", "y_channels_last"), spec["channels_last"]))
    else:
        cell_class = nn.Conv2d
    return cell_class(spec["input"][1], spec["out_channels"], tuple(spec["kernel"]), stride=tuple(spec["stride"]),
                      pad_mode="pad", padding=(pad_h, pad_h, pad_w, pad_w), dilation=tuple(spec["dilation"]),
                      group=spec["groups"], has_bias=spec["bias"], **options)


def time_layer(spec, steps, warmup, impl="mindspore"):
    """Time one layer (impl: see _conv_cell) in graph mode -> {'fwd_ms', 'fwd_bwd_ms'}: minima over
    ``steps`` calls."""
    rng = np.random.default_rng(0)
    conv = _conv_cell(spec, impl)
    x = ms.Tensor(rng.standard_normal(spec["input"], np.float32))
    dy = ms.Tensor(rng.standard_normal(conv(x).shape, np.float32))
    forward_backward_cell = _ConvForwardBackward(conv)

    def forward():
        conv(x).asnumpy()

    def forward_backward():
        y, inputs_grads, weight_grads = forward_backward_cell(x, dy)
        for tensor in (y,) + inputs_grads + weight_grads:
            tensor.asnumpy()

    return {key: best_ms(fn, steps, warmup) for key, fn in zip(CONV_TIME_KEYS, (forward, forward_backward))}


def totals(rows, prefix=""):
    """Count-weighted sums of the per-layer times -> {'fwd_ms', 'fwd_bwd_ms'} (keys with prefix)."""
    return {key: round(sum(row["count"] * row[prefix + key] for row in rows), 1) for key in CONV_TIME_KEYS}


def format_layers(rows, compared):
    """Rows (spec + count + times [+ torch_ times]) -> aligned text, one line per layer and a total."""
    head = ["count", "input", "out", "kernel", "stride", "fwd ms", "fwd+bwd ms"]
    if compared:
        head += ["torch fwd ms", "torch fwd+bwd ms", "ratio"]
    lines = [head]
    for row in rows:
        line = [str(row["count"]), "x".join(map(str, row["input"])), str(row["out_channels"]),
                "x".join(map(str, row["kernel"])), str(row["stride"][0]),
                str(row["fwd_ms"]), str(row["fwd_bwd_ms"])]
        if compared:
            line += [str(row["torch_fwd_ms"]), str(row["torch_fwd_bwd_ms"]),
                     f"{row['fwd_bwd_ms'] / row['torch_fwd_bwd_ms']:.2f}"]
        lines.append(line)
    ours = totals(rows)
    line = ["total", "", "", "", "", str(ours["fwd_ms"]), str(ours["fwd_bwd_ms"])]
    if compared:
        theirs = totals(rows, "torch_")
        line += [str(theirs["fwd_ms"]), str(theirs["fwd_bwd_ms"]), f"{ours['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.2f}"]
    lines.append(line)
    return "\n".join(aligned(lines))
