"""The FCOS authors' released models (tianzhi0549/FCOS) in our FCOS, against what their own code computed.

Fixture folders (tests/fixtures/parity_authors/README.md: three vendored ones, the improved and the
original R-50 and the improved X-101-64x4d; FCOS_AUTHORS_PARITY_DIR picks another, e.g. one made by
../shared/tools/fcos_authors_fixture.py for other seeds, photos, sizes or architectures) hold their
network input, FPN maps, head outputs, points and detections for a photo, with seeded random weights
in their naming. The weights go through tools.convert_weights, the network is built from the
matching configs/fcos_authors/*.yaml (sizes and class count from the manifest), and everything must
agree: preprocessing within one grey level, the network to float32 round-off, detections (boxes,
scores, labels) to round-off up to the order of equal scores, eval.py's COCO json with their +1 box
widths, and the export -> preprocess.py -> runner -> postprocess.py flow. models.json.gz holds the
state-dict keys and shapes of all eight non-DCN models as their code builds them; the converter must
map each onto our network. Run alone with ``pytest -k authors``.
"""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from conftest import ROOT
from src.builder import build_inference, build_model, selection_kwargs
from src.config import load_config
from src.data.coco import load_image_rgb
from src.data.transforms import PixelFormat, preprocess_image
from src.deploy.contract import input_bin_path, read_input_bin, read_preprocess_info
from src.geometry import EvalGeometry, keep_ratio_size
from src.inference.select import select_detections
from src.ops.backend import backend_of
from tools.convert_weights import ConversionError, check_params, torchvision_to_mindspore

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parity_authors")
FPN_NAMES = ("fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6", "fpn_p7")


VENDORED = ("r50_imprv_small", "r50_orig_small", "x101_64x4d_small")


def authors_dirs():
    """[FCOS_AUTHORS_PARITY_DIR], else the small fixtures vendored in tests/fixtures/parity_authors: the
    improved and the original R-50 head, and the ResNeXt-101 64x4d backbone."""
    env = os.environ.get("FCOS_AUTHORS_PARITY_DIR")
    return [env] if env else [os.path.join(FIXTURES, name) for name in VENDORED]


