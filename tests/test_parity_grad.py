"""Gradients of our FCOS loss against torchvision's, through the parity fixture.

expected.npz holds ``grad:<torchvision name>`` arrays: the gradient of the summed loss
(classification + box regression + centreness, each divided by the batch's positive count) on
the fixture batch, for every FPN and head parameter and the first conv of the stem and of each
backbone stage. We build our FCOS and loss from the fixture (every size comes from
manifest.json, so any fixture of the same format passes), load the converted weights, take the
gradient of the same sum with respect to the same parameters, in GRAPH_MODE and in PyNative mode,
and compare every array.

Tolerance: float32 round-off relative to each array's own magnitude, in two tiers by what the
gradient passes through (told apart by the torchvision name, i.e. by the format, not the sizes):
- FPN and head parameters (backbone.fpn.*, head.*): GRAD_RTOL * max|expected|. Each gradient is
  a sum over tens of thousands of products that MindSpore and torch accumulate in different
  orders; measured errors are <= 1.4e-4 of max|expected| (README, parity section).
- The backbone's convs (backbone.body.*): BACKBONE_GRAD_RTOL * max|expected|. Their backward
  crosses the backbone's ReLUs, and on this batch one ReLU input in layer2.1 is 1.6e-6 (float32
  round-off of values ~10) from zero: which side of the kink a float32 forward lands on decides
  the gradient there. torch float32 (the fixture) against torch float64 differs by 6.5e-3 of
  max|grad| on the stem conv for that reason alone; ours is within 9e-4 of torch float64 and
  6.7e-3 of the fixture. A real error in the backbone's backward (a wrong frozen-BN scale, a
  dropped residual branch) moves these arrays by 10% or more.
GRAD_ATOL_FLOOR only keeps the tolerance above zero for an array that is all zeros.

Where the fixture holds float64 gradients (grad64:, jitter64:; tools/parity/make_parity_fixture.py
--float64-drift), ours are also compared with that truth: within GRAD_RTOL * max|grad64|, or
JITTER_FACTOR times the jump the float64 gradient itself makes when the weights move by float32
round-off (a ReLU input near zero changing sides), whichever is larger. Torch float32, MindSpore's
own kernels and the custom ops all land on one side or the other of such a kink (docs/parity.md).
"""
import importlib.util
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import ParameterTuple, Tensor, nn, ops

from conftest import parity_dir
from src.builder import build_loss, build_model
from src.engine.train_step import FCOSWithLoss
from src.config import load_config
from tests.test_parity_loss_decode import padded_ground_truth
from tools.convert_weights import torchvision_to_mindspore

GRAD_PREFIX = "grad:"
GRAD_RTOL = 1e-3
BACKBONE_GRAD_RTOL = 2e-2
GRAD_ATOL_FLOOR = 1e-12
GRAD64_PREFIX, JITTER64_PREFIX = "grad64:", "jitter64:"
JITTER_FACTOR = 1.5


def load_parity_fixture(folder=None):
    """-> (manifest, {torchvision key: initial weight}, {name: array} of expected.npz)."""
    folder = folder or parity_dir()
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(folder, "..", "weights.py"))
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    with np.load(os.path.join(folder, "expected.npz")) as data:
        expected = {key: data[key] for key in data.files}
    return manifest, weights.make_weights(manifest), expected


def torchvision_limit_range(strides):
    """torchvision's positive ranges: (4s, 8s) per level, open at the bottom of P3 and the top of P7."""
    limits = [[4.0 * s, 8.0 * s] for s in strides]
    limits[0][0] = 0.0
    limits[-1][1] = float("inf")
    return limits


