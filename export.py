"""Export FCOS (network + in-graph decoding, FCOSInference) at a fixed input shape:
python export.py --ckpt_file=... [--file_name=fcos] [--file_format=MINDIR|AIR|ONNX]
                 [--export_height=800] [--export_width=1344] [--export_batch_size=1]

Writes <file_name>.mindir/.air/.onnx and <file_name>.json: the input and output shapes and the
preprocessing and post-processing settings, which preprocess.py and postprocess.py read so that
the exported model is fed and decoded exactly as it was configured. The graph takes images
(B, 3, H, W) float32 (preprocess_image's output) and returns candidates boxes (B, K, 4) float32,
scores (B, K) float32 and labels (B, K) int32; threshold, clipping and NMS stay in NumPy
(src.inference.select.select_detections). The json's format: src/deploy/contract.py.
"""
import logging
import os
import time
from typing import Optional, Sequence

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import numpy as np
from mindspore import Tensor

from src.builder import build_inference, eval_geometry, load_network, pixel_format, selection_kwargs
from src.deploy.contract import check_export_shape, export_info, write_export_info
from src.inference.detector import FCOSInference
from src.inference.export import EXTENSIONS, export_model
from src.utils.context import init_context
from src.utils.logs import setup_logging
from src.config import Config, ConfigError, guard_main, load_config, require_files

logger = logging.getLogger("fcos")


def output_base(file_name: str, file_format: str) -> str:
    """--file_name without a trailing extension of the chosen format."""
    ext = EXTENSIONS[file_format]
    return file_name[:-len(ext)] if file_name.lower().endswith(ext) else file_name


def model_export_info(cfg: Config, infer_cell: FCOSInference, model_file: str) -> dict:
    """The export info (src/deploy/contract.py) of this configuration's export."""
    shape = (cfg.export_batch_size, 3, cfg.export_height, cfg.export_width)
    k = infer_cell.decoder.num_candidates(cfg.export_height, cfg.export_width, cfg.class_num)
    geometry = eval_geometry(cfg)
    preprocess = {"min_size": geometry.min_size, "max_size": geometry.max_size, "height": cfg.export_height,
                  "width": cfg.export_width, "resize_rule": geometry.resize_rule,
                  **pixel_format(cfg).as_dict()}
    model = {"backbone": cfg.backbone, "class_num": cfg.class_num, "strides": cfg.strides,
             "point_strides": cfg.point_strides, "max_detection_boxes_num": cfg.max_detection_boxes_num}
    return export_info(model_file, cfg.file_format, cfg.ckpt_file, shape, k, preprocess, selection_kwargs(cfg),
                       model)


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
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
    infer_cell = build_inference(cfg, load_network(cfg, portable=True))
    infer_cell.set_train(False)
    base = output_base(cfg.file_name, cfg.file_format)
    path = base + EXTENSIONS[cfg.file_format]
    inputs = Tensor(np.zeros((cfg.export_batch_size, 3, cfg.export_height, cfg.export_width), np.float32))
    start = time.perf_counter()
    export_model(infer_cell, inputs, path, cfg.file_format)
    logger.info("exported %s (%.1f MB) in %.1f s", path, os.path.getsize(path) / 2 ** 20,
                time.perf_counter() - start)
    write_export_info(base + ".json", model_export_info(cfg, infer_cell, path))
    logger.info("wrote %s", base + ".json")


if __name__ == "__main__":
    main()
