"""The training step's squared global gradient norm as one C++ custom op on CPU
(src/ops/global_norm.cc): what src/engine/train_step.squared_global_norm computes, in one kernel."""
from mindspore import nn, ops

from src.ops.build import library


class NativeSquaredNorm(nn.Cell):
    """construct(tensors: tuple of float32 tensors) -> float32 scalar, the sum of every element's
    square (not finite when any element is not, or when the sum overflows float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.op = ops.Custom(f"{library()}:FcosSquaredNorm", out_shape=lambda *shapes: [1],
                             out_dtype=lambda *dtypes: dtypes[0], func_type="aot")

    def construct(self, tensors):
        return self.op(*tensors).reshape(())
