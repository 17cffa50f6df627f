"""The FPN merge's C++ custom ops (src/ops/upsample.cc, NativeUpsampleAdd) against NumPy and against
the portable UpsampleAdd (MindSpore's ResizeNearestNeighbor + Add): values and gradients, doubled
and odd sizes, GRAPH and PyNative."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.model.fpn import UpsampleAdd

SIZES = [((2, 3, 4, 5), (8, 10)), ((1, 2, 7, 5), (13, 9)), ((2, 4, 25, 38), (50, 76)), ((1, 1, 1, 1), (3, 2))]


class _Weighted(nn.Cell):
    def __init__(self, merge):
        super().__init__()
        self.merge = merge

    def construct(self, lateral, top, w):
        return (self.merge(lateral, top) * w).sum()


@pytest.mark.parametrize("top_shape,size", SIZES, ids=lambda v: "x".join(map(str, v)))
def test_native_upsample_add_matches_numpy_and_the_portable_merge(ops_library, mode, top_shape, size):
    from src.ops.upsample import NativeUpsampleAdd

    rng = np.random.default_rng(sum(top_shape) + sum(size))
    top = rng.standard_normal(top_shape).astype(np.float32)
    lateral = rng.standard_normal((*top_shape[:2], *size)).astype(np.float32)
    w = rng.standard_normal(lateral.shape).astype(np.float32)
    rows = np.arange(size[0]) * top_shape[2] // size[0]  # torch's nearest: floor(dst * in / out)
    cols = np.arange(size[1]) * top_shape[3] // size[1]
    want = lateral + top[:, :, rows][:, :, :, cols]
    want_dtop = np.zeros_like(top)
    np.add.at(want_dtop, (slice(None), slice(None), rows[:, None], cols[None, :]), w)

    outputs = {}
    for name, merge in (("native", NativeUpsampleAdd()), ("portable", UpsampleAdd())):
        y = merge(Tensor(lateral), Tensor(top)).asnumpy()
        grads = ms.grad(_Weighted(merge), grad_position=(0, 1))(Tensor(lateral), Tensor(top), Tensor(w))
        outputs[name] = (y, *[g.asnumpy() for g in grads])
    y, dlateral, dtop = outputs["native"]
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(dlateral, w)
    np.testing.assert_allclose(dtop, want_dtop, rtol=0, atol=1e-5)
    for got, portable in zip(outputs["native"], outputs["portable"]):
        np.testing.assert_allclose(got, portable, rtol=0, atol=1e-5)


def test_the_backend_replaces_the_fpn_merge(ops_library):
    from src.model.fpn import FPN
    from src.ops.backend import replace_portable
    from src.ops.upsample import NativeUpsampleAdd

    fpn = FPN([8, 16, 32], 8)
    rng = np.random.default_rng(0)
    features = tuple(Tensor(rng.standard_normal((1, c, 16 // s, 20 // s)).astype(np.float32))
                     for c, s in ((8, 1), (16, 2), (32, 4)))
    before = [out.asnumpy() for out in fpn(features)]
    assert replace_portable(fpn, only=["fpn_merge"]) == {"fpn_merge": 1}
    assert isinstance(fpn.merge, NativeUpsampleAdd)
    for got, want in zip(fpn(features), before):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-5)