def fixture_config(manifest, **overrides):
    """Our configuration (load_config defaults) set to the fixture's architecture and loss.

    The number of head convs is read off the manifest's keys; freeze_stage_1 is off because the
    fixture's model trains every layer (it has gradients for the stem). overrides win.
    """
    keys = [key for key, _ in manifest["params"]]
    head_convs = sum(1 for key, shape in manifest["params"]
                     if key.startswith("head.classification_head.conv.") and len(shape) == 4)
    config = manifest["config"]
    cfg = load_config([])
    cfg.update(
        backbone=f"resnet{manifest['depth']}", class_num=config["num_classes"],
        fpn_out_channels=manifest["fpn_out_channels"], use_p5=True,
        use_GN_head=any(key.startswith("head.classification_head.conv.1.") for key in keys),
        num_head_convs=head_convs, add_centerness=True, cnt_on_reg=True, norm_reg_targets=True,
        freeze_bn=True, freeze_stage_1=False, strides=list(manifest["strides"]),
        limit_range=torchvision_limit_range(manifest["strides"]), point_offset=manifest["point_offset"],
        point_strides="torchvision",
        center_sampling_radius=config["center_sampling_radius"], focal_alpha=0.25, focal_gamma=2.0,
        reg_loss="giou", centerness_weighted_reg=False, amp_level="O0")
    cfg.update(overrides)
    return cfg


def load_torchvision_weights(network, state):
    """Convert {torchvision key: array} and load every parameter of network (strictly)."""
    params = torchvision_to_mindspore(state, "fcos")
    not_loaded, unused = ms.load_param_into_net(
        network, {name: ms.Parameter(Tensor(value), name=name) for name, value in params.items()})
    assert not_loaded == [] and unused == [], (not_loaded, unused)


def expected_grads(arrays):
    """{our parameter name: torchvision's gradient}: the grad: arrays renamed by the converter's
    own rules (which also turn GroupNorm weight/bias into gamma/beta)."""
    grads = {key[len(GRAD_PREFIX):]: value for key, value in arrays.items() if key.startswith(GRAD_PREFIX)}
    assert grads, "the fixture has no grad: arrays"
    converted = torchvision_to_mindspore(grads, "fcos")
    # The converter adds our per-level Scale parameters (1.0; torchvision has no such parameter,
    # so no reference gradient): they are not compared.
    return {name: value for name, value in converted.items() if not name.startswith("head.scales.")}


class LossAndGrads(nn.Cell):
    """(images, gt) -> (total, cls, reg, ctr, gradients of total w.r.t. weights), one graph."""

    def __init__(self, net_with_loss, weights):
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.weights = weights
        self.grad_fn = ops.value_and_grad(net_with_loss, None, weights, has_aux=True)

    def construct(self, images, gt_boxes, gt_labels, gt_mask):
        (total, loss_cls, loss_reg, loss_ctr), grads = self.grad_fn(images, gt_boxes, gt_labels, gt_mask)
        return total, loss_cls, loss_reg, loss_ctr, grads


@pytest.fixture(scope="module")
def fixture():
    return load_parity_fixture()


def compute_grads(fixture, mode):
    """Our losses and {name: gradient} on the fixture batch in the given mode."""
    manifest, state, arrays = fixture
    cfg = fixture_config(manifest)
    network = build_model(cfg)
    load_torchvision_weights(network, state)
    network.set_train(True)
    wanted = expected_grads(arrays)
    params = {param.name: param for param in network.get_parameters()}
    missing = sorted(set(wanted) - set(params))
    assert not missing, f"grad: arrays without a parameter of ours: {missing}"
    weights = ParameterTuple([params[name] for name in sorted(wanted)])
    cell = LossAndGrads(FCOSWithLoss(network, build_loss(cfg, network)), weights)
    boxes, labels, mask = padded_ground_truth(arrays)
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        *losses, grads = cell(Tensor(arrays["batch_input"]), Tensor(boxes), Tensor(labels), Tensor(mask))
    finally:
        ms.set_context(mode=previous)
    return ([float(x.asnumpy()) for x in losses],
            {param.name: grad.asnumpy() for param, grad in zip(weights, grads)}, wanted)


def relative_tolerance(our_name):
    """GRAD_RTOL, or BACKBONE_GRAD_RTOL for the backbone's convs (see the module docstring)."""
    return BACKBONE_GRAD_RTOL if our_name.startswith("backbone.") else GRAD_RTOL


