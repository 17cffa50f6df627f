"""The one place where configuration keys become objects: model, loss, decoder, datasets.

Deep modules take plain values; entry points call these builders with the parsed config.
"""
import contextlib
import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
import os

import mindspore as ms
import numpy as np

from src.data.coco import CocoDataset, DatasetError, load_image_rgb
from src.geometry import EvalGeometry, PadBucketError
from src.data.pipeline import EvalDataInfo, TrainDataInfo, create_eval_dataset, create_train_dataset, present_images
from src.data.synthetic_crowns import CrownStands
from src.data.transforms import PixelFormat, TrainTransform, preprocess_image
from src.engine.checkpoint import load_weights
from src.engine.compile_cache import PlannedGraph, precompile
from src.engine.lr_schedule import build_lr_schedule, scaled_lr
from src.engine.train_step import FCOSWithLoss, TrainStep, build_optimizer
from src.inference.decoder import FCOSDecoder
from src.inference.detector import FCOSInference
from src.inference.quantize import Calibration
from src.inference.runtime import MindSporeRuntime, OnnxRuntime, make_runtime
from src.inference.tta import VIEW_SETS, view_pad_shapes
from src.model.fcos import FCOS
from src.model.loss import FCOSLoss
from src.config import Config, ConfigError, require_files
from src.ops.backend import accelerate, enable_native_ops
from src.ops.build import OpsUnavailable
from src.ops.global_norm import NativeSquaredNorm


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """The constructors' own checks of keys that do not fit together (strides and limit_range,
    channels and GroupNorm groups, ...) -> ConfigError."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"model configuration: {err}") from None


def build_model(cfg: Config, portable: bool = False) -> FCOS:
    """FCOS network from the configuration; where conv_impl selects the custom ops (src/ops/backend.py)
    its convolutions, GroupNorms, trained BatchNorms (each with the ReLU after it), stem max-pool
    and FPN merge run on them, with the activations between them in channels-last storage unless
    channels_last is off (src/ops/backend.py accelerate). portable: MindSpore's own kernels whatever conv_impl says, for
    exports that must run anywhere. The parameters are the same either way."""
    with model_errors():
        network = FCOS(backbone=cfg.backbone, class_num=cfg.class_num, fpn_out_channels=cfg.fpn_out_channels,
                    use_p5=cfg.use_p5, use_GN_head=cfg.use_GN_head, num_head_convs=cfg.num_head_convs,
                    prior=cfg.prior, add_centerness=cfg.add_centerness, cnt_on_reg=cfg.cnt_on_reg,
                    norm_reg_targets=cfg.norm_reg_targets, freeze_bn=cfg.freeze_bn,
                    freeze_stage_1=cfg.freeze_stage_1, strides=cfg.strides, point_offset=cfg.point_offset,
                    point_strides=cfg.point_strides, backbone_norm=cfg.backbone_norm,
                    stride_in_1x1=cfg.stride_in_1x1, frozen_bn_eps=cfg.frozen_bn_eps)
    if not portable and native_ops(cfg):
        accelerate(network, channels_last=cfg.channels_last)
    return network


def native_ops(cfg: Config) -> bool:
    """Whether this run's convolutions and norms run on the CPU native ops (conv_impl resolved,
    the library built and oneDNN's ISA cap lifted when so: src/ops/backend.py); ConfigError when
    onednn was asked for and cannot be had."""
    try:
        return enable_native_ops(cfg.conv_impl, cfg.device_target, cfg.amp_level)
    except OpsUnavailable as err:
        raise ConfigError(f"--conv_impl=onednn: {err}") from None


def load_network(cfg: Config, portable: bool = False) -> FCOS:
    """FCOS in inference mode with every parameter loaded from --ckpt_file (one-line ConfigError
    otherwise): what eval, export and predict run. portable (see build_model) for export, and for
    --runtime=onnxruntime, which exports it too."""
    require_files(cfg, "ckpt_file")
    network = build_model(cfg, portable or cfg.runtime != "mindspore")
    try:
        load_weights(network, cfg.ckpt_file, strict_prefixes=("",))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--ckpt_file: {err}") from None
    network.set_train(False)
    return network


def build_loss(cfg: Config, network: FCOS, distributed: bool = False) -> FCOSLoss:
    """FCOSLoss on the network's points and box coding."""
    with model_errors():
        return FCOSLoss(network.point_coder, limit_range=cfg.limit_range,
                        center_sampling_radius=cfg.center_sampling_radius, focal_alpha=cfg.focal_alpha,
                        focal_gamma=cfg.focal_gamma, reg_loss=cfg.reg_loss,
                        centerness_weighted_reg=cfg.centerness_weighted_reg, add_centerness=cfg.add_centerness,
                        distributed=distributed)


