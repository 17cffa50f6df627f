"""Trained BatchNorm's C++ custom ops (src/ops/batch_norm.cc, NativeBatchNorm2d) against a float64
NumPy BatchNorm (+ ReLU) and its written-out gradient, against nn.BatchNorm2d, in GRAPH and
PyNative mode, and in a whole training network; the library is built from source
(tests/conftest.py ops_library)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from network_gradients import copy_parameters, training_step_results

CASES = [  # (shape, mean offset, relu)
    ((2, 16, 9, 7), 0.0, False),
    ((3, 5, 5, 5), 40.0, False),  # a mean far from zero: the variance is taken about the mean
    ((4, 8, 6, 3), 0.5, True),    # about half the values below zero after the affine
    ((2, 3, 1, 1), 1.0, True),    # two values per channel
]


def numpy_batch_norm(x, gamma, beta, relu, eps=1e-5):
    """float64: x (B, C, H, W) -> y, the batch's mean and unbiased variance (C,), and
    vjp(dy) -> (dx, dgamma, dbeta) with each gradient's round-off scale."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g, b = gamma[None, :, None, None], beta[None, :, None, None]
    z = xhat * g + b
    y = np.maximum(z, 0) if relu else z

    def vjp(dy):
        dz = dy * (z > 0) if relu else dy
        g_dz = dz * g
        axes = (0, 2, 3)
        dx = rstd * (g_dz - g_dz.mean(axes, keepdims=True) - xhat * (g_dz * xhat).mean(axes, keepdims=True))
        grads = dx, (dz * xhat).sum(axis=axes), dz.sum(axis=axes)
        scales = (np.abs(rstd * g_dz).max(), np.abs(grads[1]).max(), np.abs(grads[2]).max())
        return grads, [max(scale, 1.0) for scale in scales]

    return y, mean.ravel(), x.var(axis=(0, 2, 3), ddof=1), vjp


class _Norm(nn.Cell):
    """bn, then a ReLU when relu (the pair the batch_norm row of src/ops/backend.py fuses)."""

    def __init__(self, channels, relu):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, momentum=0.9)
        self.relu1 = nn.ReLU() if relu else nn.Identity()

    def construct(self, x):
        return self.relu1(self.bn1(x))


class _Weighted(nn.Cell):
    def __init__(self, net, w):
        super().__init__()
        self.net = net
        self.w = w

    def construct(self, x):
        return (self.net(x) * self.w).sum()


def _train_once(net, x, w):
    """One forward + backward in training mode -> y, [dx, dgamma, dbeta], running mean, running variance."""
    net.set_train(True)
    y = net(Tensor(x)).asnumpy()
    grad = ms.grad(_Weighted(net, Tensor(w)), grad_position=0, weights=net.trainable_params())
    dx, (dgamma, dbeta) = grad(Tensor(x))
    return y, [dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy()], net.bn1.moving_mean.asnumpy(), \
        net.bn1.moving_variance.asnumpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-relu{int(c[2])}")
def test_native_batch_norm_matches_float64_reference(ops_library, mode, case):
    from src.ops.backend import SwapPlan, replace_portable
    from src.ops.batch_norm import NativeBatchNorm2d

    shape, offset, relu = case
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    want_y, batch_mean, batch_var, vjp = numpy_batch_norm(x.astype(np.float64), gamma.astype(np.float64),
                                                          beta.astype(np.float64), relu)
    want, scales = vjp(w.astype(np.float64))

    results = []
    for native in (False, True):
        net = _Norm(shape[1], relu)
        net.bn1.gamma.set_data(Tensor(gamma))
        net.bn1.beta.set_data(Tensor(beta))
        if native:
            assert replace_portable(net, SwapPlan.make(relu_pairs=[(net.bn1, net.relu1)] if relu else []),
                                    only=["batch_norm"]) == {"batch_norm": 1}
            assert isinstance(net.bn1, NativeBatchNorm2d) and net.bn1.relu == relu
            assert isinstance(net.relu1, nn.Identity)
        results.append(_train_once(net, x, w))
    (ref_y, ref_grads, ref_mean, ref_var), (y, grads, moving_mean, moving_var) = results

    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-5 * np.abs(want_y).max())
    for name, got, expected, scale in zip(("dx", "dgamma", "dbeta"), grads, want, scales):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * scale, err_msg=name)
    # two training forwards (the call, then the gradient's) from mean 0, variance 1, momentum 0.9
    np.testing.assert_allclose(moving_mean, batch_mean * (1 - 0.9 ** 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moving_var, 0.9 ** 2 + batch_var * (1 - 0.9 ** 2), rtol=1e-5)
    # and nn.BatchNorm2d (+ nn.ReLU), which it replaces, agrees with it
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=2e-5 * np.abs(want_y).max())
    for got, expected, scale in zip(grads, ref_grads, scales):
        np.testing.assert_allclose(got, expected, rtol=0, atol=4e-5 * scale)
    np.testing.assert_allclose(moving_mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moving_var, ref_var, rtol=1e-5)


