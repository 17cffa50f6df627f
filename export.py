"""Export FCOS (network + in-graph decoding, FCOSInference) at a fixed input shape:
python export.py --ckpt_file=... [--file_name=fcos] [--file_format=MINDIR|AIR|ONNX]
                 [--export_height=800] [--export_width=1344] [--export_batch_size=1]

Writes <file_name>.mindir/.air/.onnx and <file_name>.json: the input and output shapes and the
preprocessing and post-processing settings, which preprocess.py and postprocess.py read so that
the exported model is fed and decoded exactly as it was configured. The graph takes images
(B, 3, H, W) float32 (preprocess_image's output) and returns candidates boxes (B, K, 4) float32,
scores (B, K) float32 and labels (B, K) int32; threshold, clipping and NMS stay in NumPy
(src.postprocess.select_detections).
"""
import logging
import os
import time

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import numpy as np
from mindspore import Tensor

from src.box_coder import level_sizes
from src.builder import build_decoder, load_network, selection_kwargs
from src.detector import FCOSInference, export_model
from src.engine.coco_eval import write_json_atomic
from src.engine.context import init_context, setup_logging
from src.infer_mindir import check_export_shape
from src.model_utils.config import ConfigError, guard_main, load_config, require_files

logger = logging.getLogger("fcos")

EXTENSIONS = {"MINDIR": ".mindir", "AIR": ".air", "ONNX": ".onnx"}


def output_base(file_name, file_format):
    """--file_name without a trailing extension of the chosen format."""
    ext = EXTENSIONS[file_format]
    return file_name[:-len(ext)] if file_name.lower().endswith(ext) else file_name


def num_candidates(cfg):
    """K of FCOSDecoder at the export shape: per level min(max_detection_boxes_num, H_l*W_l*C)."""
    sizes = level_sizes(cfg.export_height, cfg.export_width, cfg.strides)
    return sum(min(cfg.max_detection_boxes_num, h * w * cfg.class_num) for h, w in sizes)


def export_info(cfg, model_file):
    """Contents of <file_name>.json: what preprocess.py and postprocess.py need to know."""
    batch, k = cfg.export_batch_size, num_candidates(cfg)
    return {
        "model_file": os.path.basename(model_file),
        "file_format": cfg.file_format,
        "ckpt_file": os.path.abspath(cfg.ckpt_file),
        "input": {"name": "images", "shape": [batch, 3, cfg.export_height, cfg.export_width],
                  "dtype": "float32"},
        "outputs": [{"name": "boxes", "shape": [batch, k, 4], "dtype": "float32"},
                    {"name": "scores", "shape": [batch, k], "dtype": "float32"},
                    {"name": "labels", "shape": [batch, k], "dtype": "int32"}],
        "preprocess": {"min_size": cfg.min_size[0], "max_size": cfg.max_size,
                       "height": cfg.export_height, "width": cfg.export_width},
        "postprocess": selection_kwargs(cfg),
        "model": {"backbone": cfg.backbone, "class_num": cfg.class_num, "strides": cfg.strides,
                  "max_detection_boxes_num": cfg.max_detection_boxes_num},
    }


@guard_main
def main(argv=None):
    cfg = load_config(argv, description="Export FCOS to MINDIR, AIR or ONNX at a fixed input shape.")
    require_files(cfg, "ckpt_file")
    try:
        check_export_shape(cfg.export_height, cfg.export_width, cfg.export_batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.file_format == "AIR" and cfg.device_target != "Ascend":
        raise ConfigError(f"--file_format=AIR: AIR export needs --device_target=Ascend (got {cfg.device_target}); "
                          f"use MINDIR or ONNX here")
    init_context(cfg.device_target, cfg.mode, cfg.device_id, distributed=False)
    setup_logging()
    infer_cell = FCOSInference(load_network(cfg), build_decoder(cfg))
    infer_cell.set_train(False)
    base = output_base(cfg.file_name, cfg.file_format)
    path = base + EXTENSIONS[cfg.file_format]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    inputs = Tensor(np.zeros((cfg.export_batch_size, 3, cfg.export_height, cfg.export_width), np.float32))
    start = time.perf_counter()
    export_model(infer_cell, inputs, path, cfg.file_format)
    logger.info("exported %s (%.1f MB) in %.1f s", path, os.path.getsize(path) / 2 ** 20,
                time.perf_counter() - start)
    write_json_atomic(base + ".json", export_info(cfg, path))
    logger.info("wrote %s", base + ".json")


if __name__ == "__main__":
    main()
