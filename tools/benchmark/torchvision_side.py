"""The torchvision side of ``python -m tools.benchmark --compare_torchvision``.

Run by the benchmark in a Python that has torch and torchvision (never a dependency of this
project): ``TORCH_PYTHON -m tools.benchmark.torchvision_side --spec JSON``. It builds
torchvision.models.detection.FCOS with the backbone, FPN channels, head depth, classes,
frozen parts and post-processing settings of the MindSpore model (randomly initialised, as
ours), times it on the same fixed input as the MindSpore side, and prints one JSON line.

What one step is:
  infer: ``model(images)`` in eval mode under torch.inference_mode(): GeneralizedRCNNTransform
         (normalisation, a resize at scale 1.0, batching), backbone + FPN, head, top-k decoding,
         class-aware NMS and box rescaling. parts: ``forward`` (up to the head's output) and
         ``postprocess`` (the rest), timed by hooks on the head.
  train: ``model(images, targets)`` in train mode (the resize is skipped), the sum of the three
         losses, backward, and an SGD (momentum, weight decay) step.
  convs: no model; each convolution layer of the spec's ``layers`` (traced from the MindSpore
         network by tools.benchmark.convs) as torch.nn.Conv2d alone: forward under no_grad,
         and forward + backward (input and weight gradients, none accumulated).
The oneDNN ISA is left at its default here (the MindSpore side caps it at AVX2; torch uses
blocked-layout AVX-512 kernels and is not slowed by the NCHW problem MindSpore has).
"""
import argparse
import glob
import importlib.util
import json
import os
import time

import numpy as np
import torch

from tools.benchmark.common import CONV_TIME_KEYS, best_ms, json_line, summarise, synthetic_ground_truth, time_steps

_FALLBACK_OPS = []  # torch.library objects of the stand-in NMS: the op lives as long as they do


