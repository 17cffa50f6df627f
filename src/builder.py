"""The one place where configuration keys become objects: model, loss, decoder, datasets.

Deep modules take plain values; entry points call these builders with the parsed config.
"""
import contextlib

from src.data.coco import DatasetError
from src.data.pipeline import PadBucketError, create_eval_dataset, create_train_dataset
from src.losses import FCOSLoss
from src.model.fcos import FCOS
from src.model_utils.config import ConfigError
from src.postprocess import FCOSDecoder


@contextlib.contextmanager
def model_errors():
    """The constructors' own checks of keys that do not fit together (strides and limit_range,
    channels and GroupNorm groups, ...) -> ConfigError."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"model configuration: {err}") from None


def build_model(cfg):
    """FCOS network from the configuration."""
    with model_errors():
        return FCOS(backbone=cfg.backbone, class_num=cfg.class_num, fpn_out_channels=cfg.fpn_out_channels,
                    use_p5=cfg.use_p5, use_GN_head=cfg.use_GN_head, num_head_convs=cfg.num_head_convs,
                    prior=cfg.prior, add_centerness=cfg.add_centerness, cnt_on_reg=cfg.cnt_on_reg,
                    norm_reg_targets=cfg.norm_reg_targets, freeze_bn=cfg.freeze_bn,
                    freeze_stage_1=cfg.freeze_stage_1, strides=cfg.strides)


def build_loss(cfg, distributed=False):
    with model_errors():
        return FCOSLoss(strides=cfg.strides, limit_range=cfg.limit_range, point_offset=cfg.point_offset,
                        center_sampling_radius=cfg.center_sampling_radius, norm_reg_targets=cfg.norm_reg_targets,
                        focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma, reg_loss=cfg.reg_loss,
                        centerness_weighted_reg=cfg.centerness_weighted_reg, add_centerness=cfg.add_centerness,
                        distributed=distributed)


def build_decoder(cfg):
    return FCOSDecoder(strides=cfg.strides, point_offset=cfg.point_offset, norm_reg_targets=cfg.norm_reg_targets,
                       add_centerness=cfg.add_centerness, max_detection_boxes_num=cfg.max_detection_boxes_num)


def selection_kwargs(cfg):
    """Keyword arguments of the NumPy detection selection (threshold, NMS, max detections)."""
    return {"score_threshold": cfg.score_threshold, "nms_iou_threshold": cfg.nms_iou_threshold,
            "detections_per_img": cfg.detections_per_img}


@contextlib.contextmanager
def dataset_errors(ann_key):
    """Turn the errors of an unusable dataset into a ConfigError naming the key to fix: ann_key
    for the data (the message names the file), --pad_buckets for images that fit no pad shape."""
    try:
        yield
    except PadBucketError as err:
        raise ConfigError(f"--pad_buckets: {err}") from None
    except DatasetError as err:
        raise ConfigError(f"--{ann_key}: {err}") from None


def build_train_dataset(cfg, rank=0, group_size=1, start_epoch=0):
    """create_train_dataset from the configuration; ConfigError for an unusable dataset."""
    with dataset_errors("train_ann_file"):
        return create_train_dataset(
            cfg.train_img_dir, cfg.train_ann_file, batch_size=cfg.batch_size, min_size=cfg.min_size,
            max_size=cfg.max_size, pad_buckets=cfg.pad_buckets, max_gt_boxes=cfg.max_gt_boxes,
            flip_prob=cfg.flip_prob, color_jitter=cfg.color_jitter, crop_prob=cfg.crop_prob,
            crop_min_scale=cfg.crop_min_scale, rotate_degrees=cfg.rotate_degrees,
            skip_empty_images=cfg.skip_empty_images, num_parallel_workers=cfg.num_parallel_workers,
            rank=rank, group_size=group_size, seed=cfg.seed, size_divisor=cfg.size_divisor,
            start_epoch=start_epoch)


def build_eval_dataset(cfg, batch_size=1, rank=0, group_size=1):
    """create_eval_dataset from the configuration; ConfigError for an unusable dataset."""
    with dataset_errors("val_ann_file"):
        return create_eval_dataset(
            cfg.val_img_dir, cfg.val_ann_file, batch_size=batch_size, min_size=cfg.min_size,
            max_size=cfg.max_size, pad_buckets=cfg.pad_buckets, num_parallel_workers=cfg.num_parallel_workers,
            rank=rank, group_size=group_size, size_divisor=cfg.size_divisor)
