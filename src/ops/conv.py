"""OneDNNConv2d: nn.Conv2d whose forward and backward run as oneDNN custom ops on CPU.

Same constructor, parameters and checkpoint names as nn.Conv2d (it is one), so weights load
either way; only construct differs. The kernels are src/ops/onednn_conv.cc, built on first use
(src/ops/build.py). oneDNN picks blocked layouts and AVX-512 kernels itself once the AVX2 cap
of src/__init__.py is lifted (src/ops/select.py does that when a run selects these convolutions);
under the cap they run AVX2 kernels, same results.
"""
import numpy as np
from mindspore import Tensor, nn, ops

from src.ops.build import build

_LIBRARY = None


def library():
    """Path of the built custom-op library (built once per process, cached on disk)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = build("onednn_conv.cc", "libfcos_onednn_conv.so")
    return _LIBRARY


def loaded_library():
    """The library's path when this process has built or loaded it, else None (compiled graphs
    name it: the compile cache keys on it)."""
    return _LIBRARY


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_attributes(cell):
    """nn.Conv2d -> (stride, padding (h, w), dilation, groups) for the kernels; ValueError for the
    padding they do not take (asymmetric pad, 'same')."""
    pad = cell.padding if isinstance(cell.padding, (tuple, list)) else (cell.padding,) * 4
    if cell.pad_mode == "valid":
        pad = (0, 0, 0, 0)
    elif cell.pad_mode != "pad" or pad[0] != pad[1] or pad[2] != pad[3]:
        raise ValueError(f"OneDNNConv2d takes pad_mode 'valid' or a symmetric 'pad', got pad_mode={cell.pad_mode}, "
                         f"padding={cell.padding}")
    if cell.data_format != "NCHW":
        raise ValueError("OneDNNConv2d takes NCHW")
    return _pair(cell.stride), (pad[0], pad[2]), _pair(cell.dilation), cell.group


class OneDNNConv2d(nn.Conv2d):
    """nn.Conv2d computed by oneDNN custom ops: x (N, C, H, W) -> (N, out_channels, OH, OW).

    folded_norm: a bias-free layer's following FrozenBatchNorm2d, which in inference (not
    training) is applied here as conv(x, w * scale) + shift (its scale_shift()) while it passes its
    input through: one pass over the output instead of two. Not in training: there it made R50-FPN
    800x1216 steps 6% faster but held 0.8 GB more (docs/performance.md). The norm's Parameters
    stay its own (names, checkpoints); it is kept out of this cell's children for that.
    """

    def __init__(self, *args, folded_norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        if folded_norm is not None:
            if self.has_bias:
                raise ValueError("OneDNNConv2d folds a norm only into a bias-free convolution")
            folded_norm.folded = True
        object.__setattr__(self, "folded_norm", folded_norm)
        self.forward_op, self.attrs = self._forward(self.has_bias)
        if folded_norm is not None:
            self.folded_op, self.folded_attrs = self._forward(True)

    def _forward(self, with_bias):
        """-> (the forward custom op with its bprop, its attrs tensor) for this layer's geometry,
        with or without a bias input."""
        stride, padding, dilation, groups = conv_attributes(self)
        attrs = Tensor(np.array([*stride, *padding, *dilation, groups, int(with_bias)], np.int64))
        kernel = self.kernel_size

        def out_size(size, k, s, p, d):
            return (size + 2 * p - d * (k - 1) - 1) // s + 1

        def forward_shape(x, w, *rest):
            return [x[0], w[0], out_size(x[2], kernel[0], stride[0], padding[0], dilation[0]),
                    out_size(x[3], kernel[1], stride[1], padding[1], dilation[1])]

        def forward_dtype(x, *rest):
            return x

        so = library()
        # Two backward ops: a graph that needs only one of dx and dw (the first layer, frozen
        # layers) runs only that one.
        backward_data = ops.Custom(f"{so}:FcosConvBackwardData", out_shape=lambda x, w, dy, a: x,
                                   out_dtype=lambda x, w, dy, a: x, func_type="aot")
        if with_bias:
            backward_weights = ops.Custom(f"{so}:FcosConvBackwardWeights", out_shape=lambda x, w, dy, a: (w, [w[0]]),
                                          out_dtype=lambda x, w, dy, a: (w, w), func_type="aot")

            def bprop(x, w, b, attrs, out, dout):
                dw, db = backward_weights(x, w, dout, attrs)
                return backward_data(x, w, dout, attrs), dw, db, ops.zeros_like(attrs)
        else:
            backward_weights = ops.Custom(f"{so}:FcosConvBackwardWeights", out_shape=lambda x, w, dy, a: w,
                                          out_dtype=lambda x, w, dy, a: w, func_type="aot")

            def bprop(x, w, attrs, out, dout):
                return backward_data(x, w, dout, attrs), backward_weights(x, w, dout, attrs), ops.zeros_like(attrs)
        name = "FcosConvForwardBias" if with_bias else "FcosConvForward"  # see onednn_conv.cc's end
        forward_op = ops.Custom(f"{so}:{name}", out_shape=forward_shape, out_dtype=forward_dtype,
                                func_type="aot", bprop=bprop)
        # MindSpore reuses an inferred output shape for the same op name, attributes and input
        # shapes: without the geometry among the attributes a stride-2 conv took the shape of a
        # stride-1 conv on the same input (the FPN's P6 after P5's output conv), and without the
        # bias a folded stem's backward-weights op got one output (dw) where it has two (dw, db).
        geometry = f"{kernel}/{stride}/{padding}/{dilation}/{groups}/bias={int(with_bias)}"
        for op in (forward_op, backward_data, backward_weights):
            op.add_prim_attr("conv_geometry", geometry)
        return forward_op, attrs

    def construct(self, x):
        if self.folded_norm is not None and not self.training:
            scale, shift = self.folded_norm.scale_shift()
            return self.folded_op(x, self.weight * scale.reshape(-1, 1, 1, 1), shift, self.folded_attrs)
        if self.has_bias:
            return self.forward_op(x, self.weight, self.bias, self.attrs)
        return self.forward_op(x, self.weight, self.attrs)


def use_onednn_convs(network, fold=()):
    """Replace every nn.Conv2d of network, in place, by an OneDNNConv2d holding the same Parameter
    objects (names, values, requires_grad) -> the number replaced. fold: (conv, FrozenBatchNorm2d)
    pairs whose norm the new convolution applies (see OneDNNConv2d). Cells that call ops.Conv2D
    directly (the head's stacked convolutions: FCOSHead.set_stacking(False) turns them back into
    their layers) are not reached."""
    norms = {id(conv): norm for conv, norm in fold}
    replaced = 0
    for _, parent in list(network.cells_and_names()):
        for name, child in list(parent.name_cells().items()):
            if type(child) is not nn.Conv2d:
                continue
            new = OneDNNConv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                               pad_mode=child.pad_mode, padding=child.padding, dilation=child.dilation,
                               group=child.group, has_bias=child.has_bias, folded_norm=norms.get(id(child)))
            new.weight = child.weight
            if child.has_bias:
                new.bias = child.bias
            if isinstance(parent, (nn.SequentialCell, nn.CellList)):
                # by index: SequentialCell runs a list of its cells that insert_child_to_cell
                # leaves as it was (the old convolution kept running)
                parent[int(name)] = new
            else:
                parent.insert_child_to_cell(name, new)
            replaced += 1
    return replaced
