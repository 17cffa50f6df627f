"""PyTorch FCOS and ResNet checkpoints -> MindSpore checkpoints for this FCOS.

Three kinds of input, told apart by their keys (or --kind):
  fcos          a whole torchvision FCOS (backbone.body.*, backbone.fpn.*, head.classification_head.*,
                head.regression_head.*); torchvision has no per-level Scale, so ours are set to 1.0.
  fcos_authors  a model of the FCOS authors (tianzhi0549/FCOS, fcos_core: backbone.body.stem.*,
                backbone.fpn.fpn_inner2..4, rpn.head.*; a released .pth holds them under "model"
                with a "module." prefix). Evaluate it with its configs/fcos_authors/*.yaml: the
                stride placement, BatchNorm epsilon, input format and selection rules are not in
                the weights. Deformable-convolution (DCN) models are refused.
  backbone      an ImageNet torchvision ResNet/ResNeXt (conv1.*, bn1.*, layer1-4.*; fc.* is dropped),
                giving a checkpoint with exactly our FCOS's backbone.* names, for --pretrained_backbone.

Input files: a .pth state dict (needs torch, imported only then) or an .npz of {key: array}. The
architecture is read off the weights, every name and shape is checked against our network, and
the .ckpt is written atomically.

    python -m tools.convert_weights --input resnet50-0676ba61.pth --output resnet50_backbone.ckpt
    python -m tools.convert_weights --input fcos_resnet50_fpn_coco.pth --output fcos_r50.ckpt --kind fcos
    python -m tools.convert_weights --input FCOS_imprv_R_50_FPN_1x.pth --output fcos_imprv_r50.ckpt
"""
import argparse
import os
import re
import sys

import mindspore as ms
import numpy as np

from src.engine.checkpoint import save_checkpoint_atomic
from src.model.backbone import ARCHITECTURES, ResNet
from src.model.fcos import DEFAULT_STRIDES, FCOS

KINDS = ("fcos", "fcos_authors", "backbone")

# (torchvision module path pattern, our module path); the leaf (weight, bias, ...) follows.
_MODULE_RULES = {
    "fcos": (
        (r"backbone\.body\.(.+)", r"backbone.\1"),
        (r"backbone\.fpn\.inner_blocks\.(\d+)\.0", r"fpn.lateral.\1"),
        (r"backbone\.fpn\.layer_blocks\.(\d+)\.0", r"fpn.output.\1"),
        (r"backbone\.fpn\.extra_blocks\.p6", "fpn.extra.0"),
        (r"backbone\.fpn\.extra_blocks\.p7", "fpn.extra.1"),
        (r"head\.classification_head\.conv\.(\d+)", r"head.cls_tower.\1"),
        (r"head\.classification_head\.cls_logits", "head.cls_logits"),
        (r"head\.regression_head\.conv\.(\d+)", r"head.reg_tower.\1"),
        (r"head\.regression_head\.bbox_reg", "head.bbox_reg"),
        (r"head\.regression_head\.bbox_ctrness", "head.centerness"),
    ),
    "fcos_authors": (
        (r"backbone\.body\.stem\.(conv1|bn1)", r"backbone.\1"),
        (r"backbone\.body\.(layer[1-4]\..+)", r"backbone.\1"),
        (r"backbone\.fpn\.fpn_inner([2-4])", lambda m: f"fpn.lateral.{int(m.group(1)) - 2}"),
        (r"backbone\.fpn\.fpn_layer([2-4])", lambda m: f"fpn.output.{int(m.group(1)) - 2}"),
        (r"backbone\.fpn\.top_blocks\.p6", "fpn.extra.0"),
        (r"backbone\.fpn\.top_blocks\.p7", "fpn.extra.1"),
        (r"rpn\.head\.cls_tower\.(\d+)", r"head.cls_tower.\1"),
        (r"rpn\.head\.bbox_tower\.(\d+)", r"head.reg_tower.\1"),
        (r"rpn\.head\.cls_logits", "head.cls_logits"),
        (r"rpn\.head\.bbox_pred", "head.bbox_reg"),
        (r"rpn\.head\.centerness", "head.centerness"),
        (r"rpn\.head\.scales\.(\d+)", r"head.scales.\1"),
    ),
    "backbone": (
        (r"((?:conv1|bn1|layer[1-4])(?:\..+)?)", r"backbone.\1"),
    ),
}
# Keys without a counterpart here, dropped on purpose: BN's step counter, the ImageNet classifier.
_DROPPED = {"fcos": (r".*num_batches_tracked",), "fcos_authors": (r".*num_batches_tracked",),
            "backbone": (r".*num_batches_tracked", r"fc\..+")}
# torch norm leaves -> MindSpore's (BatchNorm, FrozenBatchNorm2d and our GroupNorm share them).
_NORM_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                "running_var": "moving_variance"}
_SHOWN = 8  # names listed in an error message before "..."


