"""--runtime=onnxruntime_int8: the 8-bit model (src.inference.quantize), its calibration set and its
cache. Its accuracy on a trained model is checked in tests/test_convergence.py."""
import logging
import os

import mindspore as ms
import numpy as np
import onnx
import pytest

from src.builder import build_inference, build_model, calibration_set, int8_cache_dir
from src.config import load_config
from src.inference.quantize import FLOAT_CONVS, Calibration
from src.inference.runtime import OnnxInt8Runtime, OnnxRuntime
from tools.synthetic import make_synthetic_coco

pytest.importorskip("onnxruntime.quantization", reason="onnxruntime's quantization tools (and onnx) are not installed")

SHAPE = (1, 3, 64, 96)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    ann = make_synthetic_coco(str(root / "data"), 12, 64, 96, seed=3, max_objects=3)
    return str(root / "data" / "images"), ann


@pytest.fixture(scope="module")
def cfg(dataset, tmp_path_factory):
    img_dir, ann = dataset
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return load_config(["--config_path=configs/synthetic_cpu.yaml", "--min_size=[64]", "--max_size=96",
                        "--fpn_out_channels=32", f"--val_img_dir={img_dir}", f"--val_ann_file={ann}",
                        "--calibration_images=4", f"--ckpt_file={ckpt}", "--runtime=onnxruntime_int8"])


def make_cell(cfg, params=None):
    """A portable inference cell; with params (a parameters_dict) the same weights as another."""
    cell = build_inference(cfg, build_model(cfg, portable=True))
    if params is not None:
        ms.load_param_into_net(cell, {name: ms.Parameter(p.data.copy(), name=name) for name, p in params.items()})
    cell.set_train(False)
    return cell


@pytest.fixture(scope="module")
def infer_cell(cfg):
    return make_cell(cfg)


def test_calibration_images_are_evenly_spaced_and_preprocessed_as_evaluation(cfg):
    calibration = calibration_set(cfg)
    batches = list(calibration.batches((3, 3, 64, 96)))
    # 4 images in batches of 3: the last batch is filled up with its first image
    assert [b.shape for b in batches] == [(3, 3, 64, 96)] * 2
    np.testing.assert_array_equal(batches[1][1], batches[1][0])
    assert '"images"' in calibration.identity and calibration.identity.count(".png") + \
        calibration.identity.count(".jpg") == 4


@pytest.mark.slow
def test_int8_model_quantizes_the_convolutions_keeps_the_head_outputs_float_and_is_cached(cfg, infer_cell, caplog):
    cache = int8_cache_dir(cfg)
    assert cache == os.path.splitext(cfg.ckpt_file)[0] + "_int8"
    images = calibration_set(cfg).batches(SHAPE).__next__()
    runtime = OnnxInt8Runtime(infer_cell, calibration_set(cfg), cache, threads=1)
    int8_out = runtime(images)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("fcos_int8_1x3x64x96_")
    model = onnx.load(os.path.join(cache, files[0]))
    types = [node.op_type for node in model.graph.node]
    assert types.count("QuantizeLinear") > 10 and types.count("DequantizeLinear") > 10
    initializers = {init.name for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    float_weights = [name for name in FLOAT_CONVS
                     if any(name in node.input[1] and node.input[1] in initializers for node in convs)]
    assert float_weights == list(FLOAT_CONVS)  # these convolutions read float initializers directly
    # another run (a new cell with the same weights: MindSpore exports a cell once per shape and
    # process) loads the cached model: same file, same outputs
    stamp = os.path.getmtime(os.path.join(cache, files[0]))
    with caplog.at_level(logging.INFO, logger="fcos"):
        again = OnnxInt8Runtime(make_cell(cfg, infer_cell.parameters_dict()), calibration_set(cfg), cache,
                                threads=1)(images)
    assert "from the cache" in caplog.text
    assert os.listdir(cache) == files and os.path.getmtime(os.path.join(cache, files[0])) == stamp
    for a, b in zip(int8_out, again):
        np.testing.assert_array_equal(a, b)
    # other calibration images: another model beside the first, which stays
    other = Calibration("random normal, seed 0", lambda shape: iter([np.random.default_rng(0).standard_normal(
        shape).astype(np.float32)]))
    OnnxInt8Runtime(make_cell(cfg, infer_cell.parameters_dict()), other, cache, threads=1)(images)
    assert len(os.listdir(cache)) == 2 and files[0] in os.listdir(cache)
    # the float export of the same cell for comparison: 8 bits moves the candidates' scores by little
    boxes, scores, _ = OnnxRuntime(make_cell(cfg, infer_cell.parameters_dict()), threads=1)(images)
    assert np.abs(int8_out[1] - scores).max() < 0.05


def test_int8_needs_images_to_calibrate_on(cfg):
    from src.config import ConfigError
    bare = load_config(["--config_path=configs/synthetic_cpu.yaml", "--runtime=onnxruntime_int8"])
    with pytest.raises(ConfigError, match="calibration needs images"):
        calibration_set(bare)