def test_native_batch_norm_infers_with_the_running_statistics(ops_library):
    """Out of training it is nn.BatchNorm2d's inference (+ the fused ReLU), and the statistics stay."""
    from src.ops.backend import SwapPlan, replace_portable

    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 4, 5, 6)).astype(np.float32))
    values = [rng.uniform(0.2, 1.5, 4).astype(np.float32) for _ in range(4)]
    reference, net = _Norm(4, relu=True), _Norm(4, relu=True)  # two cells: a cell keeps its compiled graph
    for cell in (reference, net):
        for param, value in zip(cell.bn1.get_parameters(), values):
            param.set_data(Tensor(value))
        cell.set_train(False)
    before = reference(x).asnumpy()
    stats = [p.asnumpy().copy() for p in (net.bn1.moving_mean, net.bn1.moving_variance)]
    replace_portable(net, SwapPlan.make(relu_pairs=[(net.bn1, net.relu1)]), only=["batch_norm"])
    got = net(x).asnumpy()
    np.testing.assert_allclose(got, before, rtol=0, atol=1e-6)
    # the native cell's own output against the running statistics written out (not the reference cell)
    mean, var, gamma, beta = values  # get_parameters order: moving mean, variance, gamma, beta
    z = (x.asnumpy() - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * \
        gamma[None, :, None, None] + beta[None, :, None, None]
    np.testing.assert_allclose(got, np.maximum(z, 0), rtol=0, atol=1e-5)
    assert got.min() == 0.0 and (z < 0).any()
    for param, value in zip((net.bn1.moving_mean, net.bn1.moving_variance), stats):
        np.testing.assert_array_equal(param.asnumpy(), value)


def test_backbone_norm_relu_pairs_and_the_swap_in_a_resnet(ops_library):
    """The pairs are each norm and the ReLU that takes only its output (stem, block insides), not
    the ReLUs after a residual sum; the swap keeps every Parameter (names, objects)."""
    from src.model.backbone import ResNet
    from src.ops.backend import SwapPlan, replace_portable
    from src.ops.batch_norm import NativeBatchNorm2d

    for name, inner in (("resnet18", 1), ("resnet50", 2)):
        backbone = ResNet(name, freeze_bn=False, freeze_stage_1=False)
        blocks = sum(len(stage) for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4))
        pairs = backbone.norm_relu_pairs()
        assert len(pairs) == 1 + inner * blocks
        params = [(p.name, id(p)) for p in backbone.get_parameters()]
        norms = sum(type(cell) is nn.BatchNorm2d for _, cell in backbone.cells_and_names())
        assert replace_portable(backbone, SwapPlan.make(relu_pairs=pairs), only=["batch_norm"]) == {"batch_norm": norms}
        assert [(p.name, id(p)) for p in backbone.get_parameters()] == params
        fused = [cell for _, cell in backbone.cells_and_names() if isinstance(cell, NativeBatchNorm2d) and cell.relu]
        assert len(fused) == len(pairs)
        assert sum(isinstance(cell, nn.ReLU) for _, cell in backbone.cells_and_names()) == blocks  # residual ReLUs


def test_a_training_network_with_native_batch_norms_matches_the_portable_one(ops_library):
    """A whole small FCOS with trained BatchNorm, in training mode: build_model's network (every
    custom op, BatchNorm with its ReLU fused) and the portable one give the same loss-like value,
    gradients of every trainable parameter, and running statistics after the step."""
    from src.builder import build_model
    from src.config import load_config

    cfg = load_config(["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
                       "--min_size=[64]", "--max_size=96", "--freeze_bn=False", "--freeze_stage_1=False",
                       "--conv_impl=onednn"])
    ms.set_seed(0)
    portable = build_model(cfg, portable=True)
    native = build_model(cfg)
    assert any(isinstance(cell, nn.Identity) for _, cell in native.cells_and_names())
    copy_parameters(native, portable)
    x = np.random.default_rng(4).standard_normal((2, 3, 64, 96)).astype(np.float32)
    (_, want_value, want, want_stats), (_, value, got, stats) = (training_step_results(network, x)
                                                                 for network in (portable, native))
    assert value == pytest.approx(want_value, rel=1e-4)
    assert got.keys() == want.keys() and len(got) > 40
    largest = max(np.abs(grad).max() for grad in want.values())
    for name, grad in want.items():
        np.testing.assert_allclose(got[name], grad, rtol=0, atol=1e-3 * np.abs(grad).max() + 1e-5 * largest,
                                   err_msg=name)
    assert stats.keys() == want_stats.keys() and len(stats) == 2 * (1 + 2 * 8 + 3)
    for name, stat in want_stats.items():
        np.testing.assert_allclose(stats[name], stat, rtol=1e-4, atol=1e-5, err_msg=name)