class ConversionError(ValueError):
    """The input cannot be converted; the message says why in one line."""


def _names(keys):
    """A short, sorted listing of keys for error messages."""
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _version(text):
    """'2.6.0+cpu' -> (2, 6)."""
    parts = re.match(r"(\d+)\.(\d+)", text)
    return (int(parts.group(1)), int(parts.group(2))) if parts else (0, 0)


def load_torchvision_state(path):
    """A .pth (torch) or .npz file -> {torchvision_key: float32 ndarray}."""
    if not os.path.isfile(path):
        raise ConversionError(f"input file not found: {path}")
    if path.endswith(".npz"):
        with np.load(path) as data:
            state = {key: data[key] for key in data.files}
    elif path.endswith((".pth", ".pt")):
        try:
            import torch  # only this branch needs torch: .npz inputs convert without it
        except ImportError:
            raise ConversionError(f"reading {path} needs PyTorch (pip install torch), "
                                  "or give an .npz of {key: array} instead") from None
        if _version(torch.__version__) < (2, 6):  # weights_only could be bypassed below 2.6 (CVE-2025-32434)
            raise ConversionError(f"reading {path} needs torch >= 2.6 (this is {torch.__version__}, whose "
                                  "weights_only loader a crafted file can bypass); upgrade torch, or give an .npz")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        state = {key: value.detach().cpu().numpy() for key, value in state.items()
                 if hasattr(value, "detach")}
    else:
        raise ConversionError(f"unsupported input {path}: expected a .pth or .npz state dict")
    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    if not state:
        raise ConversionError(f"{path} holds no arrays")
    return {key: _as_float32(value) for key, value in state.items()}


def _as_float32(value):
    """Floating arrays (fp16 checkpoints too) -> float32; others unchanged."""
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def detect_kind(state):
    """'fcos' for a torchvision FCOS state dict, 'fcos_authors' for one of the FCOS authors' code,
    'backbone' for an ImageNet ResNet one."""
    keys = set(state)
    if any(key.startswith("rpn.head.") for key in keys) and any(key.startswith("backbone.body.stem.") for key in keys):
        return "fcos_authors"
    if any(key.startswith("backbone.body.") for key in keys):
        return "fcos"
    if "conv1.weight" in keys and any(key.startswith("layer1.") for key in keys):
        return "backbone"
    raise ConversionError("cannot tell the kind of checkpoint (neither torchvision FCOS keys "
                          f"backbone.body.* nor ResNet keys conv1.*/layer1.*): keys {_names(keys)}")


def _shape(params, name):
    """The shape of a parameter the architecture is read from; a clear error where it is absent."""
    if name not in params:
        raise ConversionError(f"the input lacks {name}, needed to tell the architecture")
    return params[name].shape


def _num_levels(params):
    """Pyramid levels of a converted FCOS: P3-P5 plus one per extra FPN conv (P6, P7)."""
    return 3 + sum(name.startswith("fpn.extra.") and name.endswith(".weight") for name in params)


def _our_module(module, kind):
    """A PyTorch module path -> ours, or None where no rule matches."""
    for pattern, replacement in _MODULE_RULES[kind]:
        if re.fullmatch(pattern, module):
            return re.sub(pattern, replacement, module)
    return None


def torchvision_to_mindspore(state, kind):
    """{PyTorch key: array} -> {our parameter name: array}.

    Norm layers are recognised by their 1-D 'weight' and get MindSpore's leaf names. For a
    torchvision FCOS the per-level scales (absent there, where the regression is unscaled) are
    1.0; the authors' (1,) scales become scalars. Raises ConversionError listing the keys no rule
    maps, or naming the deformable convolutions of a DCN model.
    """
    if kind not in KINDS:
        raise ConversionError(f"unknown kind '{kind}'; choose one of {list(KINDS)}")
    deformable = sorted(key for key in state if "offset" in key.rsplit(".", 2)[-2])
    if deformable:
        raise ConversionError(f"deformable convolutions (DCN) are not supported; the input has {len(deformable)} "
                              f"offset layers: {_names(deformable)}")
    params, unmapped = {}, []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in _DROPPED[kind]):
            continue
        module, _, leaf = key.rpartition(".")
        ours = _our_module(module, kind)
        if ours is None:
            unmapped.append(key)
            continue
        module_weight = state.get(f"{module}.weight")
        if module_weight is not None and module_weight.ndim == 1:
            leaf = _NORM_LEAVES.get(leaf, leaf)
        params[f"{ours}.{leaf}"] = value
    if unmapped:
        raise ConversionError(f"{len(unmapped)} {kind} keys have no MindSpore counterpart: {_names(unmapped)}")
    if kind == "fcos":
        for level in range(_num_levels(params)):
            params[f"head.scales.{level}.scale"] = np.array(1.0, np.float32)
    for name in [name for name in params if name.startswith("head.scales.")]:
        params[name] = np.asarray(params[name], np.float32).reshape(())
    return params


