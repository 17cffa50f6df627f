"""src/ops: OneDNNConv2d (oneDNN custom ops) against a float64 NumPy convolution and nn.Conv2d.

Forward: the NumPy reference to float32 round-off. Backward: MindSpore's gradients of
sum(conv(x) * dy) must equal nn.Conv2d's, and satisfy the adjoint identities of a linear map in
float64 (<dy, conv_w(x)> = <dx, x> = <dw, w> without bias; db = sum of dy), which any wrong
index in the backward kernels breaks. Stride, padding, dilation, groups and bias, in GRAPH and
PyNative mode; the library is built from source by the first test (src/ops/build.py).
"""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from conftest import ROOT
from network_gradients import network_gradients
from src.ops.build import OpsUnavailable, build

# (in, out, kernel, stride, padding, dilation, groups, bias, (H, W))
CASES = [
    (8, 16, 3, 1, 1, 1, 1, True, (12, 15)),
    (8, 16, 3, 2, 1, 1, 1, False, (13, 16)),
    (8, 16, 3, 1, 2, 2, 4, True, (11, 14)),    # dilated, grouped (ResNeXt)
    (6, 4, 1, 2, 0, 1, 1, True, (9, 10)),      # 1x1 stride-2 projection
    (3, 8, 7, 2, 3, 1, 1, False, (19, 22)),    # the stem
    (32, 48, 3, 1, 1, 1, 1, True, (9, 11)),    # channels in blocks of 16: blocked layouts
]


def numpy_conv(x, w, b, stride, pad, dilation, groups):
    """float64 reference: x (N, C, H, W), w (O, C/groups, KH, KW) -> (N, O, OH, OW)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation:i * dilation + stride * oh:stride,
                           j * dilation:j * dilation + stride * ow:stride][:, :, :oh, :ow]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out if b is None else out + b[None, :, None, None]


class _Objective(nn.Cell):
    """sum(conv(x) * dy): its gradients are the backward of conv at dy."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def construct(self, x, dy):
        return (self.conv(x) * dy).sum()


def gradients(conv, x, dy):
    """-> (dx, dw[, db]) as float64 NumPy."""
    grad = ms.value_and_grad(_Objective(conv), grad_position=0, weights=conv.trainable_params())
    _, (dx, weight_grads) = grad(Tensor(x), Tensor(dy))
    return [dx.asnumpy().astype(np.float64)] + [g.asnumpy().astype(np.float64) for g in weight_grads]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}b{int(c[7])}")
