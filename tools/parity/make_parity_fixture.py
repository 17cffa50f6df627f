"""Make an FCOS parity fixture (manifest.json + expected.npz) with torchvision's real FCOS.

Side tool, run with the torchvision side environment (never a product dependency):

    PYTHONPATH=../shared/tools .venv-tv/bin/python tools/parity/make_parity_fixture.py \\
        --out-dir /tmp/parity_480x864/r18_fpn64

The fixture has the format of ../shared/parity/r18_fpn64 (see ../shared/parity/README.md): the same
manifest keys and every array of expected.npz. Everything is computed by
torchvision.models.detection.FCOS itself (built and loaded by torchvision_fcos.py): its
GeneralizedRCNNTransform (resize, normalise, pad to a multiple of 32, and the GT boxes' resize),
its backbone + FPN, head, AnchorGenerator (the points are the anchors' centres), compute_loss,
postprocess_detections and transform.postprocess (boxes back in original pixels). Nothing of
FCOS's semantics is rewritten here. The weights follow the shared weights.py rule from the
manifest's seed; the manifest's parameter list is the torchvision model's state dict.

The default inputs - the quokka photo (643x960) and a portrait crop of it (500x400), min_size
480, max_size 864 - give a padded batch of 608x736, which divides by neither 64 nor 128: the
points of P6 and P7 step by (60, 61) and (121, 122) pixels, not 64 and 128 (printed).

--check-against FIXTURE recomputes an existing fixture from its own manifest, raw images and
GT (resized frame) and reports each array's largest difference: run on the shared fixture it
shows this generator reproduces what torchvision computed there.

The folder above --out-dir gets weights.py and quokka.jpg (copied from --shared-dir) when it
lacks them, as the tests read them next to the fixture (FCOS_PARITY_DIR=<out-dir>).
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_fcos  # noqa: E402  (imports torch, torchvision through the CPU shim)
import torch  # noqa: E402
import cv2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "parity"))
GRAD_PREFIX = "grad:"
GRAD64_PREFIX = "grad64:"  # the same gradients computed in float64: the truth both float32 runs approximate
JITTER64_PREFIX = "jitter64:"  # how far that truth jumps under float32-sized weight changes (ReLU kinks)
STRIDES = [8, 16, 32, 64, 128]
NOTE = ("points (anchor centers) sit at (x*stride, y*stride) in torchvision, i.e. offset 0; regression is "
        "normalised by stride; boxes in the padded-batch coordinate frame")
# The default inputs: (crop of quokka.jpg as (y0, y1, x0, x1) or None, GT in original pixels of that
# image as (x1, y1, x2, y2, 0-based label)). Labels: 0 animal, 1 part of its head, 2 other.
DEFAULT_IMAGES = (
    (None, ((140, 40, 550, 643, 0), (145, 45, 480, 340, 1), (280, 235, 350, 300, 1),
            (232, 185, 265, 218, 1), (680, 195, 960, 350, 2))),
    ((100, 600, 100, 500), ((40, 0, 400, 500, 0), (45, 0, 380, 240, 1), (180, 135, 250, 200, 1),
                            (105, 370, 230, 450, 2))),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", help="the fixture folder to write (e.g. /tmp/parity_480x864/r18_fpn64)")
    parser.add_argument("--check-against", help="recompute this fixture folder and compare, write nothing")
    parser.add_argument("--shared-dir", default=SHARED_DIR, help="holds weights.py and quokka.jpg")
    parser.add_argument("--depth", type=int, default=18, choices=(18, 34, 50, 101))
    parser.add_argument("--fpn-out-channels", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--min-size", type=int, default=480)
    parser.add_argument("--max-size", type=int, default=864)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float64-drift", action="store_true",
                        help="also take the gradients in float64, store them as grad64: arrays (the tests' truth) "
                             "and print how far torch's float32 ones (grad:) are from them: a badly conditioned "
                             "batch shows here, not in the product")
    args = parser.parse_args(argv)
    if bool(args.out_dir) == bool(args.check_against):
        parser.error("give exactly one of --out-dir and --check-against")
    return args


def load_weights_module(shared_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(shared_dir, "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def architecture_params(args):
    """[[key, shape], ...] of torchvision's FCOS of this depth/FPN width, in state-dict order.

    Builds the architecture torchvision_fcos.build_fcos builds (torchvision's ResNet with frozen
    BatchNorm, BackboneWithFPN on layer2-4 with LastLevelP6P7, FCOS); build_fcos then checks the
    keys strictly against this list, so the two cannot drift apart.
    """
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOS
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = getattr(resnet, f"resnet{args.depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    c2 = body.inplanes // 8
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c2 * 2, c2 * 4, c2 * 8],
                               args.fpn_out_channels,
                               extra_blocks=LastLevelP6P7(args.fpn_out_channels, args.fpn_out_channels))
    model = FCOS(backbone, num_classes=args.num_classes)
    return [[key, list(value.shape)] for key, value in model.state_dict().items()]


def make_manifest(args):
    config = {"num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size,
              "score_thresh": 0.05, "nms_thresh": 0.6, "detections_per_img": 100, "topk_candidates": 1000,
              "center_sampling_radius": 1.5, "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225]}
    return {"seed": args.seed, "params": architecture_params(args), "depth": args.depth,
            "fpn_out_channels": args.fpn_out_channels, "config": config, "point_offset": 0.0,
            "strides": list(STRIDES), "note": NOTE}


def default_inputs(shared_dir):
    """-> ([(H, W, 3) uint8 RGB], [(M, 4) float32 GT in original pixels], [(M,) int64 labels])."""
    photo = cv2.cvtColor(cv2.imread(os.path.join(shared_dir, "quokka.jpg"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    images, boxes, labels = [], [], []
    for crop, gt in DEFAULT_IMAGES:
        image = photo if crop is None else photo[crop[0]:crop[1], crop[2]:crop[3]]
        images.append(np.ascontiguousarray(image))
        boxes.append(np.array([row[:4] for row in gt], np.float32))
        labels.append(np.array([row[4] for row in gt], np.int64))
    return images, boxes, labels


def grad_names(model):
    """The fixture's gradient set: every FPN and head parameter, and the first conv of the stem
    and of each backbone stage (the shared README's rule), in parameter order."""
    body = {"backbone.body.conv1.weight"} | {f"backbone.body.layer{k}.0.conv1.weight" for k in range(1, 5)}
    return [name for name, _ in model.named_parameters()
            if name in body or name.startswith(("backbone.fpn.", "head."))]


def compute(manifest, state, images, gt_boxes, gt_labels, boxes_resized=False):
    """Run torchvision's FCOS on the images -> {name: array} of expected.npz.

    gt_boxes are in original pixels (torchvision's transform resizes them) or, with
    boxes_resized, already in the resized frame (used as they are).
    """
    model = torchvision_fcos.build_fcos(manifest, state)
    model.train()  # losses; the head and FrozenBatchNorm compute the same in eval mode
    tensors = [torch.from_numpy(image).permute(2, 0, 1).to(torch.float32) / 255.0 for image in images]
    targets = [{"boxes": torch.from_numpy(b.astype(np.float32)), "labels": torch.from_numpy(l.astype(np.int64))}
               for b, l in zip(gt_boxes, gt_labels)]
    original_sizes = [tuple(t.shape[-2:]) for t in tensors]
    if boxes_resized:
        image_list, _ = model.transform(tensors)
    else:
        image_list, targets = model.transform(tensors, targets)

    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    num_per_level = [f.size(2) * f.size(3) for f in features]
    matched = []  # torchvision's own matching (FCOS.compute_loss hands it to FCOSHead.compute_loss)
    head_loss = model.head.compute_loss
    model.head.compute_loss = lambda t, h, a, m: matched.extend(m) or head_loss(t, h, a, m)
    try:
        losses = model.compute_loss(targets, head_outputs, anchors, num_per_level)
    finally:
        del model.head.compute_loss
    positives = [[int((level >= 0).sum()) for level in m.split(num_per_level)] for m in matched]
    print("positive points per level (P3..P7), per image:", positives)
    total = sum(losses[key] for key in torchvision_fcos.LOSS_KEYS)
    model.zero_grad(set_to_none=True)
    total.backward()
    params = dict(model.named_parameters())

    model.eval()  # transform.postprocess leaves the boxes in the resized frame in training mode
    with torch.no_grad():
        split_outputs = {key: list(value.split(num_per_level, dim=1)) for key, value in head_outputs.items()}
        split_anchors = [list(a.split(num_per_level)) for a in anchors]
        detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        resized = [{key: value.clone() for key, value in det.items()} for det in detections]
        original = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        direct = model(tensors)  # the whole of FCOS.forward must give the same detections
    for ours, theirs in zip(original, direct):
        for key in ("boxes", "scores", "labels"):
            if not torch.equal(ours[key], theirs[key]):
                raise AssertionError(f"FCOS.forward's {key} differ from the steps recorded here")

    out = {f"images_uint8_{i}": image for i, image in enumerate(images)}
    out["batch_input"] = image_list.tensors.detach().numpy()
    out["image_sizes"] = np.array(image_list.image_sizes, np.int64)
    out["orig_sizes"] = np.array(original_sizes, np.int64)
    out["num_points_per_level"] = np.array(num_per_level, np.int64)
    # Every image's anchors are the same; the point is the anchor's centre.
    out["points"] = ((anchors[0][:, :2] + anchors[0][:, 2:]) / 2).detach().numpy().astype(np.float32)
    for key in ("cls_logits", "bbox_regression", "bbox_ctrness"):
        out[key] = head_outputs[key].detach().numpy()
    for key in torchvision_fcos.LOSS_KEYS:
        out[f"loss_{key}"] = losses[key].detach().numpy().astype(np.float32)
    for name in grad_names(model):
        out[GRAD_PREFIX + name] = params[name].grad.detach().numpy().copy()
    for level, feature in enumerate(features):
        out[f"fpn_p{level + 3}"] = feature.detach().numpy()
    for i, (target, det, det_orig) in enumerate(zip(targets, resized, original)):
        out[f"gt_boxes_{i}"] = target["boxes"].numpy().astype(np.float32)
        out[f"gt_labels_{i}"] = target["labels"].numpy().astype(np.int64)
        out[f"det_boxes_{i}"] = det["boxes"].numpy()
        out[f"det_scores_{i}"] = det["scores"].numpy()
        out[f"det_labels_{i}"] = det["labels"].numpy().astype(np.int64)
        out[f"det_boxes_orig_{i}"] = det_orig["boxes"].numpy()
    return out


def float64_drift(manifest, state, arrays, jitter_runs=3, jitter=1e-6):
    """Add grad64:<name> (torch in float64 on the same weights and batch) for every grad: array,
    and jitter64:<name>, the largest change of that float64 gradient when every weight is scaled by
    1 + jitter * N(0, 1) (jitter_runs seeds): how far the exact gradient jumps within float32
    round-off of the weights (a ReLU input near zero changes sides), which no float32
    implementation can resolve. Print max|grad_f32 - grad_f64| / max|grad_f64| (worst per tier)."""
    images = torch.tensor(arrays["batch_input"], dtype=torch.float64)
    targets = torchvision_fcos.fixture_targets(arrays, torch.float64)

    def gradients(weights):
        model = torchvision_fcos.build_fcos(manifest, weights).double()
        model.train()
        losses = torchvision_fcos.losses_on_batch(model, images, targets)
        sum(losses[key] for key in torchvision_fcos.LOSS_KEYS).backward()
        return {name: param.grad.numpy().copy() for name, param in model.named_parameters()
                if GRAD_PREFIX + name in arrays}

    exact = gradients(state)
    jumps = {name: 0.0 for name in exact}
    for seed in range(jitter_runs):
        rng = np.random.RandomState(seed)
        moved = gradients({key: (value * (1 + jitter * rng.standard_normal(value.shape))).astype(np.float32)
                           for key, value in state.items()})
        for name, grad in moved.items():
            jumps[name] = max(jumps[name], float(np.abs(grad - exact[name]).max()))
    drift = {}
    for name, want in exact.items():
        arrays[GRAD64_PREFIX + name] = want
        arrays[JITTER64_PREFIX + name] = np.float64(jumps[name])
        drift[name] = float(np.abs(arrays[GRAD_PREFIX + name] - want).max() / np.abs(want).max())
    for tier, names in (("backbone.body", [n for n in drift if n.startswith("backbone.body.")]),
                        ("FPN and head", [n for n in drift if not n.startswith("backbone.body.")])):
        worst = sorted(names, key=lambda n: -drift[n])[:3]
        print(f"torch float32 vs float64 gradients, {tier}: worst " + ", ".join(f"{n} {drift[n]:.2g}" for n in worst))
        jumpy = sorted(names, key=lambda n: -jumps[n] / np.abs(exact[n]).max())[:3]
        print(f"  float64 jumps under {jitter:g} weight jitter: " +
              ", ".join(f"{n} {jumps[n] / np.abs(exact[n]).max():.2g}" for n in jumpy))


def describe(arrays, strides):
    """Print the batch shape and each level's torchvision point steps next to its nominal stride."""
    height, width = arrays["batch_input"].shape[2:]
    print(f"batch_input {arrays['batch_input'].shape}, image_sizes {arrays['image_sizes'].tolist()}, "
          f"orig_sizes {arrays['orig_sizes'].tolist()}")
    offset = 0
    for level, (stride, count) in enumerate(zip(strides, arrays["num_points_per_level"])):
        h, w = arrays[f"fpn_p{level + 3}"].shape[2:]
        pts = arrays["points"][offset:offset + count].reshape(h, w, 2)
        step_x = float(pts[0, 1, 0] - pts[0, 0, 0]) if w > 1 else float("nan")
        step_y = float(pts[1, 0, 1] - pts[0, 0, 1]) if h > 1 else float("nan")
        print(f"  P{level + 3}: {h}x{w} points, step (y, x) = ({step_y:g}, {step_x:g}), nominal stride {stride}"
              f"{'' if (step_y, step_x) == (stride, stride) else '  <- differs'}; padded // size = "
              f"({height // h}, {width // w})")
        offset += count
    for i in range(len(arrays["image_sizes"])):
        print(f"  image {i}: {len(arrays[f'gt_boxes_{i}'])} GT, {len(arrays[f'det_boxes_{i}'])} detections")
    print("  losses:", {key: float(arrays[f"loss_{key}"]) for key in torchvision_fcos.LOSS_KEYS})


def check_against(folder, shared_dir):
    """Recompute an existing fixture from its manifest, images and GT; report differences."""
    manifest, state = torchvision_fcos.load_fixture(folder)
    with np.load(os.path.join(folder, "expected.npz")) as data:
        want = {key: data[key] for key in data.files}
    batch = len(want["orig_sizes"])
    got = compute(manifest, state, [want[f"images_uint8_{i}"] for i in range(batch)],
                  [want[f"gt_boxes_{i}"] for i in range(batch)], [want[f"gt_labels_{i}"] for i in range(batch)],
                  boxes_resized=True)
    describe(got, manifest["strides"])
    if set(got) != set(want):
        print("key sets differ: only here", sorted(set(got) - set(want)), "only there", sorted(set(want) - set(got)))
    worst = 0.0
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            print(f"  {key}: shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
            worst = float("inf")
            continue
        err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        # The backbone convs' gradients cross ReLU kinks that float32 round-off can flip (see
        # tests/test_parity_grad.py): torch against itself differs there by up to ~1e-2.
        worst = max(worst, (err / scale if scale else err) / (20.0 if key.startswith("grad:backbone.body.") else 1.0))
        if err:
            print(f"  {key}: max abs diff {err:.3g} (max |value| {scale:.3g})")
    print(f"checked {len(want)} arrays; largest difference relative to the array's magnitude "
          f"(backbone.body gradients: over 20): {worst:.3g}")
    return 0 if set(got) == set(want) and worst < 1e-3 else 1


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.check_against:
        return check_against(args.check_against, args.shared_dir)

    manifest = make_manifest(args)
    state = load_weights_module(args.shared_dir).make_weights(manifest)
    images, boxes, labels = default_inputs(args.shared_dir)
    arrays = compute(manifest, state, images, boxes, labels)
    describe(arrays, manifest["strides"])
    if args.float64_drift:
        float64_drift(manifest, state, arrays)
    height, width = arrays["batch_input"].shape[2:]
    if width % STRIDES[-1] == 0:
        print(f"warning: the padded width {width} divides by {STRIDES[-1]}", file=sys.stderr)

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    npz = os.path.join(args.out_dir, "expected.npz")
    np.savez_compressed(npz, **arrays)
    parent = os.path.dirname(os.path.abspath(args.out_dir))
    for name in ("weights.py", "quokka.jpg"):
        if not os.path.exists(os.path.join(parent, name)):
            shutil.copy(os.path.join(args.shared_dir, name), os.path.join(parent, name))
    print(f"wrote {args.out_dir}/manifest.json and expected.npz ({os.path.getsize(npz) / 1e6:.1f} MB, "
          f"{len(arrays)} arrays); {parent} holds weights.py and quokka.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