def infer_backbone(params):
    """Our backbone.* parameters -> the backbone name of ARCHITECTURES they were made with."""
    depths = tuple(len({name.split(".")[2] for name in params if name.startswith(f"backbone.layer{stage}.")})
                   for stage in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in params
    groups = 1
    if bottleneck:
        out_channels, in_per_group = _shape(params, "backbone.layer1.0.conv2.weight")[:2]
        groups = out_channels // in_per_group
    for name, (block, arch_depths, arch_groups, _) in ARCHITECTURES.items():
        if arch_depths == depths and (block.expansion == 4) == bottleneck and arch_groups == groups:
            return name
    raise ConversionError(f"the weights match no supported backbone (blocks per stage {list(depths)}, "
                          f"{'bottleneck' if bottleneck else 'basic'} blocks, groups {groups}); "
                          f"supported: {sorted(ARCHITECTURES)}")


def infer_fcos_kwargs(params):
    """Our parameters of a whole FCOS -> the FCOS(...) keyword arguments that have them."""
    fpn_out_channels = _shape(params, "fpn.lateral.0.weight")[0]
    num_levels = _num_levels(params)
    cls_tower = [name for name in params if name.startswith("head.cls_tower.")]
    return dict(
        backbone=infer_backbone(params),
        class_num=_shape(params, "head.cls_logits.weight")[0],
        fpn_out_channels=fpn_out_channels,
        # P6 reads P5 (fpn_out_channels wide) or C5; where both are as wide, P5 as torchvision.
        use_p5=num_levels == 3 or _shape(params, "fpn.extra.0.weight")[1] == fpn_out_channels,
        use_GN_head=any(name.endswith(".gamma") for name in cls_tower),
        num_head_convs=sum(name.endswith(".weight") for name in cls_tower),
        add_centerness="head.centerness.weight" in params,
        strides=DEFAULT_STRIDES[:num_levels],
    )


def expected_shapes(params, kind):
    """{name: shape} of the MindSpore network that the converted params are meant for."""
    if kind != "backbone":
        net = FCOS(**infer_fcos_kwargs(params))
        return {p.name: tuple(p.shape) for p in net.get_parameters()}
    net = ResNet(infer_backbone(params))
    return {f"backbone.{p.name}": tuple(p.shape) for p in net.get_parameters()}


def check_params(params, expected):
    """Raise ConversionError on missing, unexpected or wrongly shaped parameters."""
    missing = set(expected) - set(params)
    if missing:
        raise ConversionError(f"{len(missing)} parameters of the network are missing from the input: "
                              f"{_names(missing)}")
    unexpected = set(params) - set(expected)
    if unexpected:
        raise ConversionError(f"{len(unexpected)} converted parameters are not in the network: "
                              f"{_names(unexpected)}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ConversionError(f"shape mismatch for {name}: input {tuple(params[name].shape)}, "
                                  f"network {shape}")


def convert(input_path, output_path, kind=None):
    """Convert one file; returns (kind, architecture description, number of parameters)."""
    state = load_torchvision_state(input_path)
    kind = kind or detect_kind(state)
    params = torchvision_to_mindspore(state, kind)
    check_params(params, expected_shapes(params, kind))
    architecture = infer_fcos_kwargs(params) if kind != "backbone" else {"backbone": infer_backbone(params)}
    save_checkpoint_atomic([{"name": name, "data": ms.Tensor(value)} for name, value in params.items()], output_path)
    return kind, architecture, len(params)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a torchvision FCOS or ResNet checkpoint, or an FCOS "
                                                 "authors' model, to MindSpore.")
    parser.add_argument("--input", required=True, help="PyTorch state dict: .pth (needs torch) or .npz")
    parser.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help="fcos (torchvision detector), fcos_authors (the FCOS authors' detector) or "
                             "backbone (ImageNet ResNet); default: from the keys")
    args = parser.parse_args(argv)
    if not args.output.endswith(".ckpt"):  # MindSpore's load_checkpoint reads no other name
        print(f"convert: error: --output must end with .ckpt (MindSpore loads only those): {args.output}",
              file=sys.stderr)
        return 1
    try:
        kind, architecture, count = convert(args.input, args.output, args.kind)
    except ConversionError as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
    details = ", ".join(f"{key}={value}" for key, value in architecture.items())
    print(f"wrote {count} parameters ({kind}: {details}) to {args.output}")
    if kind == "fcos_authors":
        print("evaluate it with its configs/fcos_authors/*.yaml (stride placement, BatchNorm epsilon, input format "
              "and selection are not in the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