def test_onednn_conv_matches_numpy_and_nn_conv2d(ops_library, mode, case):
    c_in, c_out, k, stride, pad, dilation, groups, bias, (h, w) = case
    rng = np.random.default_rng(sum(case[:7]))
    kwargs = dict(stride=stride, pad_mode="pad", padding=pad, dilation=dilation, group=groups, has_bias=bias)
    reference = nn.Conv2d(c_in, c_out, k, **kwargs)
    ours = ops_library(c_in, c_out, k, **kwargs)
    weight = rng.standard_normal(reference.weight.shape).astype(np.float32)
    reference.weight.set_data(Tensor(weight))
    ours.weight.set_data(Tensor(weight))
    b = None
    if bias:
        b = rng.standard_normal(c_out).astype(np.float32)
        reference.bias.set_data(Tensor(b))
        ours.bias.set_data(Tensor(b))
    assert [p.name for p in ours.get_parameters()] == [p.name for p in reference.get_parameters()]
    x = rng.standard_normal((2, c_in, h, w)).astype(np.float32)

    y = ours(Tensor(x)).asnumpy()
    want = numpy_conv(x.astype(np.float64), weight.astype(np.float64), None if b is None else b.astype(np.float64),
                      stride, pad, dilation, groups)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * np.abs(want).max())

    dy = rng.standard_normal(y.shape).astype(np.float32)
    got, theirs = gradients(ours, x, dy), gradients(reference, x, dy)
    for name, g_ours, g_ref in zip(("dx", "dw", "db"), got, theirs):
        np.testing.assert_allclose(g_ours, g_ref, rtol=0, atol=2e-5 * np.abs(g_ref).max(), err_msg=name)
    dx, dw = got[0], got[1]
    linear = numpy_conv(x.astype(np.float64), weight.astype(np.float64), None, stride, pad, dilation, groups)
    inner = float((linear * dy).sum())
    assert float((dx * x).sum()) == pytest.approx(inner, rel=1e-5)       # d/dx of a map linear in x
    assert float((dw * weight).sum()) == pytest.approx(inner, rel=1e-5)  # ... and linear in w
    if bias:
        np.testing.assert_allclose(got[2], dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_the_layers_again_with_the_isa_cap_lifted(ops_library):
    """The checks above in a process of their own with oneDNN's ISA cap lifted, as a training run
    has it: oneDNN then picks other kernels (AVX-512, blocked layouts) and other reorders."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "FCOS_ISA_CAP_DEFAULT")}
    env["FCOS_TEST_LIFT_ISA"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__,
                           "-k", "matches_numpy or with_and_without_bias"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{2 * len(CASES) + 2} passed" in done.stdout


def test_onednn_conv_refuses_padding_it_does_not_take(ops_library):
    with pytest.raises(ValueError, match="symmetric 'pad'"):
        ops_library(4, 4, 3, pad_mode="pad", padding=(1, 0, 1, 1))
    with pytest.raises(ValueError, match="pad_mode 'valid'"):
        ops_library(4, 4, 3, pad_mode="same")


def test_build_reports_missing_headers_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FCOS_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONEDNN_INCLUDE", str(tmp_path / "nowhere"))
    import src.ops.build as ops_build

    monkeypatch.setattr(ops_build.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(ops_build.sys, "base_prefix", str(tmp_path))
    monkeypatch.setattr(ops_build.sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
    with pytest.raises(OpsUnavailable, match=r"no oneDNN headers .*pip install --no-deps \"onednn-devel"):
        build()
    assert not (tmp_path / "cache").exists()


class _TwoLayers(nn.Cell):
    def __init__(self, conv_class):
        super().__init__()
        self.first = conv_class(3, 8, 3, pad_mode="pad", padding=1, has_bias=False)
        self.second = conv_class(8, 4, 3, stride=2, pad_mode="pad", padding=1, has_bias=True)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.second(self.relu(self.first(x)))


def test_onednn_convs_with_and_without_bias_in_one_network(ops_library, mode):
    """Layers with and without a bias in one graph: each kind keeps its own backward."""
    rng = np.random.default_rng(5)
    reference, ours = _TwoLayers(nn.Conv2d), _TwoLayers(ops_library)
    for theirs, mine in zip(reference.get_parameters(), ours.get_parameters()):
        mine.set_data(Tensor(rng.standard_normal(theirs.shape).astype(np.float32)))
        theirs.set_data(Tensor(mine.asnumpy()))
    x = rng.standard_normal((2, 3, 10, 12)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    for got, want in zip(gradients(ours, x, dy), gradients(reference, x, dy)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_accelerate_keeps_the_networks_outputs_and_gradients(ops_library, freeze_bn):
    """With freeze_bn the backbone's frozen BatchNorms are folded into the convolutions before
    them (the *Scaled ops, in training and inference) with the ReLU after them, and the head's GroupNorms, the stem's
    max-pool and the FPN's merge run on their custom ops: outputs and every trainable gradient stay those of the portable network."""
    from src.builder import build_model
    from src.config import load_config
    from src.ops.backend import SwapPlan, fold_frozen_norms, replace_portable

    cfg = load_config(["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
                       "--min_size=[64]", "--max_size=96", f"--freeze_bn={freeze_bn}", "--freeze_stage_1=False"])
    ms.set_seed(0)
    network = build_model(cfg, portable=True)
    network.head.set_stacking(False)
    rng = np.random.default_rng(9)
    pairs = network.backbone.frozen_norm_pairs()
    for _, norm in pairs:  # statistics and affine far from the identity
        for param, (low, high) in zip((norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance),
                                      ((0.5, 2.0), (-1.0, 1.0), (-1.0, 1.0), (0.2, 3.0))):
            param.set_data(Tensor(rng.uniform(low, high, param.shape).astype(np.float32)))
    # resnet18: the stem, 2 per block, 3 downsamples
    assert len(pairs) == (1 + 2 * 8 + 3 if freeze_bn else 0)
    x = rng.standard_normal((2, 3, 64, 96)).astype(np.float32)
    outputs = [out.asnumpy() for out in network(Tensor(x))]
    weights = [Tensor(rng.standard_normal(out.shape).astype(np.float32)) for out in outputs]
    convs = sum(type(cell) is nn.Conv2d for _, cell in network.cells_and_names())
    want_value, want = network_gradients(network, x, weights)
    names = [p.name for p in network.get_parameters()]

    plan = SwapPlan.make(fold=pairs, relu_pairs=network.backbone.norm_relu_pairs())
    assert fold_frozen_norms(pairs) == len(pairs)
    assert replace_portable(network, plan, only=["convolution"]) == {"convolution": convs} and convs > 20
    assert not any(type(cell) is nn.Conv2d for _, cell in network.cells_and_names())
    # the ReLU after each folded norm of the stem and the blocks (1 + 8) is the convolution's
    fused = [cell for _, cell in network.cells_and_names() if isinstance(cell, ops_library) and cell.relu]
    assert len(fused) == (1 + 8 if freeze_bn else 0)
    assert sum(isinstance(cell, nn.Identity) for _, cell in network.cells_and_names()) == len(fused)
    assert [p.name for p in network.get_parameters()] == names  # checkpoints unchanged
    assert all(norm.folded for _, norm in pairs)
    # one GroupNorm per tower; trained BatchNorm stays (its gradients are taken in training mode, in
    # tests/test_native_batch_norm.py; here they are taken out of training)
    assert replace_portable(network, plan, only=["group_norm", "stem_pool", "fpn_merge"]) == {
        "group_norm": 2, "stem_pool": 1, "fpn_merge": 1}
    if freeze_bn:  # (trained BatchNorm would normalise by the batch in training mode)
        network.set_train(True)
        for trained, expected in zip(network(Tensor(x)), outputs):
            np.testing.assert_allclose(trained.asnumpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        network.set_train(False)
    got_value, got = network_gradients(network, x, weights)
    assert got_value == pytest.approx(want_value, rel=1e-4)
    assert got.keys() == want.keys() and len(got) > 20
    # Each array to 1e-3 of its largest value, plus 1e-5 of the largest of all: a conv bias right
    # before GroupNorm has a gradient that is zero but for round-off (GN removes a constant).
    largest = max(np.abs(grad).max() for grad in want.values())
    errors = {name: np.abs(got[name] - grad).max() / (np.abs(grad).max() + 1e-2 * largest)
              for name, grad in want.items()}
    print("largest error over (max|grad| + 1% of the largest):", max(errors.values()))
    for name, grad in want.items():
        np.testing.assert_allclose(got[name], grad, rtol=0, atol=1e-3 * np.abs(grad).max() + 1e-5 * largest,
                                   err_msg=name)


def test_every_swapped_convolution_runs(ops_library):
    """Every OneDNNConv2d the swap puts in runs in the forward pass, those inside a SequentialCell
    (the backbone's downsample projections) too: SequentialCell runs its own list of cells, which
    insert_child_to_cell does not update (the old nn.Conv2d kept running there)."""
    from src.builder import build_model
    from src.config import load_config
    from src.ops.backend import replace_portable

    cfg = load_config(["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
                       "--min_size=[64]", "--max_size=96"])
    network = build_model(cfg, portable=True)
    network.head.set_stacking(False)
    replaced = replace_portable(network, only=["convolution"])["convolution"]
    calls = {}
    for name, cell in network.cells_and_names():
        if isinstance(cell, ops_library):
            cell.register_forward_hook(lambda cell, inputs, output, name=name: calls.__setitem__(name, 1))
    ms.set_context(mode=ms.PYNATIVE_MODE)  # forward hooks run in PyNative
    try:
        network(Tensor(np.zeros((1, 3, 64, 96), np.float32)))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert any("downsample" in name for name in calls)
    assert len(calls) == replaced


def _small_config(*overrides):
    from src.config import load_config

    return load_config(["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
                        "--min_size=[64]", "--max_size=96", *overrides])


@pytest.mark.parametrize("conv_impl, amp_level, portable, want", [
    ("auto", "O0", False, True), ("onednn", "O0", False, True), ("mindspore", "O0", False, False),
    ("auto", "O0", True, False), ("auto", "O3", False, False)])
def test_build_model_puts_in_the_convolutions_conv_impl_selects(ops_library, conv_impl, amp_level, portable, want):
    """Every convolution becomes a oneDNN custom op on CPU (the head unstacked, as its stacked
    convs call ops.Conv2D), or none does: portable networks (exports) and mixed precision keep
    MindSpore's."""
    from src.builder import build_model

    network = build_model(_small_config(f"--conv_impl={conv_impl}", f"--amp_level={amp_level}"), portable)
    kinds = {type(cell) for _, cell in network.cells_and_names() if isinstance(cell, nn.Conv2d)}
    assert kinds == ({ops_library} if want else {nn.Conv2d})
    assert network.head.stack_towers is not want


def test_conv_impl_on_other_devices_and_with_mixed_precision(ops_library):
    from src.builder import build_model
    from src.config import ConfigError
    from src.ops.backend import enable_native_ops

    assert not enable_native_ops("onednn", "Ascend") and not enable_native_ops("auto", "GPU")
    with pytest.raises(ConfigError, match=r"--conv_impl=onednn: .*float32 only \(amp_level=O2\)"):
        build_model(_small_config("--conv_impl=onednn", "--amp_level=O2"))


def test_without_the_ops_auto_falls_back_in_one_line_and_onednn_is_an_error(tmp_path, monkeypatch, caplog):
    import logging

    import src.ops.build as ops_build
    import src.ops.backend as ops_backend
    from src.builder import build_model
    from src.config import ConfigError
    from src.ops.conv import OneDNNConv2d
    from src.ops.group_norm import NativeGroupNormFunction

    monkeypatch.setattr(ops_build, "_LIBRARY", None)
    monkeypatch.setattr(ops_backend, "_said", set())
    monkeypatch.setenv("FCOS_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONEDNN_INCLUDE", str(tmp_path / "nowhere"))
    for name in ("prefix", "base_prefix"):
        monkeypatch.setattr(ops_build.sys, name, str(tmp_path))
    monkeypatch.setattr(ops_build.sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
    with caplog.at_level(logging.INFO, logger="fcos"):
        network = build_model(_small_config())
    assert not any(isinstance(cell, (OneDNNConv2d, NativeGroupNormFunction)) for _, cell in network.cells_and_names())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("CPU convolutions: MindSpore's Conv2D") and \
        "no oneDNN headers" in warnings[0]
    with pytest.raises(ConfigError, match=r"^--conv_impl=onednn: no oneDNN headers"):
        build_model(_small_config("--conv_impl=onednn"))


def test_export_refuses_a_network_with_custom_op_convolutions(ops_library, tmp_path):
    from src.builder import build_inference, build_model
    from src.inference.export import export_model

    cfg = _small_config("--conv_impl=onednn")
    network = build_model(cfg)
    assert network.backend["kind"] == "native" and network.backend["layout"] == "channels_last"
    with pytest.raises(ValueError, match=r"runs on the CPU native ops \(build the network with portable=True\)"):
        export_model(build_inference(cfg, network), Tensor(np.zeros((1, 3, 64, 96), np.float32)),
                     str(tmp_path / "fcos.mindir"), "MINDIR")
    assert not list(tmp_path.iterdir())
