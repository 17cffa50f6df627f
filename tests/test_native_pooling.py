"""The stem max-pool's C++ custom ops (src/ops/pooling.cc, NativeStemMaxPool) against NumPy: torch's
MaxPool2d(3, 2, padding=1) forward, and its gradient sent to each window's first maximum."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn


def numpy_max_pool(x):
    """x (N, C, H, W) -> y (N, C, ceil(H/2), ceil(W/2)), and vjp(dy) -> dx (first maximum, row-major)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    oh, ow = (h + 1) // 2, (w + 1) // 2
    y = np.empty((n, c, oh, ow), x.dtype)
    where = np.empty((n, c, oh, ow, 2), np.int64)
    for b, ch, i, j in np.ndindex(n, c, oh, ow):
        window = padded[b, ch, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
        r, col = np.unravel_index(np.argmax(window), window.shape)  # argmax: the first maximum
        y[b, ch, i, j] = window[r, col]
        where[b, ch, i, j] = (2 * i + r - 1, 2 * j + col - 1)

    def vjp(dy):
        dx = np.zeros_like(x)
        for b, ch, i, j in np.ndindex(n, c, oh, ow):
            r, col = where[b, ch, i, j]
            dx[b, ch, r, col] += dy[b, ch, i, j]
        return dx

    return y, vjp


class _Weighted(nn.Cell):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def construct(self, x, w):
        return (self.pool(x) * w).sum()


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 2, 7, 9), (1, 1, 1, 2), (2, 4, 5, 4), (1, 2, 3, 1), (1, 1, 2, 3),
                                   (1, 2, 6, 7)])
def test_native_stem_max_pool_matches_numpy(ops_library, mode, shape):
    from src.ops.pooling import NativeStemMaxPool

    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)  # negative values too: the padding is -inf
    x.reshape(-1)[::7] = x.reshape(-1)[::7].max()  # ties: the first maximum gets the gradient
    want_y, vjp = numpy_max_pool(x)
    w = rng.standard_normal(want_y.shape).astype(np.float32)
    pool = NativeStemMaxPool()
    np.testing.assert_array_equal(pool(Tensor(x)).asnumpy(), want_y)
    dx = ms.grad(_Weighted(pool))(Tensor(x), Tensor(w)).asnumpy()
    np.testing.assert_allclose(dx, vjp(w), rtol=0, atol=1e-6)


def test_the_backend_replaces_the_stem_pool(ops_library):
    from src.model.backbone import ResNet, StemMaxPool
    from src.ops.backend import replace_portable
    from src.ops.pooling import NativeStemMaxPool

    backbone = ResNet("resnet18", freeze_bn=True, freeze_stage_1=False)
    x = Tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 48)).astype(np.float32))
    before = [out.asnumpy() for out in backbone(x)]
    assert replace_portable(backbone, only=["stem_pool"]) == {"stem_pool": 1}
    assert isinstance(backbone.maxpool, NativeStemMaxPool)
    assert not any(isinstance(cell, StemMaxPool) for _, cell in backbone.cells_and_names())
    for got, want in zip(backbone(x), before):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
