"""GroupNorm's C++ custom ops (src/ops/group_norm.cc, NativeGroupNormFunction) against a float64
NumPy GroupNorm and its written-out gradient, and against the portable GroupNormFunction, in
GRAPH and PyNative mode; the library is built from source (tests/conftest.py ops_library)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from src.model.norm import GroupNorm, GroupNormFunction

CASES = [  # (shape, groups, mean offset)
    ((2, 64, 9, 7), 32, 0.0),
    ((3, 12, 5, 5), 4, 40.0),  # a mean far from zero: the variance is taken about the mean
    ((1, 8, 1, 1), 8, 0.0),    # one value per group: xhat is zero
    ((2, 6, 4, 3), 1, 2.0),    # one group over every channel (LayerNorm-like)
]


def numpy_group_norm(x, gamma, beta, groups, eps=1e-5):
    """float64: x (B, C, H, W) -> y, and vjp(dy) -> (dx, dgamma, dbeta), scales: each gradient's
    float32 round-off scale (dx is a difference of terms of size rstd * gamma * dy)."""
    b = x.shape[0]
    grouped = x.reshape(b, groups, -1)
    mean = grouped.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(grouped.var(-1, keepdims=True) + eps)
    xhat = ((grouped - mean) * rstd).reshape(x.shape)
    y = xhat * gamma[:, None, None] + beta[:, None, None]

    def vjp(dy):
        g_dy = (dy * gamma[:, None, None]).reshape(b, groups, -1)
        xh = xhat.reshape(b, groups, -1)
        dx = rstd * (g_dy - g_dy.mean(-1, keepdims=True) - xh * (g_dy * xh).mean(-1, keepdims=True))
        grads = dx.reshape(x.shape), (dy * xhat).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))
        scales = (np.abs(rstd * g_dy).max(), np.abs(grads[1]).max(), np.abs(grads[2]).max())
        return grads, [max(scale, 1.0) for scale in scales]

    return y, vjp


class _Weighted(nn.Cell):
    """sum(f(x, gamma, beta) * w): its gradients are f's vjp at w."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def construct(self, x, gamma, beta, w):
        return (self.function(x, gamma, beta) * w).sum()


def _run(function, x, gamma, beta, w):
    y = function(Tensor(x), Tensor(gamma), Tensor(beta)).asnumpy()
    grads = ms.grad(_Weighted(function), grad_position=(0, 1, 2))(Tensor(x), Tensor(gamma), Tensor(beta), Tensor(w))
    return y, [g.asnumpy() for g in grads]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}")
def test_native_group_norm_matches_float64_reference(ops_library, mode, case):
    from src.ops.group_norm import NativeGroupNormFunction

    shape, groups, offset = case
    rng = np.random.default_rng(sum(shape) + groups)
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    gamma, beta = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    want_y, vjp = numpy_group_norm(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups)
    want, scales = vjp(w.astype(np.float64))

    y, grads = _run(NativeGroupNormFunction(groups, 1e-5), x, gamma, beta, w)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-5 * np.abs(want_y).max())
    for name, got, expected, scale in zip(("dx", "dgamma", "dbeta"), grads, want, scales):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * scale, err_msg=name)

    # and the portable GroupNormFunction it replaces agrees with it
    y_portable, grads_portable = _run(GroupNormFunction(groups, 1e-5), x, gamma, beta, w)
    np.testing.assert_allclose(y, y_portable, rtol=0, atol=2e-5 * np.abs(want_y).max())
    for got, portable, scale in zip(grads, grads_portable, scales):
        np.testing.assert_allclose(got, portable, rtol=0, atol=4e-5 * scale)


def test_the_backend_swaps_group_norms_keeping_parameters_and_outputs(ops_library):
    """The swap keeps GroupNorm's Parameters (names, objects) and its outputs; a network of two
    GroupNorms of different group counts gets both swapped (the statistics' shapes differ)."""
    from src.ops.backend import replace_portable
    from src.ops.group_norm import NativeGroupNormFunction

    network = nn.SequentialCell([GroupNorm(4, 8), nn.ReLU(), GroupNorm(2, 8)])
    rng = np.random.default_rng(3)
    for param in network.get_parameters():
        param.set_data(Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))
    x = Tensor(rng.standard_normal((2, 8, 6, 5)).astype(np.float32))
    before = network(x).asnumpy()
    params = [(p.name, id(p)) for p in network.get_parameters()]

    assert replace_portable(network, only=["group_norm"]) == {"group_norm": 2}
    assert all(isinstance(cell.function, NativeGroupNormFunction) for cell in network if isinstance(cell, GroupNorm))
    assert [(p.name, id(p)) for p in network.get_parameters()] == params
    np.testing.assert_allclose(network(x).asnumpy(), before, rtol=0, atol=1e-5)


def test_native_group_norm_refuses_channels_that_do_not_split(ops_library):
    """A channel count that the groups do not divide is an error from the kernel, not a wrong answer."""
    from src.ops.group_norm import NativeGroupNormFunction

    with pytest.raises(RuntimeError):
        NativeGroupNormFunction(4, 1e-5)(Tensor(np.ones((1, 6, 2, 2), np.float32)), Tensor(np.ones(6, np.float32)),
                                         Tensor(np.zeros(6, np.float32))).asnumpy()
