"""Channels-last storage (src/ops/backend.py): every custom op built for it, fed the storage of its
NCHW inputs, gives the storage of the NCHW op's outputs and gradients (the NCHW ops are checked
against NumPy in their own test files), and whole networks built with and without it agree in
training and inference; a network holding a layer that would read the storage as NCHW is refused.
The library is built from source (tests/conftest.py ops_library)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from network_gradients import copy_parameters, training_step_results


def to_storage(x):
    """(N, C, H, W) array -> an array of the same shape holding its values in (N, H, W, C) order."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(x.shape)


def from_storage(x):
    """The inverse of to_storage."""
    n, c, h, w = x.shape
    return x.reshape(n, h, w, c).transpose(0, 3, 1, 2)


class _Weighted(nn.Cell):
    """sum(cell(x) * w)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x, w):
        return (self.cell(x) * w).sum()


class _Weighted2(_Weighted):
    """sum(cell(a, b) * w)."""

    def construct(self, a, b, w):
        return (self.cell(a, b) * w).sum()


def _run(cell, inputs, w, storage):
    """cell on inputs (NCHW arrays; their storage when storage) -> y, gradients of sum(y * w) in
    the inputs, then in the cell's trainable parameters, all as NCHW arrays."""
    convert = to_storage if storage else (lambda a: a)
    back = from_storage if storage else (lambda a: a)
    tensors = tuple(Tensor(convert(a)) for a in inputs)
    y = back(cell(*tensors).asnumpy())
    objective = (_Weighted if len(inputs) == 1 else _Weighted2)(cell)
    positions = 0 if len(inputs) == 1 else tuple(range(len(inputs)))
    d_inputs, d_params = ms.grad(objective, grad_position=positions, weights=cell.trainable_params())(
        *tensors, Tensor(convert(w)))
    d_inputs = (d_inputs,) if len(inputs) == 1 else d_inputs
    return y, [back(g.asnumpy()) for g in d_inputs] + [g.asnumpy() for g in d_params]


def _assert_same(got, want, what, tolerance=2e-5):
    for index, (a, b) in enumerate(zip(got, want)):
        scale = max(float(np.abs(b).max()), 1.0)
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * scale, err_msg=f"{what} [{index}]")


