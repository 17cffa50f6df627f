"""Our FCOS network against torchvision's, through the parity fixture.

The fixture's weights.py rebuilds the reference weights (torchvision names), tools.convert_weights maps
them, and our network must reproduce torchvision's FPN outputs and raw head outputs on the
fixture's batch, in GRAPH_MODE and in PyNative mode. Every size comes from manifest.json.
"""
import importlib.util
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from conftest import parity_dir
from src.model.fcos import FCOS
from tools.convert_weights import torchvision_to_mindspore

FPN_NAMES = ("fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6", "fpn_p7")
HEAD_NAMES = ("cls_logits", "bbox_regression", "bbox_ctrness")


def tolerance(expected):
    """float32 round-off grows with the magnitude of the values (FPN maps reach a few hundred)."""
    return 1e-4 + 5e-6 * float(np.abs(expected).max())


class FeaturesAndOutputs(nn.Cell):
    """Compiles FCOS.features and FCOS.construct into one graph: (P3..P7, cls, reg, ctr)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)  # keep the parameter names of net
        self.net = net

    def construct(self, images):
        return self.net.features(images) + self.net(images)


@pytest.fixture(scope="module")
def fixture():
    folder = parity_dir()
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(folder, "..", "weights.py"))
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    expected = dict(np.load(os.path.join(folder, "expected.npz")))
    return manifest, weights.make_weights(manifest), expected


@pytest.fixture(scope="module")
def network(fixture):
    manifest, state, _ = fixture
    net = FCOS(backbone=f"resnet{manifest['depth']}", class_num=manifest["config"]["num_classes"],
               fpn_out_channels=manifest["fpn_out_channels"], use_p5=True, use_GN_head=True,
               cnt_on_reg=True, norm_reg_targets=True, freeze_bn=True, strides=manifest["strides"])
    params = torchvision_to_mindspore(state, "fcos")
    not_loaded, unused = ms.load_param_into_net(
        net, {name: ms.Parameter(ms.Tensor(value), name=name) for name, value in params.items()})
    assert not_loaded == [] and unused == []
    net.set_train(False)
    return net


def run(net, images, mode):
    ms.set_context(mode=mode)
    try:
        return [out.asnumpy() for out in FeaturesAndOutputs(net)(ms.Tensor(images))]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="module")
def graph_outputs(network, fixture):
    return run(network, fixture[2]["batch_input"], ms.GRAPH_MODE)


def test_matches_torchvision_in_graph_mode(graph_outputs, fixture):
    expected = fixture[2]
    errors = {}
    for name, ours in zip(FPN_NAMES + HEAD_NAMES, graph_outputs):
        assert ours.shape == expected[name].shape, name
        errors[name] = float(np.abs(ours - expected[name]).max())
        assert errors[name] <= tolerance(expected[name]), (name, errors[name], tolerance(expected[name]))
    print("max abs errors vs torchvision:", errors)


def test_points_per_level_follow_the_contract(graph_outputs, fixture):
    manifest, _, expected = fixture
    height, width = expected["batch_input"].shape[2:]
    counts = [-(-height // s) * -(-width // s) for s in manifest["strides"]]
    assert counts == list(expected["num_points_per_level"])
    assert [p.shape[2] * p.shape[3] for p in graph_outputs[:5]] == counts
    assert graph_outputs[5].shape[1] == sum(counts)


def test_pynative_agrees_with_graph(network, graph_outputs, fixture):
    images = fixture[2]["batch_input"][:1]
    pynative = run(network, images, ms.PYNATIVE_MODE)
    for name, ours, graph in zip(FPN_NAMES + HEAD_NAMES, pynative, graph_outputs):
        np.testing.assert_allclose(ours, graph[:1], rtol=0, atol=tolerance(graph), err_msg=name)
