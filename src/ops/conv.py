"""OneDNNConv2d: nn.Conv2d whose forward and backward run as oneDNN custom ops on CPU.

Same constructor, parameters and checkpoint names as nn.Conv2d (it is one), so weights load
either way; only construct differs. The kernels are src/ops/onednn_conv.cc, built on first use
(src/ops/build.py). oneDNN picks blocked layouts and AVX-512 kernels itself once the AVX2 cap
of src/__init__.py is lifted (src/ops/backend.py does that when a run selects these convolutions);
under the cap they run AVX2 kernels, same results.
"""
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops.auto_generate import ReluGrad

from src.model.norm import FrozenBatchNorm2d
from src.ops.build import library


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_attributes(cell: nn.Conv2d) -> Tuple[Tuple[int, ...], Tuple[int, int], Tuple[int, ...], int]:
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

    folded_norm: a bias-free layer's following FrozenBatchNorm2d, applied here as
    conv(x, w * scale) + shift (its scale_shift(); the ops scale the weights) while the norm passes
    its input through: one pass over the output instead of two, forward and backward (measured
    in docs/performance.md). The norm's Parameters stay its own
    (names, checkpoints); it is kept out of this cell's children for that. relu (with a folded
    norm only): the output is max(0, norm(conv(x))), the ReLU that follows the norm, as a oneDNN
    post-op (no pass of its own forward; backward, MindSpore's ReluGrad before the adjoints).
    x_channels_last, y_channels_last: x, and y, are in channels-last storage (src/ops/backend.py);
    the gradients dx and dy take the same storage.
    """

    def __init__(self, *args: Any, folded_norm: Optional[FrozenBatchNorm2d] = None, relu: bool = False,
                 x_channels_last: bool = False, y_channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = (int(x_channels_last), int(y_channels_last))
        if relu and folded_norm is None:
            raise ValueError("OneDNNConv2d applies a ReLU only after a folded norm")
        if folded_norm is not None:
            if self.has_bias:
                raise ValueError("OneDNNConv2d folds a norm only into a bias-free convolution")
            if not getattr(folded_norm, "folded", False):
                raise ValueError("fold the norm first (src/ops/backend.py fold_frozen_norms)")
            self.forward_op, self.attrs = self._scaled_forward(relu)
        else:
            self.forward_op, self.attrs = self._forward(self.has_bias)
        self.relu = relu
        object.__setattr__(self, "folded_norm", folded_norm)

    def _attrs(self, with_bias, relu=False):
        """The kernels' attrs tensor for this layer's geometry, saying whether a bias goes in,
        whether a ReLU follows and which tensors are in channels-last storage."""
        stride, padding, dilation, groups = conv_attributes(self)
        return Tensor(np.array([*stride, *padding, *dilation, groups, int(with_bias), int(relu), *self.layout],
                               np.int64))

    def _forward_shape(self):
        """-> out_shape function of the forward ops: (x's shape, w's shape, ...) -> y's shape."""
        stride, padding, dilation, _ = conv_attributes(self)
        kernel = self.kernel_size

        def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
            return (size + 2 * p - d * (k - 1) - 1) // s + 1

        def forward_shape(x: Sequence[int], w: Sequence[int], *rest: Sequence[int]) -> List[int]:
            return [x[0], w[0], out_size(x[2], kernel[0], stride[0], padding[0], dilation[0]),
                    out_size(x[3], kernel[1], stride[1], padding[1], dilation[1])]

        return forward_shape

    def _tag(self, ops_, with_bias):
        """MindSpore reuses an inferred output shape for the same op name, attributes and input
        shapes: without the geometry among the attributes a stride-2 conv took the shape of a
        stride-1 conv on the same input (the FPN's P6 after P5's output conv), and without the
        bias a folded stem's backward-weights op got one output (dw) where it has two (dw, db)."""
        stride, padding, dilation, groups = conv_attributes(self)
        geometry = f"{self.kernel_size}/{stride}/{padding}/{dilation}/{groups}/bias={int(with_bias)}"
        for op in ops_:
            op.add_prim_attr("conv_geometry", geometry)

    def _forward(self, with_bias):
        """-> (the forward custom op with its bprop, its attrs tensor), with or without a bias input."""
        attrs = self._attrs(with_bias)
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
        forward_op = ops.Custom(f"{so}:{name}", out_shape=self._forward_shape(), out_dtype=lambda x, *rest: x,
                                func_type="aot", bprop=bprop)
        self._tag((forward_op, backward_data, backward_weights), with_bias)
        return forward_op, attrs

    def _scaled_forward(self, relu):
        """-> (the forward op of conv(x, w * scale) + shift [then ReLU] with its bprop, its attrs
        tensor): the folded norm's scale and shift go in as inputs and get no gradient."""
        attrs, weights_attrs = self._attrs(True, relu), self._attrs(False)
        so = library()
        backward_data = ops.Custom(f"{so}:FcosConvBackwardDataScaled", out_shape=lambda x, w, s, dy, a: x,
                                   out_dtype=lambda x, w, s, dy, a: x, func_type="aot")
        backward_weights = ops.Custom(f"{so}:FcosConvBackwardWeightsScaled", out_shape=lambda x, w, s, dy, a: w,
                                      out_dtype=lambda x, w, s, dy, a: w, func_type="aot")
        zeros_like = ops.ZerosLike()

        relu_grad = ReluGrad()

        def bprop(x, w, scale, shift, attrs, out, dout):
            dy = relu_grad(dout, out) if relu else dout
            return (backward_data(x, w, scale, dy, attrs), backward_weights(x, w, scale, dy, weights_attrs),
                    zeros_like(scale), zeros_like(shift), zeros_like(attrs))

        name = "FcosConvForwardScaledRelu" if relu else "FcosConvForwardScaled"  # a bprop per name
        forward_op = ops.Custom(f"{so}:{name}", out_shape=self._forward_shape(),
                                out_dtype=lambda x, *rest: x, func_type="aot", bprop=bprop)
        self._tag((forward_op, backward_data, backward_weights), True)
        return forward_op, attrs

    def construct(self, x):
        if self.folded_norm is not None:
            scale, shift = self.folded_norm.scale_shift()
            return self.forward_op(x, self.weight, scale, shift, self.attrs)
        if self.has_bias:
            return self.forward_op(x, self.weight, self.bias, self.attrs)
        return self.forward_op(x, self.weight, self.attrs)