def _nms_numpy(dets, scores, iou_threshold):
    """Greedy NMS over (N, 4) boxes by score, descending; -> (K,) int64 kept indices.

    Stands in for torchvision's compiled nms where its extension does not load (see
    import_torchvision); the same algorithm, in float32 like the compiled kernel.
    """
    boxes = dets.detach().cpu().numpy()
    order = np.argsort(-scores.detach().cpu().numpy(), kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.clip(np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return torch.as_tensor(np.asarray(keep, np.int64), device=dets.device)


def _no_op():
    """Replaces torchvision's check that its compiled extension is loaded."""


def import_torchvision():
    """Import torchvision -> (module, whether its compiled NMS is used).

    The PyPI torchvision wheel is a CUDA build: with a CPU-only torch its extension fails to
    load and the import itself fails on the missing torchvision::nms. In that case nms (and
    qnms, whose shape function torchvision registers too) are defined first, nms with
    _nms_numpy as its CPU kernel (FCOS needs no other compiled op).
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed in this Python")
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C.*"))
    try:
        torch.ops.load_library(libraries[0])
        compiled = True
    except (IndexError, OSError):
        compiled = False
    if not compiled:
        definition = torch.library.Library("torchvision", "DEF")
        # torchvision registers shape functions for both at import; only nms gets a kernel.
        for name in ("nms", "qnms"):
            definition.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        kernel = torch.library.Library("torchvision", "IMPL", "CPU")
        kernel.impl("nms", _nms_numpy)
        _FALLBACK_OPS.extend((definition, kernel))
    import torchvision
    import torchvision.ops.boxes
    if not compiled:
        torchvision.ops.boxes._assert_has_ops = _no_op
    return torchvision, compiled


def check_supported(spec):
    """Raise ValueError for model options torchvision's FCOS has no equivalent of."""
    fixed = {"use_GN_head": True, "add_centerness": True, "cnt_on_reg": True, "norm_reg_targets": True}
    wrong = [f"{key}={spec[key]}" for key, value in fixed.items() if spec[key] != value]
    if wrong:
        raise ValueError(f"torchvision's FCOS has no equivalent of {', '.join(wrong)}")
    if spec["strides"] != [8, 16, 32, 64, 128]:
        raise ValueError("torchvision's FCOS has the levels P3-P7 only (strides 8..128)")


def build_fcos(spec, torchvision):
    """torchvision FCOS equal in architecture to the MindSpore model of ``spec`` (random weights)."""
    from torch import nn
    from torchvision.models import resnet
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    check_supported(spec)
    norm = FrozenBatchNorm2d if spec["freeze_bn"] else nn.BatchNorm2d
    body = getattr(resnet, spec["backbone"])(weights=None, norm_layer=norm)
    if spec["freeze_stage_1"]:
        for name, param in body.named_parameters():
            if name.startswith(("conv1.", "bn1.", "layer1.")):
                param.requires_grad_(False)
    c5 = body.inplanes  # channels of layer4's output
    channels = spec["fpn_out_channels"]
    extra = LastLevelP6P7(channels if spec["use_p5"] else c5, channels)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [c5 // 4, c5 // 2, c5], channels, extra_blocks=extra)
    head = FCOSHead(channels, 1, spec["class_num"], spec["num_head_convs"])
    height, width = spec["height"], spec["width"]
    # min/max size equal to the input's sides: eval resizes by exactly 1.0, train skips resizing.
    return FCOS(backbone, spec["class_num"], min_size=min(height, width), max_size=max(height, width),
                head=head, center_sampling_radius=spec["center_sampling_radius"],
                score_thresh=spec["score_threshold"], nms_thresh=spec["nms_iou_threshold"],
                detections_per_img=spec["detections_per_img"],
                topk_candidates=spec["max_detection_boxes_num"], _skip_resize=True)


def _inputs(spec):
    """The benchmark's fixed batch: images as a list of (3, H, W) tensors and training targets."""
    rng = np.random.default_rng(spec["seed"])
    images = rng.standard_normal((spec["batch_size"], 3, spec["height"], spec["width"]), np.float32)
    boxes, labels, mask = synthetic_ground_truth(spec["batch_size"], spec["height"], spec["width"],
                                                 spec["num_gt_boxes"], spec["max_gt_boxes"],
                                                 spec["class_num"], spec["seed"])
    targets = [{"boxes": torch.from_numpy(b[m]), "labels": torch.from_numpy(l[m].astype(np.int64))}
               for b, l, m in zip(boxes, labels, mask)]
    return [torch.from_numpy(image) for image in images], targets


def infer_step(model, images):
    """-> step() running eval inference, returning {'forward', 'postprocess'} seconds."""
    model.eval()
    marks = {}

    def head_done(_module, _inputs, _outputs):
        marks["head"] = time.perf_counter()

    model.head.register_forward_hook(head_done)

    def step():
        start = time.perf_counter()
        with torch.inference_mode():
            model(images)
        end = time.perf_counter()
        return {"forward": marks["head"] - start, "postprocess": end - marks["head"]}

    return step


def train_step(model, images, targets, spec):
    """-> step() running one training step: losses, backward, SGD update."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"],
                                weight_decay=spec["weight_decay"])

    def step():
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        total.item()

    return step


def time_layer(layer, steps, warmup):
    """One convolution layer (a tools.benchmark.convs spec) -> {'fwd_ms', 'fwd_bwd_ms'}."""
    conv = torch.nn.Conv2d(layer["input"][1], layer["out_channels"], layer["kernel"], stride=layer["stride"],
                           padding=layer["padding"], dilation=layer["dilation"], groups=layer["groups"],
                           bias=layer["bias"])
    x = torch.randn(layer["input"], requires_grad=True)
    dy = torch.randn_like(conv(x))

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        x.grad = None
        conv.zero_grad(set_to_none=True)
        conv(x).backward(dy)

    return {key: best_ms(fn, steps, warmup) for key, fn in zip(CONV_TIME_KEYS, (forward, forward_backward))}


def run(spec):
    """Build, time, summarise -> result dict (see tools.benchmark.common.summarise)."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if spec["mode"] == "convs":
        return {"framework": "torch", "mode": "convs", "versions": {"torch": torch.__version__},
                "threads": torch.get_num_threads(),
                "layers": [time_layer(layer, spec["steps"], spec["warmup"]) for layer in spec["layers"]]}
    torchvision, compiled_nms = import_torchvision()
    model = build_fcos(spec, torchvision)
    images, targets = _inputs(spec)
    step = infer_step(model, images) if spec["mode"] == "infer" else train_step(model, images, targets, spec)
    first, times, parts = time_steps(step, spec["steps"], spec["warmup"])
    result = summarise(first, times, parts, spec["batch_size"])
    result.update({"framework": "torchvision", "mode": spec["mode"], "batch_size": spec["batch_size"],
                   "input": f"{spec['height']}x{spec['width']}", "steps": spec["steps"], "warmup": spec["warmup"],
                   "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
                   "threads": torch.get_num_threads(), "compiled_nms": compiled_nms})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON object written by tools.benchmark")
    spec = json.loads(parser.parse_args(argv).spec)
    print(json_line(run(spec)))


if __name__ == "__main__":
    main()
