"""export.py: MINDIR and ONNX files that compute what FCOSInference computes, the export .json,
and one-line errors for shapes and formats it cannot export."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import export
from src.builder import build_inference, build_model
from src.deploy.contract import read_export_info
from src.deploy.runner import mindir_input_shape
from src.inference.runtime import MindSporeRuntime, OnnxRuntime
from src.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Narrow and small, but with the real backbone, FPN, GroupNorm head and decoder; H != W so that a
# swapped height and width would show.
MODEL_ARGS = ["--config_path=configs/synthetic_cpu.yaml", "--fpn_out_channels=32", "--num_head_convs=1",
              "--min_size=[64]", "--max_size=96"]
SHAPE = (2, 3, 64, 96)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A randomly initialised FCOSInference, its checkpoint and a fixed input batch."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "fcos.ckpt")
    cfg = load_config(MODEL_ARGS)
    ms.set_seed(0)
    network = build_model(cfg, portable=True)  # what export.py and --runtime=onnxruntime export
    ms.save_checkpoint(network, ckpt)
    infer_cell = build_inference(cfg, network)
    infer_cell.set_train(False)
    images = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    expected = tuple(x.asnumpy() for x in infer_cell(Tensor(images)))
    return {"cfg": cfg, "ckpt": ckpt, "images": images, "expected": expected, "infer_cell": infer_cell}


def export_command(*args):
    """export.py in its own process (it sets the device, which a process can do only before running)."""
    return subprocess.run([sys.executable, "export.py", *MODEL_ARGS, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def run_export(model, out_dir, file_format, file_name="fcos"):
    """export.py --file_name=<out_dir>/<file_name> -> <out_dir>/fcos, the base of what it wrote."""
    base = str(out_dir / "fcos")
    result = export_command(f"--ckpt_file={model['ckpt']}", f"--file_name={out_dir / file_name}",
                            f"--file_format={file_format}",
                            f"--export_height={SHAPE[2]}", f"--export_width={SHAPE[3]}",
                            f"--export_batch_size={SHAPE[0]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base


def assert_same_candidates(expected, got, score_tol=1e-5, box_tol=1e-3):
    """Equal decoder outputs up to the order of candidates whose scores tie within score_tol.

    Top-k of two runtimes may order near-equal scores differently; such a swapped candidate must
    then appear in ``expected`` with the same label, box and (within tolerance) score.
    """
    (boxes, scores, labels), (got_boxes, got_scores, got_labels) = expected, got
    assert got_boxes.shape == boxes.shape and got_scores.shape == scores.shape
    assert got_labels.dtype == labels.dtype == np.int32
    np.testing.assert_allclose(got_scores, scores, atol=score_tol)
    for b in range(len(boxes)):
        same = (labels[b] == got_labels[b]) & np.all(np.abs(boxes[b] - got_boxes[b]) <= box_tol, axis=-1)
        assert same.mean() > 0.95
        for i in np.flatnonzero(~same):
            partners = ((np.abs(scores[b] - got_scores[b, i]) <= score_tol) & (labels[b] == got_labels[b, i])
                        & np.all(np.abs(boxes[b] - got_boxes[b, i]) <= box_tol, axis=-1))
            assert partners.any(), f"candidate {i} of image {b} is not among the expected ones"


def test_mindir_export_computes_the_same(model, tmp_path):
    # the format's extension in --file_name, in any case, is not doubled (nor is the .json's)
    base = run_export(model, tmp_path, "MINDIR", file_name="fcos.MINDIR")
    assert sorted(os.listdir(tmp_path)) == ["fcos.json", "fcos.mindir"], "no temporary file may be left"
    assert mindir_input_shape(base + ".mindir") == SHAPE
    graph = nn.GraphCell(ms.load(base + ".mindir"))
    got = tuple(x.asnumpy() for x in graph(Tensor(model["images"])))
    for a, b in zip(got, model["expected"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)

    info = read_export_info(base + ".json")
    assert info["input"]["shape"] == list(SHAPE)
    assert [o["shape"] for o in info["outputs"]] == [list(x.shape) for x in model["expected"]]
    assert [o["dtype"] for o in info["outputs"]] == [str(x.dtype) for x in model["expected"]]
    cfg = model["cfg"]
    assert info["postprocess"] == {"score_threshold": cfg.score_threshold,
                                   "nms_iou_threshold": cfg.nms_iou_threshold,
                                   "detections_per_img": cfg.detections_per_img, "plus_one": cfg.box_plus_one}
    assert info["preprocess"] == {"min_size": 64, "max_size": 96, "height": SHAPE[2], "width": SHAPE[3],
                                  "resize_rule": "torchvision", "channel_order": "RGB",
                                  "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375]}


def test_onnx_export_runs_in_onnxruntime(model, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    base = run_export(model, tmp_path, "ONNX", file_name="fcos.onnx")
    assert sorted(os.listdir(tmp_path)) == ["fcos.json", "fcos.onnx"]
    session = ort.InferenceSession(base + ".onnx", providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    got = tuple(session.run(None, {"images": model["images"]}))
    assert_same_candidates(model["expected"], got)
    with open(base + ".json", encoding="utf-8") as f:
        assert json.load(f)["file_format"] == "ONNX"


def test_onnx_runtime_exports_each_input_shape_once_and_computes_the_same(model):
    """eval.py's and predict.py's --runtime=onnxruntime: one export and session per input shape."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    onnx, ours = OnnxRuntime(model["infer_cell"], threads=1), MindSporeRuntime(model["infer_cell"])
    folder = onnx._folder.name
    try:
        assert_same_candidates(model["expected"], onnx(model["images"]))
        other = model["images"][:1, :, :, :64]  # another batch size and width
        assert_same_candidates(ours(other), onnx(other))
        assert_same_candidates(model["expected"], onnx(model["images"]))
        assert sorted(os.listdir(folder)) == ["fcos_1x3x64x64.onnx", "fcos_2x3x64x96.onnx"]
    finally:
        onnx.close()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("args, message", [
    (["--export_height=100"], "--export_height=100: must be a positive multiple of 32"),
    (["--export_width=0"], "--export_width=0: must be a positive multiple of 32"),
    (["--export_batch_size=0"], "--export_batch_size=0: must be positive"),
    (["--file_format=AIR"], "--file_format=AIR: AIR export needs --device_target=Ascend"),
    (["--file_format=TFLITE"], "--file_format: 'TFLITE' is not one of"),
])
def test_export_rejects_what_it_cannot_export(model, tmp_path, capsys, args, message):
    """Checked before anything runs, so in this process."""
    with pytest.raises(SystemExit) as exit_info:
        export.main([*MODEL_ARGS, f"--ckpt_file={model['ckpt']}", f"--file_name={tmp_path / 'fcos'}", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("file_name, file_format, base", [
    ("out/fcos", "MINDIR", "out/fcos"), ("out/fcos.mindir", "MINDIR", "out/fcos"),
    ("out/fcos.Onnx", "ONNX", "out/fcos"), ("out/fcos.onnx", "MINDIR", "out/fcos.onnx"),
    ("out/v1.2", "AIR", "out/v1.2")])
def test_output_base_drops_only_the_chosen_formats_extension(file_name, file_format, base):
    assert export.output_base(file_name, file_format) == base