def grad_errors(ours, wanted):
    """{our name: (max abs error, tolerance, max |expected|)} over every compared array."""
    out = {}
    for name, want in wanted.items():
        got = ours[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        scale = float(np.abs(want).max())
        out[name] = (float(np.abs(got - want).max()), relative_tolerance(name) * scale + GRAD_ATOL_FLOOR, scale)
    return out


MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(scope="module")
def computed(fixture):
    """Each mode's (losses, gradients, expected) computed once for all tests of this module."""
    cache = {}

    def get(mode):
        if mode not in cache:
            cache[mode] = compute_grads(fixture, MODES[mode])
        return cache[mode]

    return get


@pytest.fixture(params=list(MODES))
def our_grads(request, computed):
    return request.param, computed(request.param)


@pytest.mark.slow
def test_parity_grad_matches_torchvision(our_grads, fixture):
    mode, (losses, ours, wanted) = our_grads
    arrays = fixture[2]
    expected = [float(arrays[k]) for k in ("loss_classification", "loss_bbox_regression", "loss_bbox_ctrness")]
    total, cls, reg, ctr = losses
    np.testing.assert_allclose([cls, reg, ctr], expected, rtol=1e-4)
    assert total == pytest.approx(sum(expected), rel=1e-4)
    errors = grad_errors(ours, wanted)
    worst = sorted(errors.items(), key=lambda item: -item[1][0] / item[1][2])
    print(f"\n{mode}: {len(errors)} gradients compared; largest errors relative to max|grad|:")
    for name, (err, tol, scale) in worst[:6]:
        print(f"  {name}: max abs err {err:.3g}, max |grad| {scale:.3g}, ratio {err / scale:.3g}, tol {tol:.3g}")
    failed = {name: values for name, values in errors.items() if values[0] > values[1]}
    assert not failed, failed


def test_parity_grad_matches_float64_truth(our_grads, fixture):
    """FPN and head gradients within GRAD_RTOL of torch's float64 ones or within the float64
    gradient's own jump under float32-sized weight jitter (module docstring)."""
    mode, (_, ours, _) = our_grads
    arrays = fixture[2]
    truth = {key[len(GRAD64_PREFIX):]: value for key, value in arrays.items() if key.startswith(GRAD64_PREFIX)}
    if not truth:
        pytest.skip("this fixture holds no grad64: arrays (made without --float64-drift)")
    jumps = torchvision_to_mindspore({name: np.full(np.shape(value), float(arrays[JITTER64_PREFIX + name]))
                                      for name, value in truth.items()}, "fcos")
    failed, worst = {}, (0.0, "")
    for name, want in torchvision_to_mindspore(truth, "fcos").items():
        if name.startswith(("head.scales.", "backbone.")):  # no reference; the backbone's tier is above
            continue
        scale = float(np.abs(want).max())
        err = float(np.abs(ours[name] - want).max())
        tol = max(GRAD_RTOL * scale, JITTER_FACTOR * float(np.max(jumps[name]))) + GRAD_ATOL_FLOOR
        worst = max(worst, (err / scale, name))
        if err > tol:
            failed[name] = (err, tol, scale)
    print(f"\n{mode}: largest error against float64 {worst[0]:.3g} of max|grad| ({worst[1]})")
    assert not failed, failed


def test_parity_grad_covers_every_fixture_array(our_grads, fixture):
    """Every grad: array of the fixture is compared, none is all zeros on our side (a parameter
    the loss does not reach would pass a loose comparison against a tiny reference)."""
    _, (_, ours, wanted) = our_grads
    n_fixture = sum(key.startswith(GRAD_PREFIX) for key in fixture[2])
    assert len(wanted) == n_fixture and set(ours) == set(wanted)
    assert all(np.any(ours[name] != 0) for name in wanted)


def test_parity_grad_graph_and_pynative_agree(computed):
    """The two modes against each other (same kernels, so no kink flips between them)."""
    _, graph, wanted = computed("graph")
    _, pynative, _ = computed("pynative")
    worst = 0.0
    for name in wanted:
        scale = float(np.abs(graph[name]).max())
        err = float(np.abs(pynative[name] - graph[name]).max())
        worst = max(worst, err / scale)
        assert err <= GRAD_RTOL * scale + GRAD_ATOL_FLOOR, (name, err, scale)
    print(f"\ngraph vs pynative: largest error {worst:.3g} of max|grad|")