def build_inference(cfg: Config, network: FCOS) -> FCOSInference:
    """FCOSInference: the network and its decoder (the network's points and box coding)."""
    class_threshold = cfg.score_threshold if cfg.threshold_on == "class_probability" else None
    decoder = FCOSDecoder(network.point_coder, add_centerness=cfg.add_centerness,
                          max_detection_boxes_num=cfg.max_detection_boxes_num, class_threshold=class_threshold)
    return FCOSInference(network, decoder)


def eval_geometry(cfg: Config) -> EvalGeometry:
    """The EvalGeometry of evaluation and inference (src.geometry); ConfigError for unusable pad_buckets."""
    try:
        return EvalGeometry.from_config(cfg)
    except PadBucketError as err:
        raise ConfigError(f"--pad_buckets: {err}") from None


def pixel_format(cfg: Config) -> PixelFormat:
    """The network's PixelFormat (channel_order, pixel_mean, pixel_std); ConfigError when malformed."""
    try:
        return PixelFormat.from_config(cfg)
    except ValueError as err:
        raise ConfigError(f"--pixel_mean/--pixel_std: {err}") from None


def selection_kwargs(cfg: Config) -> dict:
    """Keyword arguments of the NumPy detection selection (threshold, NMS, max detections, box
    convention). With threshold_on class_probability the decoder applied the threshold (its
    rejects score -1), so the selection keeps every score above 0."""
    threshold = cfg.score_threshold if cfg.threshold_on == "score" else 0.0
    return {"score_threshold": threshold, "nms_iou_threshold": cfg.nms_iou_threshold,
            "detections_per_img": cfg.detections_per_img, "plus_one": cfg.box_plus_one}


def tta_views(cfg: Config) -> tuple:
    """The test-time views of --tta (src.inference.tta)."""
    return VIEW_SETS[cfg.tta]


@contextlib.contextmanager
def dataset_errors(ann_key: str) -> Iterator[None]:
    """Turn the errors of an unusable dataset into a ConfigError naming the key to fix: ann_key
    for the data (the message names the file), --pad_buckets for images that fit no pad shape."""
    try:
        yield
    except PadBucketError as err:
        raise ConfigError(f"--pad_buckets: {err}") from None
    except DatasetError as err:
        raise ConfigError(f"--{ann_key}: {err}") from None


def train_transform(cfg: Config) -> TrainTransform:
    """The TrainTransform (augmentation) of the configuration's training keys."""
    return TrainTransform(
        cfg.min_size, cfg.max_size, flip_prob=cfg.flip_prob, vflip_prob=cfg.vflip_prob, rot90_prob=cfg.rot90_prob,
        color_jitter=cfg.color_jitter, hue_jitter=cfg.hue_jitter, invert_lightness_prob=cfg.invert_lightness_prob,
        random_conv_prob=cfg.random_conv_prob, crop_prob=cfg.crop_prob,
        crop_min_scale=cfg.crop_min_scale, rotate_degrees=cfg.rotate_degrees, window=cfg.train_window,
        window_scale=cfg.window_scale, resize_rule=cfg.resize_rule, pixels=pixel_format(cfg))


def crown_stands(cfg: Config, transform: TrainTransform) -> Optional[CrownStands]:
    """The procedural tree-crown stands of --synthetic_crowns (the pipeline's generated-samples
    plug-in), big enough for the widest zoom of the training windows; None when off."""
    if not cfg.synthetic_crowns:
        return None
    if not cfg.train_window or cfg.class_num != 1:
        raise ConfigError(f"--synthetic_crowns={cfg.synthetic_crowns}: procedural tree-crown stands need "
                          f"window mode (train_window > 0, now {cfg.train_window}) and one class "
                          f"(class_num 1, now {cfg.class_num})")
    return CrownStands(cfg.synthetic_crowns, math.ceil(transform.window / min(transform.window_scale)))