CONV_CASES = [  # (x shape, out channels, kernel, stride, padding, dilation, groups, bias)
    ((2, 16, 9, 11), 32, 3, 1, 1, 1, 1, True),
    ((1, 8, 10, 7), 16, 3, 2, 1, 1, 2, False),
    ((2, 16, 6, 6), 8, 1, 2, 0, 1, 1, True),
    ((1, 3, 13, 12), 16, 7, 2, 3, 1, 1, False),  # the stem: 3 channels in
    ((2, 8, 9, 9), 4, 3, 1, 2, 2, 1, True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-k{c[2]}s{c[3]}g{c[6]}")
@pytest.mark.parametrize("layout", [(False, True), (True, False), (True, True)], ids=["x-nchw", "y-nchw", "both"])
def test_convolution_in_each_storage(ops_library, case, layout):
    from src.ops.conv import OneDNNConv2d

    shape, out_channels, kernel, stride, padding, dilation, groups, bias = case
    rng = np.random.default_rng(sum(shape) + kernel)
    x = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    results = []
    for x_last, y_last in ((False, False), layout):
        ms.set_seed(1)
        conv = OneDNNConv2d(shape[1], out_channels, kernel, stride=stride, pad_mode="pad", padding=padding,
                            dilation=dilation, group=groups, has_bias=bias, x_channels_last=x_last,
                            y_channels_last=y_last)
        if bias:
            conv.bias.set_data(Tensor(b))
        y = conv(Tensor(to_storage(x) if x_last else x)).asnumpy()
        y = from_storage(y) if y_last else y
        w = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
        objective = ms.grad(_Weighted(conv), grad_position=0, weights=conv.trainable_params())
        dx, d_params = objective(Tensor(to_storage(x) if x_last else x), Tensor(to_storage(w) if y_last else w))
        dx = from_storage(dx.asnumpy()) if x_last else dx.asnumpy()
        results.append([y, dx] + [g.asnumpy() for g in d_params])
    _assert_same(results[1], results[0], "conv")


@pytest.mark.parametrize("shape,relu", [((4, 16, 9, 7), True), ((2, 5, 3, 3), False), ((3, 70, 20, 20), True)])
def test_batch_norm_in_channels_last_storage(ops_library, mode, shape, relu):
    """Training: y, gradients and the running statistics; then inference with those statistics."""
    from src.ops.batch_norm import NativeBatchNorm2d

    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    results = []
    for storage in (False, True):
        norm = NativeBatchNorm2d(shape[1], momentum=0.9, relu=relu, channels_last=storage)
        norm.gamma.set_data(Tensor(gamma))
        norm.beta.set_data(Tensor(beta))
        norm.set_train(True)
        y, grads = _run(norm, (x,), w, storage)
        stats = [norm.moving_mean.asnumpy(), norm.moving_variance.asnumpy()]
        norm.set_train(False)
        inferred = norm(Tensor(to_storage(x) if storage else x)).asnumpy()
        results.append([y] + grads + stats + [from_storage(inferred) if storage else inferred])
    _assert_same(results[1], results[0], "batch norm")
    # the channels-last inference itself, against the running statistics written out (a fused ReLU
    # that the storage dropped, or statistics read per pixel instead of per channel, fail here)
    mean, var = results[1][-3].astype(np.float64), results[1][-2].astype(np.float64)
    z = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * gamma[None, :, None, None] \
        + beta[None, :, None, None]
    np.testing.assert_allclose(results[1][-1], np.maximum(z, 0) if relu else z, rtol=0, atol=1e-5 * np.abs(z).max())
    assert (results[1][-1].min() == 0.0) == relu


@pytest.mark.parametrize("shape,groups", [((2, 64, 9, 7), 32), ((3, 12, 5, 5), 4), ((1, 8, 1, 1), 8),
                                          ((2, 32, 30, 31), 8)])
def test_group_norm_in_channels_last_storage(ops_library, mode, shape, groups):
    from src.ops.group_norm import NativeGroupNormFunction

    rng = np.random.default_rng(sum(shape) + groups)
    x = (rng.standard_normal(shape) * 2 + 3.0).astype(np.float32)
    gamma, beta = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)

    class Norm(nn.Cell):
        def __init__(self, storage):
            super().__init__()
            self.gamma = ms.Parameter(Tensor(gamma), name="gamma")
            self.beta = ms.Parameter(Tensor(beta), name="beta")
            self.function = NativeGroupNormFunction(groups, 1e-5, channels_last=storage)

        def construct(self, x):
            return self.function(x, self.gamma, self.beta)

    results = [_run(Norm(storage), (x,), w, storage) for storage in (False, True)]
    _assert_same([results[1][0]] + results[1][1], [results[0][0]] + results[0][1], "group norm")


@pytest.mark.parametrize("shape", [(2, 16, 12, 10), (1, 8, 7, 9), (2, 3, 2, 1), (1, 64, 33, 32)])
def test_stem_pool_in_channels_last_storage(ops_library, mode, shape):
    """Integer values: windows with tied maxima, whose gradient goes to the first one either way."""
    from src.ops.pooling import NativeStemMaxPool

    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-3, 4, shape).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((shape[0], shape[1], (shape[2] + 1) // 2,
                                                  (shape[3] + 1) // 2)).astype(np.float32)
    results = [_run(NativeStemMaxPool(storage), (x,), w, storage) for storage in (False, True)]
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1][0], results[0][1][0])  # the same sums in the same order


