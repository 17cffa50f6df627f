"""tools.convert_weights on the parity fixture's torchvision weights, through real files on disk."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

import train
from conftest import ROOT, parity_dir
from src.config import Config, ConfigError
from src.model.fcos import FCOS
from tools import convert_weights as convert


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.convert_weights", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(parity_dir(), "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def fcos_npz(tmp_path_factory, manifest):
    """The reference torchvision FCOS weights, written by the fixture's own weights.py CLI."""
    path = str(tmp_path_factory.mktemp("tv") / "tv_fcos.npz")
    subprocess.run([sys.executable, os.path.join(parity_dir(), "..", "weights.py"),
                    os.path.join(parity_dir(), "manifest.json"), path], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def state(fcos_npz):
    return convert.load_torchvision_state(fcos_npz)


def build_fcos(manifest):
    return FCOS(backbone=f"resnet{manifest['depth']}", class_num=manifest["config"]["num_classes"],
                fpn_out_channels=manifest["fpn_out_channels"], strides=manifest["strides"])


def save_npz(path, arrays):
    np.savez(path, **arrays)
    return str(path)


def test_fcos_round_trip_through_ckpt(tmp_path, fcos_npz, state, manifest):
    output = str(tmp_path / "fcos.ckpt")
    kind, architecture, count = convert.convert(fcos_npz, output)
    assert kind == "fcos"
    assert architecture["backbone"] == f"resnet{manifest['depth']}"
    assert architecture["class_num"] == manifest["config"]["num_classes"]
    assert architecture["fpn_out_channels"] == manifest["fpn_out_channels"]
    assert os.listdir(tmp_path) == ["fcos.ckpt"]  # no temporary file left behind

    loaded = ms.load_checkpoint(output)
    num_levels = len(manifest["strides"])
    assert count == len(loaded) == len(state) + num_levels
    renames = {
        "backbone.body.layer2.0.downsample.1.running_var": "backbone.layer2.0.downsample.1.moving_variance",
        "backbone.body.bn1.weight": "backbone.bn1.gamma",
        "backbone.fpn.inner_blocks.1.0.bias": "fpn.lateral.1.bias",
        "backbone.fpn.extra_blocks.p7.weight": "fpn.extra.1.weight",
        "head.classification_head.conv.4.bias": "head.cls_tower.4.beta",
        "head.classification_head.conv.3.bias": "head.cls_tower.3.bias",
        "head.regression_head.bbox_ctrness.weight": "head.centerness.weight",
    }
    for torch_name, ours in renames.items():
        np.testing.assert_array_equal(loaded[ours].asnumpy(), state[torch_name])
    for level in range(num_levels):
        assert float(loaded[f"head.scales.{level}.scale"].asnumpy()) == 1.0

    net = build_fcos(manifest)
    assert ms.load_param_into_net(net, loaded) == ([], [])
    frozen = net.backbone.layer1[0].bn1.moving_variance
    assert not frozen.requires_grad  # loading keeps the network's frozen flags
    np.testing.assert_array_equal(frozen.asnumpy(), state["backbone.body.layer1.0.bn1.running_var"])


def test_backbone_checkpoint_loads_into_fcos(tmp_path, state, manifest):
    """An ImageNet-style ResNet state dict (with classifier) via the CLI, kind detected from keys."""
    body = {key[len("backbone.body."):]: value for key, value in state.items() if key.startswith("backbone.body.")}
    c5 = body["layer4.0.conv1.weight"].shape[0] * (4 if "layer4.0.conv3.weight" in body else 1)
    imagenet = dict(body, **{"fc.weight": np.zeros((1000, c5), np.float32), "fc.bias": np.zeros(1000, np.float32),
                             "bn1.num_batches_tracked": np.array(5)})
    source = save_npz(tmp_path / "resnet.npz", imagenet)
    output = str(tmp_path / "backbone.ckpt")
    result = run_cli("--input", source, "--output", output)
    assert result.returncode == 0, result.stderr
    assert f"backbone=resnet{manifest['depth']}" in result.stdout

    loaded = ms.load_checkpoint(output)
    net = build_fcos(manifest)
    backbone_names = [p.name for p in net.get_parameters() if p.name.startswith("backbone.")]
    assert sorted(loaded) == sorted(backbone_names)
    not_loaded, unused = ms.load_param_into_net(net, loaded)
    assert unused == []
    assert not_loaded and all(not name.startswith("backbone.") for name in not_loaded)
    np.testing.assert_array_equal(net.backbone.layer3[1].conv2.weight.asnumpy(), body["layer3.1.conv2.weight"])

    # train.py --pretrained=True: every backbone parameter from the file, the rest as initialised
    fresh = build_fcos(manifest)
    before = {p.name: p.asnumpy().copy() for p in fresh.get_parameters()}
    train.load_initial_weights(Config({"pretrained": True, "pretrained_backbone": output}), fresh)
    for param in fresh.get_parameters():
        want = loaded[param.name].asnumpy() if param.name.startswith("backbone.") else before[param.name]
        np.testing.assert_array_equal(param.asnumpy(), want, err_msg=param.name)
    # a backbone file that lacks a parameter is one line naming the flag, not a half-loaded network
    ms.save_checkpoint([{"name": k, "data": v} for k, v in loaded.items() if "layer4.1" not in k],
                       str(tmp_path / "partial.ckpt"))
    with pytest.raises(ConfigError, match=r"^--pretrained_backbone: .*layer4\.1"):
        train.load_initial_weights(Config({"pretrained": True, "pretrained_backbone": str(tmp_path / "partial.ckpt")}),
                                   build_fcos(manifest))


def test_backbone_kind_can_be_forced(state):
    with pytest.raises(convert.ConversionError, match="backbone keys have no MindSpore counterpart"):
        convert.torchvision_to_mindspore(state, "backbone")


def test_unmapped_keys_are_listed(tmp_path, state):
    source = save_npz(tmp_path / "extra.npz", dict(state, **{"head.regression_head.extra.weight": np.ones(3)}))
    with pytest.raises(convert.ConversionError, match=r"1 fcos keys .*head\.regression_head\.extra\.weight"):
        convert.convert(source, str(tmp_path / "out.ckpt"))
    assert not os.path.exists(tmp_path / "out.ckpt")


def test_missing_keys_are_listed(tmp_path, state):
    partial = {k: v for k, v in state.items() if k != "backbone.fpn.layer_blocks.1.0.bias"}
    with pytest.raises(convert.ConversionError, match=r"1 parameters .* missing .*fpn\.output\.1\.bias"):
        convert.convert(save_npz(tmp_path / "partial.npz", partial), str(tmp_path / "out.ckpt"))


def test_shape_mismatch_is_one_line(tmp_path, state):
    key = "backbone.fpn.layer_blocks.0.0.weight"
    bad = dict(state, **{key: state[key][:, :, :1, :1]})
    result = run_cli("--input", save_npz(tmp_path / "bad.npz", bad), "--output", str(tmp_path / "out.ckpt"))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "\n" not in message
    assert message.startswith("convert: error: shape mismatch for fpn.output.0.weight")


def test_unknown_inputs_are_refused(tmp_path):
    with pytest.raises(convert.ConversionError, match="not found"):
        convert.load_torchvision_state(str(tmp_path / "absent.npz"))
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(convert.ConversionError, match="expected a .pth or .npz"):
        convert.load_torchvision_state(str(text))
    with pytest.raises(convert.ConversionError, match="cannot tell the kind"):
        convert.detect_kind({"encoder.weight": np.ones(2)})


def test_unsupported_depth_is_refused(state):
    body = {k: v for k, v in state.items() if not k.startswith("backbone.body.layer4.1.")}
    params = convert.torchvision_to_mindspore(body, "fcos")
    with pytest.raises(convert.ConversionError, match="match no supported backbone"):
        convert.infer_backbone(params)


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    """Runs whether or not torch is installed: an import of torch fails as it does without it."""
    monkeypatch.setitem(sys.modules, "torch", None)
    path = tmp_path / "model.pth"
    path.write_bytes(b"\0")
    with pytest.raises(convert.ConversionError, match="needs PyTorch"):
        convert.load_torchvision_state(str(path))


def test_missing_architecture_key_is_named(state):
    params = convert.torchvision_to_mindspore(
        {k: v for k, v in state.items() if "cls_logits" not in k}, "fcos")
    with pytest.raises(convert.ConversionError, match=r"lacks head\.cls_logits\.weight"):
        convert.infer_fcos_kwargs(params)


def test_pth_input_equals_npz_input(tmp_path, state):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "fcos.pth")
    torch.save({"model": {key: torch.from_numpy(value) for key, value in state.items()}}, path)
    loaded = convert.load_torchvision_state(path)
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, state[key])