def build_train_dataset(cfg: Config, rank: int = 0, group_size: int = 1,
                        start_epoch: int = 0) -> Tuple[Any, TrainDataInfo]:
    """create_train_dataset from the configuration; ConfigError for an unusable dataset."""
    transform = train_transform(cfg)
    generated = crown_stands(cfg, transform)
    with dataset_errors("train_ann_file"):
        return create_train_dataset(
            cfg.train_img_dir, cfg.train_ann_file, transform, batch_size=cfg.batch_size,
            pad_buckets=cfg.pad_buckets, max_gt_boxes=cfg.max_gt_boxes,
            skip_empty_images=cfg.skip_empty_images, num_parallel_workers=cfg.num_parallel_workers,
            rank=rank, group_size=group_size, seed=cfg.seed, size_divisor=cfg.size_divisor,
            start_epoch=start_epoch, generated=generated)


def build_eval_dataset(cfg: Config, batch_size: int = 1, rank: int = 0,
                       group_size: int = 1) -> Tuple[Any, EvalDataInfo]:
    """create_eval_dataset from the configuration; ConfigError for an unusable dataset."""
    geometry = eval_geometry(cfg)
    with dataset_errors("val_ann_file"):
        return create_eval_dataset(cfg.val_img_dir, cfg.val_ann_file, batch_size=batch_size, geometry=geometry,
                                   num_parallel_workers=cfg.num_parallel_workers, rank=rank, group_size=group_size,
                                   pixels=pixel_format(cfg))


def build_train_step(cfg: Config, network: FCOS, steps_per_epoch: int,
                     group_size: int) -> Tuple[TrainStep, np.ndarray]:
    """-> (TrainStep in training mode, per-step lr schedule): the optimiser with the lr scaled to
    the global batch, mixed precision (amp_level) with a dynamic loss scale, the loss, gradient
    clipping and reduction across group_size devices. Used by train.py and the benchmark."""
    global_batch = cfg.batch_size * group_size
    lr = scaled_lr(cfg.base_lr, cfg.lr_base_batch, global_batch)
    schedule = build_lr_schedule(lr, steps_per_epoch, cfg.epochs, cfg.lr_schedule, cfg.lr_steps, cfg.lr_gamma,
                                 cfg.warmup_iters, cfg.warmup_ratio)
    optimizer = build_optimizer(network.trainable_params(), schedule, cfg.momentum, cfg.weight_decay,
                                cfg.weight_decay_norm_bias)
    loss = build_loss(cfg, network, distributed=group_size > 1)
    scaler = None
    if cfg.amp_level != "O0":
        network = network.mixed_precision(cfg.amp_level)
        scaler = ms.amp.DynamicLossScaler(2.0 ** 16, 2, 1000)
    net_with_loss = FCOSWithLoss(network, loss)
    squared_norm = NativeSquaredNorm() if native_ops(cfg) else None  # the custom ops are in
    step = TrainStep(net_with_loss, optimizer, cfg.grad_clip_norm, distributed=group_size > 1, loss_scaler=scaler,
                     squared_norm=squared_norm)
    step.set_train(True)
    logging.getLogger("fcos").info("global batch %d, peak lr %.5f, %d steps", global_batch, lr, len(schedule))
    return step, schedule


def train_graphs(cfg: Config, train_step: ms.nn.Cell, pad_shapes: Iterable[Sequence[int]]) -> List[PlannedGraph]:
    """The training-step graphs of a run: one per (H, W) pad shape, inputs as the training
    dataset gives them (images, gt_boxes, gt_labels, gt_mask)."""
    b, m = cfg.batch_size, cfg.max_gt_boxes
    return [PlannedGraph(train_step, [((b, 3, h, w), np.float32), ((b, m, 4), np.float32), ((b, m), np.int32),
                                      ((b, m), np.bool_)], training=True) for h, w in pad_shapes]


def eval_graphs(infer_cell: ms.nn.Cell, pad_shapes: Iterable[Sequence[int]], batch_size: int,
                views: Iterable[Tuple[int, bool]]) -> List[PlannedGraph]:
    """The inference graphs of an evaluation: one per (H, W) input of its batches' ``views``
    (src.inference.tta) at their pad shapes."""
    return [PlannedGraph(infer_cell, [((batch_size, 3, h, w), np.float32)], training=False)
            for h, w in view_pad_shapes(pad_shapes, views)]


