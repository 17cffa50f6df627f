"""COCO bbox evaluation of a checkpoint:
python eval.py --ckpt_file=... --val_img_dir=... --val_ann_file=... [--output_dir=...]
               [--runtime=onnxruntime]

Prints the standard 12-line COCO table and writes <output_dir>/eval_result.json with the stats
(AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and the detections in COCO
results format.
"""
import json
import logging
from typing import Optional, Sequence

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
from src.builder import (build_eval_dataset, build_inference, build_runtime, load_network, selection_kwargs,
                         tta_views)
from src.evaluation.coco_eval import check_category_count
from src.utils.context import init_context
from src.utils.logs import setup_logging
from src.evaluation.evaluate import evaluate
from src.config import ConfigError, guard_main, load_config, require_files

logger = logging.getLogger("fcos")


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = load_config(argv, description="Evaluate FCOS with COCO metrics.")
    require_files(cfg, "ckpt_file", "val_img_dir", "val_ann_file")
    init_context(cfg.device_target, cfg.mode, cfg.device_id, distributed=False)
    setup_logging(cfg.output_dir, 0, "eval")
    dataset, info = build_eval_dataset(cfg, batch_size=cfg.batch_size)
    check_category_count(len(info.label_to_cat_id), cfg.class_num, cfg.val_ann_file)
    logger.info("evaluating %s on %d images in %s%s%s", cfg.ckpt_file, info.num_images, cfg.runtime,
                f" ({cfg.mode} mode)" if cfg.runtime == "mindspore" else "",
                "" if cfg.tta == "none" else f", {len(tta_views(cfg))} views each (--tta={cfg.tta})")
    runtime = build_runtime(cfg, build_inference(cfg, load_network(cfg)), info.pad_shapes, cfg.batch_size)
    metrics = evaluate(runtime, dataset, info, cfg.val_ann_file, selection_kwargs(cfg), cfg.output_dir,
                       batch_size=cfg.batch_size, views=tta_views(cfg))
    if metrics is None:
        raise ConfigError(f"--val_img_dir: none of the images of {cfg.val_ann_file} could be read")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
