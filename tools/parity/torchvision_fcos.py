"""torchvision's FCOS as the parity fixture describes it, for the side tools in this folder.

Needs torch + torchvision (a side environment, see ../../../shared/tools/README.md); the product
never imports this. The model is rebuilt from a fixture's manifest.json (ResNet of `depth` with
frozen BatchNorm, FPN of `fpn_out_channels` on C3-C5 with P6 from P5 and P7 from relu(P6),
torchvision's FCOSHead) and loaded strictly with the fixture's weights (weights.py), so every
parameter name and shape is checked against the manifest.
"""
import importlib.util
import json
import os
import sys

SHIM_DIR = os.environ.get("TORCHVISION_SHIM_DIR", os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "tools")))
if SHIM_DIR not in sys.path:
    sys.path.insert(0, SHIM_DIR)
import torchvision_cpu_shim  # noqa: E402,F401  (registers a CPU NMS before torchvision loads)
import torch  # noqa: E402
from torchvision.models import resnet  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.models.detection.fcos import FCOS  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

LOSS_KEYS = ("classification", "bbox_regression", "bbox_ctrness")


def load_fixture(folder):
    """folder (e.g. .../parity/r18_fpn64) -> (manifest, {torchvision key: float32 ndarray})."""
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(folder, "..", "weights.py"))
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    return manifest, weights.make_weights(manifest)


def build_fcos(manifest, state=None):
    """torchvision FCOS of the manifest's architecture; with state, its weights loaded strictly."""
    body = getattr(resnet, f"resnet{manifest['depth']}")(weights=None, norm_layer=FrozenBatchNorm2d)
    stage2 = body.inplanes // 8  # C2 width: 64 (basic blocks) or 256 (bottlenecks)
    channels = manifest["fpn_out_channels"]
    num_levels = len(manifest["strides"])
    if num_levels != 5:
        raise ValueError(f"this builder makes P3-P7 (LastLevelP6P7), the manifest has {num_levels} levels")
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [stage2 * 2, stage2 * 4, stage2 * 8], channels,
                               extra_blocks=LastLevelP6P7(channels, channels))
    config = manifest["config"]
    model = FCOS(backbone, num_classes=config["num_classes"], min_size=config["min_size"],
                 max_size=config["max_size"], image_mean=config["image_mean"], image_std=config["image_std"],
                 score_thresh=config["score_thresh"], nms_thresh=config["nms_thresh"],
                 detections_per_img=config["detections_per_img"], topk_candidates=config["topk_candidates"],
                 center_sampling_radius=config["center_sampling_radius"])
    expected_keys = [key for key, _ in manifest["params"]]
    if list(model.state_dict()) != expected_keys:
        raise ValueError("the torchvision model's state-dict keys differ from the manifest's")
    if state is not None:
        model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    return model


def losses_on_batch(model, images, targets):
    """FCOS losses on an already preprocessed, padded batch (B, 3, H, W): the steps of
    FCOS.forward in training mode after its transform, so preprocessing is not part of it.

    targets: list of {"boxes": (M, 4) float, "labels": (M,) int64 0-based}, in the batch frame.
    -> {"classification", "bbox_regression", "bbox_ctrness"}: each summed and divided by the
    batch's number of positive points (FCOSHead.compute_loss).
    """
    features = list(model.backbone(images).values())
    head_outputs = model.head(features)
    # The anchor generator reads only the padded batch size; image sizes are not used by it.
    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
    anchors = model.anchor_generator(image_list, features)
    num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
    return model.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)


def fixture_targets(arrays, dtype=torch.float32):
    """The fixture's per-image GT -> torchvision targets."""
    batch = len(arrays["image_sizes"])
    return [{"boxes": torch.tensor(arrays[f"gt_boxes_{i}"], dtype=dtype),
             "labels": torch.tensor(arrays[f"gt_labels_{i}"], dtype=torch.int64)} for i in range(batch)]