@pytest.mark.parametrize("top,size", [((2, 8, 3, 4), (6, 8)), ((1, 16, 5, 3), (9, 7)), ((2, 4, 1, 1), (3, 2))])
def test_fpn_merge_in_channels_last_storage(ops_library, mode, top, size):
    from src.ops.upsample import NativeUpsampleAdd

    rng = np.random.default_rng(sum(top))
    lateral = rng.standard_normal((top[0], top[1]) + size).astype(np.float32)
    coarse = rng.standard_normal(top).astype(np.float32)
    w = rng.standard_normal(lateral.shape).astype(np.float32)
    results = [_run(NativeUpsampleAdd(storage), (lateral, coarse), w, storage) for storage in (False, True)]
    np.testing.assert_array_equal(results[1][0], results[0][0])
    _assert_same(results[1][1], results[0][1], "merge gradients", tolerance=1e-6)


def _config(*overrides):
    from src.config import load_config

    return load_config(["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=2",
                        "--conv_impl=onednn", *overrides])


NETWORKS = {  # the layers each storage must carry: trained BatchNorm + ReLU, folded frozen norms, GroupNorm
    "trained-bn": ("--freeze_bn=False", "--freeze_stage_1=False"),
    "frozen-bn-c5": ("--freeze_bn=True", "--use_p5=False"),
    "gn-backbone": ("--backbone_norm=GN", "--freeze_stage_1=False", "--use_GN_head=False"),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_networks_agree_with_and_without_channels_last(ops_library, name):
    """build_model with channels_last on and off (both on the custom ops), the same weights, an
    input whose sizes halve unevenly: the outputs in inference and training, the gradients of every
    trainable parameter and the running statistics agree."""
    from src.builder import build_model
    from src.ops.conv import OneDNNConv2d

    networks = {}
    for storage in (False, True):
        ms.set_seed(0)
        networks[storage] = build_model(_config(*NETWORKS[name], f"--channels_last={storage}"))
    layouts = {cell.layout for _, cell in networks[True].cells_and_names() if isinstance(cell, OneDNNConv2d)}
    assert layouts == {(0, 1), (1, 1), (1, 0)}
    copy_parameters(networks[True], networks[False])
    x = np.random.default_rng(3).standard_normal((2, 3, 70, 90)).astype(np.float32)
    results = []
    for storage in (False, True):
        network = networks[storage]
        trained = training_step_results(network, x)
        network.set_train(False)
        results.append(trained + ([out.asnumpy() for out in network(Tensor(x))],))
    (outputs0, value0, grads0, stats0, inferred0), (outputs1, value1, grads1, stats1, inferred1) = results
    _assert_same(outputs1, outputs0, "training outputs", 1e-4)
    _assert_same(inferred1, inferred0, "inference outputs", 1e-4)
    assert value1 == pytest.approx(value0, rel=1e-5)
    # Round-off differs (other oneDNN kernels, other summation orders) and a deep random network
    # amplifies it in a few weights' gradients: up to ~1.4e-3 of a gradient's largest value between
    # the NCHW custom ops and MindSpore's kernels on the GroupNorm backbone. A layout mistake
    # differs everywhere, by the gradient's size.
    largest = max(np.abs(grad).max() for grad in grads0.values())
    for key, grad in grads0.items():
        np.testing.assert_allclose(grads1[key], grad, rtol=0, atol=5e-3 * np.abs(grad).max() + 1e-5 * largest,
                                   err_msg=key)
    assert stats1.keys() == stats0.keys()
    for key, stat in stats0.items():
        np.testing.assert_allclose(stats1[key], stat, rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_layer_left_on_nchw_is_refused(ops_library):
    from src.builder import build_model
    from src.model.fpn import UpsampleAdd
    from src.ops.backend import check_channels_last

    network = build_model(_config())
    check_channels_last(network)
    network.fpn.merge = UpsampleAdd()
    with pytest.raises(ValueError, match="fpn.merge"):
        check_channels_last(network)