def test_output_without_ckpt_extension_is_one_line_and_writes_nothing(tmp_path, fcos_npz):
    """MindSpore loads only .ckpt names; before, such an --output crashed and left a stray file."""
    result = run_cli("--input", fcos_npz, "--output", str(tmp_path / "weights.bin"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"convert: error: --output must end with .ckpt (MindSpore loads only those): " \
                                    f"{tmp_path / 'weights.bin'}"
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_saved_under_any_name_leaves_no_temporary(tmp_path):
    """save_checkpoint_atomic writes exactly the name given (MindSpore appends .ckpt to others)."""
    from src.engine.checkpoint import save_checkpoint_atomic

    save_checkpoint_atomic([{"name": "w", "data": ms.Tensor(np.ones(2, np.float32))}], str(tmp_path / "model"))
    assert os.listdir(tmp_path) == ["model"]


class _OldTorch:
    """What `import torch` gives with torch 2.5 installed: only its version is read before refusing."""
    __version__ = "2.5.1+cpu"

    def load(self, *args, **kwargs):
        raise AssertionError("torch.load must not run on torch < 2.6")


def test_pth_with_torch_below_2_6_is_refused_in_one_line(tmp_path, monkeypatch):
    """torch.load(weights_only=True) can be bypassed by a crafted file below 2.6 (CVE-2025-32434)."""
    monkeypatch.setitem(sys.modules, "torch", _OldTorch())
    path = tmp_path / "model.pth"
    path.write_bytes(b"\0")
    with pytest.raises(convert.ConversionError, match=r"needs torch >= 2\.6 \(this is 2\.5\.1\+cpu") as err:
        convert.load_torchvision_state(str(path))
    assert "\n" not in str(err.value)