def precompile_graphs(cfg: Config, graphs: Sequence[PlannedGraph], distributed: bool = False) -> str:
    """precompile with the configured cache folder (<output_dir>/compile_cache; none for
    --compile_cache=False or data-parallel runs)."""
    use_cache = cfg.compile_cache and not distributed
    return precompile(graphs, cfg, os.path.join(cfg.output_dir, "compile_cache") if use_cache else None)


def calibration_set(cfg: Config) -> Calibration:
    """The calibration of --runtime=onnxruntime_int8: --calibration_images images evenly spaced over
    the training set (the validation set where no training set is given), preprocessed as
    evaluation preprocesses them."""
    img_dir, ann_file, key = cfg.train_img_dir, cfg.train_ann_file, "train_ann_file"
    if not ann_file:
        img_dir, ann_file, key = cfg.val_img_dir, cfg.val_ann_file, "val_ann_file"
    if not ann_file:
        raise ConfigError("--runtime=onnxruntime_int8: calibration needs images; give --train_ann_file and "
                          "--train_img_dir (or the validation set's)")
    with dataset_errors(key):
        coco = CocoDataset(img_dir, ann_file)
        ids = present_images(coco, coco.image_ids, "calibration")
    if not ids:
        raise ConfigError(f"--{key}: none of the images of {ann_file} is in {img_dir}")
    picks = sorted({ids[int(round(i))] for i in np.linspace(0, len(ids) - 1, min(cfg.calibration_images, len(ids)))})
    paths = [coco.image_path(i) for i in picks]
    geometry, pixels = eval_geometry(cfg), pixel_format(cfg)
    images = [(os.path.abspath(p), os.path.getsize(p), int(os.path.getmtime(p))) for p in paths]
    identity = json.dumps({"images": images, "geometry": dataclasses.asdict(geometry), "pixels": pixels.as_dict()})

    def batches(shape: Sequence[int]) -> Iterator[np.ndarray]:
        batch = []
        for path in paths:
            batch.append(preprocess_image(load_image_rgb(path), geometry, tuple(shape[2:]), pixels)[0])
            if len(batch) == shape[0]:
                yield np.stack(batch)
                batch = []
        if batch:  # the last batch filled up with its first image
            yield np.stack(batch + batch[:1] * (shape[0] - len(batch)))

    return Calibration(identity, batches)


def int8_cache_dir(cfg: Config) -> str:
    """Where the calibrated 8-bit models live: <checkpoint name>_int8/ beside --ckpt_file, or
    <output_dir>/int8_models where that folder is not writable."""
    beside = os.path.splitext(os.path.abspath(cfg.ckpt_file))[0] + "_int8"
    if os.access(os.path.dirname(beside), os.W_OK):
        return beside
    return os.path.join(cfg.output_dir, "int8_models")


def build_runtime(cfg: Config, infer_cell: ms.nn.Cell, pad_shapes: Iterable[Sequence[int]] = (),
                  batch_size: int = 1) -> Union[MindSporeRuntime, OnnxRuntime]:
    """--runtime: what runs infer_cell in eval.py and predict.py (src.inference.runtime), with the
    inputs (batch_size, 3, H, W) of pad_shapes made ready: compiled (or loaded from the compile
    cache) in MindSpore, exported (and for onnxruntime_int8 calibrated, or loaded from its cache)
    and loaded in onnxruntime. Other shapes get ready on first use."""
    int8 = cfg.runtime == "onnxruntime_int8"
    try:
        runtime = make_runtime(cfg.runtime, infer_cell, calibration=calibration_set(cfg) if int8 else None,
                               cache_dir=int8_cache_dir(cfg) if int8 else None)
    except ImportError as err:
        raise ConfigError(f"--runtime: {err}") from None
    if cfg.runtime == "mindspore":
        precompile_graphs(cfg, eval_graphs(infer_cell, pad_shapes, batch_size, tta_views(cfg)))
    else:
        for h, w in view_pad_shapes(pad_shapes, tta_views(cfg)):
            runtime.prepare((batch_size, 3, h, w))
    return runtime