def make_weights(manifest):
    """The fixture's weights {their key: float32 array}, by the format's NumPy rule (weights.py)."""
    spec = importlib.util.spec_from_file_location("authors_weights", os.path.join(FIXTURES, "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_weights(manifest)


def image_path(folder, manifest):
    """The fixture's photo: in its folder, or beside it (../shared/parity_authors keeps one for all)."""
    inside = os.path.join(folder, manifest["image"])
    beside = os.path.join(os.path.dirname(os.path.normpath(folder)), manifest["image"])
    return inside if os.path.exists(inside) else beside


def config_path(model_name):
    """configs/fcos_authors/<their config's base name>.yaml."""
    return os.path.join(ROOT, "configs", "fcos_authors", f"{model_name}.yaml")


def authors_config(manifest, *extra):
    """The shipped config of the manifest's model, at the manifest's test sizes and class count."""
    name = os.path.splitext(os.path.basename(manifest["config_file"]))[0]
    return load_config(["--config_path", config_path(name), f"--min_size=[{manifest['min_size']}]",
                        f"--max_size={manifest['max_size']}", f"--class_num={manifest['num_classes']}", *extra])


class FeaturesAndOutputs(nn.Cell):
    """(P3..P7, cls, reg, ctr) in one graph."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, images):
        return self.net.features(images) + self.net(images)


def close(actual, expected, rel):
    """Largest difference relative to max|expected| (float32 round-off grows with depth)."""
    scale = max(float(np.abs(expected).max()), 1e-6)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale <= rel


def load_fixture(folder):
    """-> (folder, manifest, expected arrays)."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    return folder, manifest, dict(np.load(os.path.join(folder, "expected.npz")))


@pytest.fixture(scope="module", params=authors_dirs(), ids=os.path.basename)
def authors(request):
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def authors_flow():
    """The first fixture: the entry-point flows (processes, slower) run on it alone."""
    return load_fixture(authors_dirs()[0])


@pytest.fixture(scope="module")
def converted(authors):
    _, manifest, _ = authors
    return torchvision_to_mindspore(make_weights(manifest), "fcos_authors")


@pytest.fixture(scope="module")
def network(authors, converted):
    _, manifest, _ = authors
    cfg = authors_config(manifest)
    net = build_model(cfg)
    not_loaded, unused = ms.load_param_into_net(
        net, {name: ms.Parameter(ms.Tensor(value), name=name) for name, value in converted.items()})
    assert not_loaded == [] and unused == []
    net.set_train(False)
    return cfg, net


def nchw(array, net):
    """A feature map as NCHW values: in channels-last storage (src/ops/backend.py) an (N, C, H, W)
    tensor holds its values in N, H, W, C order."""
    if backend_of(net).get("layout") != "channels_last":
        return array
    n, c, h, w = array.shape
    return array.reshape(n, h, w, c).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def outputs(network, authors):
    _, net = network
    outs = [out.asnumpy() for out in FeaturesAndOutputs(net)(ms.Tensor(authors[2]["batch_input"]))]
    return [nchw(out, net) for out in outs[:5]] + outs[5:]


def test_authors_preprocessing_within_one_grey_level(authors):
    """Their size rule, PIL's bilinear filter, BGR minus their mean, zero padding to 32."""
    folder, manifest, expected = authors
    cfg = authors_config(manifest)
    image = load_image_rgb(image_path(folder, manifest))
    geometry = EvalGeometry.from_config(cfg)
    pad_hw = geometry.pad_shape(image.shape[:2])
    chw, meta = preprocess_image(image, geometry, pad_hw, PixelFormat.from_config(cfg))
    assert chw.shape == expected["batch_input"].shape[1:]
    assert list(meta.resized_hw) == expected["image_sizes"][0].tolist()
    assert list(meta.orig_hw) == expected["orig_sizes"][0].tolist()
    assert np.abs(chw - expected["batch_input"][0]).max() <= 0.01  # measured 0 on five fixtures


def test_authors_points(network, authors):
    cfg, net = network
    expected = authors[2]
    points, _, sizes = net.point_coder.points(*expected["batch_input"].shape[2:])
    assert [h * w for h, w in sizes] == expected["num_points_per_level"].tolist()
    np.testing.assert_array_equal(points.asnumpy(), expected["points"])


def test_authors_network_outputs(network, outputs, authors):
    """FPN maps and head outputs to float32 round-off; regression in pixels as theirs."""
    cfg, net = network
    expected = authors[2]
    for name, actual in zip(FPN_NAMES, outputs[:5]):
        assert close(actual, expected[name], 5e-5), name
    cls, reg, ctr = outputs[5:]
    _, scales, _ = net.point_coder.points(*expected["batch_input"].shape[2:])
    pixels = reg * (scales.asnumpy()[None, :, None] if cfg.norm_reg_targets else 1.0)
    assert close(cls, expected["cls_logits"], 5e-5)
    assert close(pixels, expected["bbox_regression"], 5e-5)
    assert close(ctr, expected["bbox_ctrness"], 5e-5)


def match_detections(boxes, scores, labels, expected, suffix="_0"):
    """Ours against theirs: the same number, labels and boxes/scores to round-off, compared in
    score order (their NMS order differs only among equal scores)."""
    exp_boxes, exp_scores = expected["det_boxes" + suffix], expected["det_scores_0"]
    exp_labels = expected["det_labels_0"] - 1  # theirs are 1..80
    assert len(scores) == len(exp_scores)
    ours = np.lexsort((labels, -np.round(scores, 5)))
    theirs = np.lexsort((exp_labels, -np.round(exp_scores, 5)))
    np.testing.assert_array_equal(labels[ours], exp_labels[theirs])
    np.testing.assert_allclose(scores[ours], exp_scores[theirs], atol=1e-5)
    np.testing.assert_allclose(boxes[ours], exp_boxes[theirs], atol=1e-3 + 1e-5 * float(np.abs(exp_boxes).max()))


def test_authors_detections(network, authors):
    """The exported decoding graph (their candidate rule) + the NumPy selection (+1 convention)."""
    cfg, net = network
    expected = authors[2]
    infer = build_inference(cfg, net)
    boxes, scores, labels = (x.asnumpy() for x in infer(ms.Tensor(expected["batch_input"])))
    image_hw, orig_hw = expected["image_sizes"][0], expected["orig_sizes"][0]
    selection = selection_kwargs(cfg)
    det = select_detections(boxes[0], scores[0], labels[0], image_hw, **selection)
    match_detections(*det, expected)
    det = select_detections(boxes[0], scores[0], labels[0], image_hw, **selection, original_size=orig_hw)
    match_detections(*det, expected, "_orig_0")


@pytest.fixture(scope="module")
def deployed(authors_flow, tmp_path_factory):
    """A converted checkpoint (tools.convert_weights from an .npz in their naming, with the "module."
    prefix of a released checkpoint) and a COCO file naming the fixture's photo (categories 1..C)."""
    folder, manifest, expected = authors_flow
    root = tmp_path_factory.mktemp("authors")
    weights = {f"module.{key}": value for key, value in make_weights(manifest).items()}
    np.savez(root / "authors.npz", **weights)
    ckpt = root / "authors.ckpt"
    run_ok([sys.executable, "-m", "tools.convert_weights", "--input", str(root / "authors.npz"), "--output", str(ckpt)])
    h, w = expected["orig_sizes"][0].tolist()
    ann = {"images": [{"id": 7, "file_name": manifest["image"], "height": h, "width": w}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000,
                            "iscrowd": 0}],
           "categories": [{"id": i + 1, "name": f"c{i + 1}"} for i in range(manifest["num_classes"])]}
    (root / "ann.json").write_text(json.dumps(ann))
    name = os.path.splitext(os.path.basename(manifest["config_file"]))[0]
    args = ["--config_path", config_path(name), f"--ckpt_file={ckpt}", f"--min_size=[{manifest['min_size']}]",
            f"--max_size={manifest['max_size']}", f"--class_num={manifest['num_classes']}",
            f"--val_img_dir={os.path.dirname(image_path(folder, manifest))}", f"--val_ann_file={root / 'ann.json'}"]
    return root, args


def run_ok(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command[:3]}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def json_detections(path):
    """An eval_result.json's detections -> boxes x1, y1, x2, y2 (their +1 widths undone), scores, labels."""
    detections = json.loads(path.read_text())["detections"]
    assert {d["image_id"] for d in detections} == {7}
    boxes = np.array([d["bbox"] for d in detections], np.float64)
    boxes[:, 2:] += boxes[:, :2] - 1.0  # their json: w = x2 - x1 + 1
    return boxes, np.array([d["score"] for d in detections]), np.array([d["category_id"] - 1 for d in detections])


def test_authors_eval_py_writes_their_detections(authors_flow, deployed):
    """eval.py on the converted checkpoint writes their detections as COCO json."""
    root, args = deployed
    run_ok([sys.executable, "eval.py", *args, f"--output_dir={root / 'eval'}", "--compile_cache=False"])
    expected = authors_flow[2]
    match_detections(*json_detections(root / "eval" / "eval_result.json"),
                     dict(expected, det_scores_0=np.round(expected["det_scores_0"], 5)), "_orig_0")


def test_authors_export_preprocess_runner_postprocess(authors_flow, deployed):
    """The 310 flow on the converted model, exported at the photo's padded shape: preprocess.py writes
    their network input (from the export info's resize rule and pixel format) and postprocess.py
    their detections."""
    root, args = deployed
    expected = authors_flow[2]
    h, w = expected["batch_input"].shape[2:]
    run_ok([sys.executable, "export.py", *args, f"--file_name={root / 'fcos'}", f"--export_height={h}",
            f"--export_width={w}"])
    data = root / "data"
    run_ok([sys.executable, "preprocess.py", *args, f"--export_info={root / 'fcos.json'}", f"--output_dir={data}"])
    info = read_preprocess_info(str(data / "preprocess_info.json"))
    image = read_input_bin(input_bin_path(str(data), info["images"][0]["name"]), (3, h, w))
    assert np.abs(image - expected["batch_input"][0]).max() <= 0.01
    run_ok([sys.executable, "-m", "src.deploy.runner", f"--mindir_path={root / 'fcos.mindir'}",
            f"--input_path={data / 'images'}", f"--result_path={root / 'result'}"])
    run_ok([sys.executable, "postprocess.py", f"--result_dir={root / 'result'}",
            f"--info_file={data / 'preprocess_info.json'}", f"--export_info={root / 'fcos.json'}",
            f"--val_ann_file={args[-1].split('=', 1)[1]}", f"--output_dir={root / 'post'}"])
    match_detections(*json_detections(root / "post" / "eval_result.json"),
                     dict(expected, det_scores_0=np.round(expected["det_scores_0"], 5)), "_orig_0")


def _authors_state(entries):
    """models.json.gz state-dict entries -> {key: zeros of the shape} (floating ones)."""
    return {key: np.zeros(shape, np.float32) for key, shape, dtype in entries if dtype.startswith("float")}


MODELS = json.load(gzip.open(os.path.join(FIXTURES, "models.json.gz")))["models"]


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_authors_key_map_of_every_released_architecture(model_name):
    """Every key of the model as their code builds it maps onto our network built from its config,
    shape for shape (a released checkpoint holds the same keys)."""
    entries = MODELS[model_name]["state_dict"]
    params = torchvision_to_mindspore(_authors_state(entries), "fcos_authors")
    cfg = load_config(["--config_path", config_path(model_name)])
    net = build_model(cfg, portable=True)
    check_params(params, {p.name: tuple(p.shape) for p in net.get_parameters()})
    config = MODELS[model_name]["config"]
    assert cfg.stride_in_1x1 == config["MODEL.RESNETS.STRIDE_IN_1X1"]
    assert cfg.norm_reg_targets == config["MODEL.FCOS.NORM_REG_TARGETS"]
    assert cfg.cnt_on_reg == config["MODEL.FCOS.CENTERNESS_ON_REG"]
    assert cfg.center_sampling_radius == config["MODEL.FCOS.CENTER_SAMPLING_RADIUS"]
    assert cfg.reg_loss == config["MODEL.FCOS.IOU_LOSS_TYPE"]
    assert cfg.min_size[0] == config["INPUT.MIN_SIZE_TEST"] and cfg.max_size == config["INPUT.MAX_SIZE_TEST"]
    assert cfg.pixel_mean == config["INPUT.PIXEL_MEAN"] and cfg.pixel_std == config["INPUT.PIXEL_STD"]
    assert cfg.score_threshold == config["MODEL.FCOS.INFERENCE_TH"]
    assert cfg.nms_iou_threshold == config["MODEL.FCOS.NMS_TH"]
    assert cfg.max_detection_boxes_num == config["MODEL.FCOS.PRE_NMS_TOP_N"]
    assert cfg.detections_per_img == config["TEST.DETECTIONS_PER_IMG"]


def test_authors_dcn_and_unknown_keys_refused_in_one_line():
    state = _authors_state(MODELS["fcos_imprv_R_50_FPN_1x"]["state_dict"])
    dcn = dict(state, **{"backbone.body.layer4.0.conv2.offset.weight": np.zeros((18, 512, 3, 3), np.float32)})
    with pytest.raises(ConversionError, match="deformable convolutions"):
        torchvision_to_mindspore(dcn, "fcos_authors")
    extra = dict(state, **{"rpn.head.extra_conv.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ConversionError, match="rpn.head.extra_conv.weight"):
        torchvision_to_mindspore(extra, "fcos_authors")


def test_authors_size_rule_differs_from_torchvision_where_it_should():
    """Their rule rounds the capped short side (400) where torchvision floors the scale (399); both
    keep the image when its short side is already min_size."""
    assert keep_ratio_size(300, 1000, 800, 1333, rule="maskrcnn_benchmark") == (400, 1333)
    assert keep_ratio_size(300, 1000, 800, 1333) == (399, 1333)
    assert keep_ratio_size(800, 1203, 800, 1333, rule="maskrcnn_benchmark") == (800, 1203)
    assert keep_ratio_size(1000, 600, 800, 1333, rule="maskrcnn_benchmark") == (1333, 800)
    # a fixed export shape still holds the result
    assert keep_ratio_size(300, 1000, 800, 1333, fit_hw=(320, 1024), rule="maskrcnn_benchmark") == (307, 1024)


def test_plus_one_convention_clips_suppresses_and_keeps_ties():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [50, 50, 70, 70], [60, 60, 80, 80], [0, 0, 200, 200]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.5, 0.5, 0.4], np.float32)
    labels = np.zeros(5, np.int64)
    # IoU of the first two: 5x10 / (100+100-50) = 0.33 with +1 sides (x2 - x1 + 1 = 10), 4x9 / (81+81-36)
    # = 0.29 without: at 0.3 only the +1 convention suppresses the second
    kept = select_detections(boxes, scores, labels, (100, 100), 0.0, 0.3, 2, plus_one=True)[1]
    np.testing.assert_allclose(kept, [0.9, 0.5, 0.5])  # the tie at the cut stays
    np.testing.assert_allclose(select_detections(boxes, scores, labels, (100, 100), 0.0, 0.3, 2)[1], [0.9, 0.8])
    clipped = select_detections(boxes, scores, labels, (100, 100), 0.0, 0.3, 5, plus_one=True)[0]
    assert clipped.max() == 99.0
    assert select_detections(boxes, scores, labels, (100, 100), 0.0, 0.3, 5)[0].max() == 100.0


def test_class_probability_rule_drops_confident_centres_of_unlikely_classes():
    """threshold_on class_probability: a pair whose sigmoid(cls) is below the threshold is no
    candidate however high its centreness (-1), while the score rule ranks it by sqrt(cls * ctr)."""
    from src.inference.decoder import FCOSDecoder
    from src.model.points import PointCoder
    coder = PointCoder((8, 16, 32), 0.5, True, "nominal")
    points = sum(h * w for h, w in coder.level_sizes(32, 32))
    cls = np.full((1, points, 2), -6.0, np.float32)
    cls[0, 0, 0] = np.log(0.04 / 0.96)  # sigmoid 0.04 < 0.05
    cls[0, 1, 1] = np.log(0.06 / 0.94)  # sigmoid 0.06 > 0.05
    ctr = np.full((1, points, 1), -6.0, np.float32)
    ctr[0, 0, 0], ctr[0, 1, 0] = 8.0, -1.0
    reg = np.ones((1, points, 4), np.float32)
    images = ms.Tensor(np.zeros((1, 3, 32, 32), np.float32))
    args = [ms.Tensor(a) for a in (cls, reg, ctr)]
    _, scores, labels = (x.asnumpy()[0] for x in FCOSDecoder(coder, True, 1000, class_threshold=0.05)(images, *args))
    valid = scores > 0
    assert valid.sum() == 1 and labels[valid][0] == 1
    np.testing.assert_allclose(scores[valid][0], np.sqrt(0.06 / (1 + np.e)), rtol=1e-5)
    _, scores, _ = (x.asnumpy()[0] for x in FCOSDecoder(coder, True, 1000)(images, *args))
    assert np.isclose(scores.max(), np.sqrt(0.04 / (1 + np.exp(-8.0))), rtol=1e-5)
