"""ResNet-34/101/152 and ResNeXt-101 32x8d against torchvision: the outputs C3-C5 of each body on one
small input (32x40, H != W), with the weights of tests/fixtures/parity/weights.py converted by
tools/convert_weights.py (kind backbone). The fixture (backbones.json + backbones.npz) was made by
tests/fixtures/parity/backbones/make_backbones.py with torchvision 0.28; ResNet-18/50 are checked
inside the FCOS parity fixtures, ResNeXt-101 64x4d against the FCOS authors' code."""
import importlib.util
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import ROOT, execution_mode
from src.model.backbone import ResNet
from tools.convert_weights import infer_backbone, torchvision_to_mindspore

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "parity", "backbones")


def make_weights(manifest):
    """{torchvision key: float32 array} by the parity fixtures' NumPy rule (../weights.py)."""
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(FIXTURE, "..", "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_weights(manifest)


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FIXTURE, "backbones.json"), encoding="utf-8") as f:
        manifests = json.load(f)["models"]
    return manifests, dict(np.load(os.path.join(FIXTURE, "backbones.npz")))


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152", "resnext101_32x8d"])
def test_backbone_computes_torchvisions_c3_to_c5(fixture, name):
    """Mutations caught: a block's stride on the wrong conv, groups or width per group off, a
    stage one block short, frozen BatchNorm's epsilon or statistics swapped."""
    manifests, arrays = fixture
    params = torchvision_to_mindspore(make_weights(manifests[name]), "backbone")
    assert infer_backbone(params) == name
    network = ResNet(name, freeze_bn=True)
    ours = {p.name for p in network.get_parameters()}
    values = {key[len("backbone."):]: value for key, value in params.items()}
    assert set(values) == ours
    ms.load_param_into_net(network, {k: ms.Parameter(Tensor(v), name=k) for k, v in values.items()})
    network.set_train(False)
    with execution_mode(ms.PYNATIVE_MODE):  # one forward: no graph to compile for 100+ layers
        outputs = [x.asnumpy() for x in network(Tensor(arrays["input"]))]
    for level, got in zip(("c3", "c4", "c5"), outputs):
        want = arrays[f"{name}:{level}"]
        assert got.shape == want.shape, level
        # float32 sums over up to 150 layers whose activations grow to 5e7 here: relative to the largest
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=f"{name} {level}")
