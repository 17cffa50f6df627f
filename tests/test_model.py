"""The FCOS network's modules: shapes, backbones, output modes, freezing and normalisation."""
import math
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src.model.backbone import ARCHITECTURES, ResNet, StemMaxPool
from src.model.fcos import FCOS
from src.model.fpn import _upsample_like
from src.model.head import FCOSHead
from src.model.norm import FrozenBatchNorm2d, GroupNorm

STRIDES = (8, 16, 32, 64, 128)
# torchvision.models parameter counts, including the 1000-class fc layer.
TORCHVISION_PARAMS = {"resnet18": 11689512, "resnet34": 21797672, "resnet50": 25557032,
                      "resnet101": 44549160, "resnet152": 60192808, "resnext101_32x8d": 88791336,
                      "resnext101_64x4d": 83455272}


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def small_fcos(**kwargs):
    args = dict(backbone="resnet18", class_num=3, fpn_out_channels=32)
    args.update(kwargs)
    net = FCOS(**args)
    net.set_train(False)
    return net


def images(height, width, batch=2, seed=0):
    return ms.Tensor(np.random.RandomState(seed).randn(batch, 3, height, width).astype(np.float32))


def param(net, name):
    return next(p for p in net.get_parameters() if p.name == name)


@pytest.mark.parametrize("height,width", [(96, 160), (100, 150)])
def test_output_shapes(height, width):
    cls_logits, bbox_reg, centerness = small_fcos()(images(height, width))
    points = sum(math.ceil(height / s) * math.ceil(width / s) for s in STRIDES)
    assert cls_logits.shape == (2, points, 3)
    assert bbox_reg.shape == (2, points, 4)
    assert centerness.shape == (2, points, 1)
    assert (bbox_reg.asnumpy() >= 0).all()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_backbone_parameter_counts_match_torchvision(name):
    net = ResNet(name, freeze_bn=False)
    fc = 1000 * net.out_channels[-1] + 1000
    # torchvision counts BN weight/bias as parameters, running statistics as buffers.
    count = sum(p.size for p in net.get_parameters() if not p.name.endswith(("moving_mean", "moving_variance")))
    assert count == TORCHVISION_PARAMS[name] - fc
    assert net.out_channels == ((128, 256, 512) if name in ("resnet18", "resnet34") else (512, 1024, 2048))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_forward(name):
    net = ResNet(name)
    net.set_train(False)
    outputs = net(images(64, 96, batch=1))
    assert [o.shape for o in outputs] == [(1, c, 64 // s, 96 // s) for c, s in zip(net.out_channels, (8, 16, 32))]


def test_fpn_upsampling_is_torch_nearest_for_odd_sizes():
    x = np.random.RandomState(1).randn(1, 2, 7, 5).astype(np.float32)
    out = _upsample_like(ms.Tensor(x), ms.Tensor(np.zeros((1, 1, 13, 9), np.float32))).asnumpy()
    rows = np.floor(np.arange(13) * 7 / 13).astype(int)  # torch: src = floor(dst * in / out)
    cols = np.floor(np.arange(9) * 5 / 9).astype(int)
    np.testing.assert_array_equal(out, x[:, :, rows][:, :, :, cols])


def test_initialisation():
    net = small_fcos(prior=0.01)
    np.testing.assert_allclose(param(net, "head.cls_logits.bias").asnumpy(), -math.log(99), rtol=1e-6)
    assert all(float(param(net, f"head.scales.{i}.scale").asnumpy()) == 1.0 for i in range(5))
    assert abs(float(param(net, "head.cls_tower.0.weight").asnumpy().std()) - 0.01) < 0.001
    assert not param(net, "fpn.lateral.0.bias").asnumpy().any()
    # kaiming_uniform(a=1): U(-b, b) with b = sqrt(3 / fan_in)
    fpn_weight = param(net, "fpn.output.0.weight").asnumpy()
    bound = math.sqrt(3 / (32 * 9))
    assert np.abs(fpn_weight).max() <= bound and np.abs(fpn_weight).max() > 0.9 * bound


def test_paper_mode_regression_is_exp_of_scaled_output():
    net = small_fcos(norm_reg_targets=False, strides=(8, 16, 32))
    param(net, "head.scales.1.scale").set_data(ms.Tensor(0.0, ms.float32))
    bbox_reg = net(images(64, 96))[1].asnumpy()
    level1 = slice(8 * 12, 8 * 12 + 4 * 6)
    assert (bbox_reg > 0).all()
    np.testing.assert_array_equal(bbox_reg[:, level1], 1.0)  # exp(0 * x)
    assert not np.allclose(bbox_reg[:, :level1.start], 1.0)


def test_without_centerness_the_output_is_zeros():
    net = small_fcos(add_centerness=False)
    assert not any("centerness" in p.name for p in net.get_parameters())
    centerness = net(images(64, 64))[2].asnumpy()
    assert centerness.shape == (2, 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1, 1)
    assert not centerness.any()


@pytest.mark.parametrize("cnt_on_reg", [True, False])
def test_centerness_branch_reads_the_chosen_tower(cnt_on_reg):
    net = small_fcos(cnt_on_reg=cnt_on_reg, strides=(8, 16, 32))
    x = images(64, 64)
    before = net(x)[2].asnumpy()
    read, unread = ((net.head.reg_tower, net.head.cls_tower) if cnt_on_reg
                    else (net.head.cls_tower, net.head.reg_tower))
    unread[0].weight.set_data(unread[0].weight * 3)
    np.testing.assert_array_equal(net(x)[2].asnumpy(), before)
    read[0].weight.set_data(read[0].weight * 3)
    assert not np.allclose(net(x)[2].asnumpy(), before)


@pytest.mark.parametrize("use_gn, cnt_on_reg, add_centerness, stacking", [
    (True, True, True, True), (False, True, True, True), (True, False, True, True), (True, True, False, True),
    (True, True, True, False)])
def test_stacked_head_convs_match_the_layers_run_one_by_one(use_gn, cnt_on_reg, add_centerness, stacking):
    """The head stacks convs that share an input (unless set_stacking(False)); the towers and
    outputs run cell by cell must agree."""
    rng = np.random.RandomState(4)
    head = FCOSHead(32, 3, num_levels=2, use_gn=use_gn, cnt_on_reg=cnt_on_reg, add_centerness=add_centerness)
    head.set_stacking(stacking)
    for p in head.get_parameters():  # away from the init (zero biases, unit gammas) so mix-ups show
        p.set_data(ms.Tensor(rng.uniform(0.5, 1.5, p.shape).astype(np.float32)))
    features = [ms.Tensor(rng.randn(2, 32, size, size).astype(np.float32)) for size in (6, 3)]
    cls_logits, bbox_reg, centerness = (o.asnumpy() for o in head(features))
    cls_ref, reg_ref, ctr_ref = [], [], []
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the reference layer by layer, without a graph per layer
    try:
        for feature, scale in zip(features, head.scales):
            cls_feat, reg_feat = feature, feature
            for cls_layer, reg_layer in zip(head.cls_tower, head.reg_tower):
                cls_feat, reg_feat = cls_layer(cls_feat), reg_layer(reg_feat)
            flat = lambda x: x.asnumpy().transpose(0, 2, 3, 1).reshape(2, -1, x.shape[1])
            cls_ref.append(flat(head.cls_logits(cls_feat)))
            reg_ref.append(np.maximum(flat(head.bbox_reg(reg_feat)) * scale.scale.asnumpy(), 0))
            if add_centerness:
                ctr_ref.append(flat(head.centerness(reg_feat if cnt_on_reg else cls_feat)))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(cls_logits, np.concatenate(cls_ref, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bbox_reg, np.concatenate(reg_ref, 1), rtol=1e-4, atol=1e-4)
    expected_ctr = np.concatenate(ctr_ref, 1) if add_centerness else np.zeros_like(centerness)
    np.testing.assert_allclose(centerness, expected_ctr, rtol=1e-4, atol=1e-4)


def test_pynative_matches_graph_for_the_paper_options():
    net = small_fcos(norm_reg_targets=False, add_centerness=True, cnt_on_reg=False, use_GN_head=False,
                     use_p5=False, freeze_bn=False)
    x = images(64, 96)
    graph = [o.asnumpy() for o in net(x)]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    pynative = [o.asnumpy() for o in net(x)]
    for ours, reference in zip(pynative, graph):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


class Loss(nn.Cell):
    """Sum of all outputs: every parameter gets a gradient unless it is frozen."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)  # keep the parameter names of net
        self.net = net

    def construct(self, x):
        cls_logits, bbox_reg, centerness = self.net(x)
        return cls_logits.sum() + bbox_reg.sum() + centerness.sum()


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_parameters_get_no_gradient_and_no_update(freeze_bn):
    net = small_fcos(freeze_bn=freeze_bn, freeze_stage_1=True, strides=(8, 16, 32))
    net.set_train(True)
    trainable = {p.name for p in net.trainable_params()}
    stage_1 = [p.name for p in net.get_parameters() if p.name.startswith(("backbone.conv1", "backbone.bn1",
                                                                          "backbone.layer1."))]
    assert stage_1 and not trainable & set(stage_1)
    norm_gammas = {p.name for p in net.get_parameters() if p.name.startswith("backbone.layer2.") and
                   p.name.endswith("gamma")}
    assert (norm_gammas & trainable == set()) if freeze_bn else (norm_gammas <= trainable)
    assert "backbone.layer2.0.conv1.weight" in trainable

    loss = Loss(net)
    weights = net.trainable_params()
    grad_fn = ms.value_and_grad(loss, None, weights)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    _, grads = grad_fn(images(64, 64))
    assert len(grads) == len(weights)
    nn.SGD(weights, learning_rate=0.1)(grads)
    changed = {name for name, value in before.items() if not np.array_equal(param(net, name).asnumpy(), value)}
    assert "backbone.layer2.0.conv1.weight" in changed and "head.cls_logits.weight" in changed
    frozen_changed = changed & (set(stage_1) | (norm_gammas if freeze_bn else set()))
    # nn.BatchNorm2d still updates its running statistics in training, as in torch.
    assert {n for n in frozen_changed if not n.endswith(("moving_mean", "moving_variance"))} == set()


def test_frozen_batch_norm_matches_numpy():
    rng = np.random.RandomState(2)
    norm = FrozenBatchNorm2d(6)
    stats = {name: rng.uniform(0.5, 1.5, 6).astype(np.float32) for name in ("gamma", "beta", "moving_mean",
                                                                            "moving_variance")}
    for name, value in stats.items():
        getattr(norm, name).set_data(ms.Tensor(value))
    x = rng.randn(2, 6, 3, 5).astype(np.float32)
    expected = ((x - stats["moving_mean"][:, None, None]) / np.sqrt(stats["moving_variance"][:, None, None] + 1e-5)
                * stats["gamma"][:, None, None] + stats["beta"][:, None, None])
    np.testing.assert_allclose(norm(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in norm.get_parameters())


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_group_norm_matches_numpy(mode):
    ms.set_context(mode=mode)
    rng = np.random.RandomState(3)
    groups, channels = 32, 64
    norm = GroupNorm(groups, channels)
    gamma, beta = rng.randn(channels).astype(np.float32), rng.randn(channels).astype(np.float32)
    norm.gamma.set_data(ms.Tensor(gamma))
    norm.beta.set_data(ms.Tensor(beta))
    x = (rng.randn(2, channels, 5, 7) * 3 + 1).astype(np.float64)
    grouped = x.reshape(2, groups, -1)
    normed = ((grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5))
    expected = normed.reshape(x.shape) * gamma[:, None, None] + beta[:, None, None]
    out = norm(ms.Tensor(x.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert [p.name for p in norm.get_parameters()] == ["gamma", "beta"]


def _group_norm_numpy(x, gamma, beta, groups):
    """float64 reference: x (B, C, H, W)."""
    grouped = x.reshape(x.shape[0], groups, -1)
    normed = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5)
    return normed.reshape(x.shape) * gamma[:, None, None] + beta[:, None, None]


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_group_norm_gradients_match_finite_differences(mode):
    """GroupNorm's hand-written backward against central differences of the float64 reference,
    for every input element, gamma and beta (batch 2, a mean far from 0)."""
    ms.set_context(mode=mode)
    rng = np.random.RandomState(4)
    groups, channels, shape = 4, 8, (2, 8, 3, 5)
    x = rng.randn(*shape) * 2 + 6
    gamma, beta, dy = rng.randn(channels), rng.randn(channels), rng.randn(*shape)
    norm = GroupNorm(groups, channels)
    norm.gamma.set_data(ms.Tensor(gamma.astype(np.float32)))
    norm.beta.set_data(ms.Tensor(beta.astype(np.float32)))
    grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)(norm, norm.trainable_params())
    (dx,), (dgamma, dbeta) = grad(ms.Tensor(x.astype(np.float32)), ms.Tensor(dy.astype(np.float32)))

    def numeric(values, index_of):
        out, step = np.zeros_like(values), 1e-6
        for index in np.ndindex(values.shape):
            plus, minus = values.copy(), values.copy()
            plus[index] += step
            minus[index] -= step
            out[index] = (np.sum(index_of(plus) * dy) - np.sum(index_of(minus) * dy)) / (2 * step)
        return out

    expected_dx = numeric(x, lambda v: _group_norm_numpy(v, gamma, beta, groups))
    expected_dgamma = numeric(gamma, lambda v: _group_norm_numpy(x, v, beta, groups))
    expected_dbeta = numeric(beta, lambda v: _group_norm_numpy(x, gamma, v, groups))
    np.testing.assert_allclose(dx.asnumpy(), expected_dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dgamma.asnumpy(), expected_dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.asnumpy(), expected_dbeta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("height,width", [(8, 12), (7, 9), (6, 5)])
def test_stem_max_pool_is_torch_max_pool(height, width):
    """MaxPool2d(3, 2, padding=1) with -inf padding, on non-negative input (the stem's ReLU)."""
    x = np.abs(np.random.RandomState(5).randn(1, 2, height, width)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    expected = np.array([[[[padded[b, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(out_w)]
                           for i in range(out_h)] for c in range(2)] for b in range(1)])
    np.testing.assert_array_equal(StemMaxPool()(ms.Tensor(x)).asnumpy(), expected)


def test_fpn_upsampling_doubles_by_repeating_pixels():
    x = np.random.RandomState(2).randn(2, 3, 4, 5).astype(np.float32)
    out = _upsample_like(ms.Tensor(x), ms.Tensor(np.zeros((1, 1, 8, 10), np.float32))).asnumpy()
    np.testing.assert_array_equal(out, x.repeat(2, axis=2).repeat(2, axis=3))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_group_norm_backbone_replaces_every_batch_norm(name):
    """backbone_norm GN: the same layout and parameter count as the BatchNorm backbone (gamma,
    beta per channel, no running statistics), every normalisation a trained GroupNorm(32)."""
    bn = ResNet(name, freeze_bn=False, freeze_stage_1=False)
    gn = ResNet(name, freeze_bn=False, freeze_stage_1=False, norm="GN")
    norms = {n: c for n, c in gn.cells_and_names() if isinstance(c, (GroupNorm, nn.BatchNorm2d, FrozenBatchNorm2d))}
    assert norms and all(isinstance(c, GroupNorm) and c.function.num_groups == 32 for c in norms.values())
    assert set(norms) == {n for n, c in bn.cells_and_names() if isinstance(c, nn.BatchNorm2d)}
    trained = {p.name for p in bn.trainable_params()}
    assert {p.name for p in gn.trainable_params()} == trained
    assert all(p.requires_grad for p in gn.get_parameters())
    gn.set_train(False)
    outputs = gn(images(64, 64, batch=1))
    assert [o.shape for o in outputs] == [(1, c, 64 // s, 64 // s) for c, s in zip(gn.out_channels, (8, 16, 32))]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        ResNet("resnet19")
    with pytest.raises(ValueError, match="GroupNorm backbone needs freeze_bn False"):
        ResNet("resnet18", freeze_bn=True, norm="GN")
    with pytest.raises(ValueError, match="unknown backbone normalisation"):
        ResNet("resnet18", freeze_bn=False, norm="LN")
    with pytest.raises(ValueError, match="strides"):
        FCOS(backbone="resnet18", strides=(8, 16, 32, 48))
    with pytest.raises(ValueError, match="groups"):
        GroupNorm(32, 48)


def test_exports_to_onnx(tmp_path):
    """Every op must have an ONNX form (e.g. not Rsqrt, not the argmax max-pool of pad_mode='pad')."""
    net = small_fcos(freeze_bn=True)
    path = str(tmp_path / "fcos")
    x = images(64, 96, batch=1)
    ms.export(net, x, file_name=path, file_format="ONNX")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX file is run by onnxruntime (optional package)")
    session = ort.InferenceSession(path + ".onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.asnumpy()})
    want = [out.asnumpy() for out in net(x)]
    assert len(got) == len(want)
    for a, b in zip(got, want):  # a file of the right size with a wrong graph fails here
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1.0))
