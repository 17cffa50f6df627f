"""COCO evaluation of an exported FCOS's outputs (the 310 / MindIR-runner flow):
python postprocess.py --result_dir=RESULT --info_file=DATA/preprocess_info.json
                      --export_info=fcos.json --val_ann_file=... [--output_dir=...]

Reads every image's output bins (boxes, scores, labels; see src/deploy/contract.py), applies the
same selection as eval.py (src.inference.select.select_detections with the export's score threshold,
NMS IoU and detections per image, rescaled to the original image), maps labels to the
annotation file's category ids, prints the COCO table and writes <output_dir>/eval_result.json
with the same keys as eval.py.
"""
import json
import logging
from typing import List, Optional, Sequence

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
from src.data.coco import DatasetError, label_maps
from src.deploy.contract import export_candidates, read_export_info, read_infer_time, read_preprocess_info, read_result
from src.evaluation.coco_eval import check_category_count, coco_evaluate, load_coco, to_coco_results
from src.utils.logs import setup_logging
from src.inference.select import select_detections
from src.config import Config, ConfigError, Flag, guard_main, load_config, require_files

logger = logging.getLogger("fcos")

FLAGS = {"result_dir": Flag("", "Folder of the runner's output .bin files."),
         "info_file": Flag("", "preprocess.py's preprocess_info.json."),
         "export_info": Flag("", "export.py's .json: selection settings and output shapes.")}


def parse_args(argv: Optional[Sequence[str]]) -> Config:
    """-> Config with the flags; ConfigError when a file is missing."""
    cfg = load_config(argv, "Score the output .bin files of an exported FCOS with COCO metrics.", FLAGS)
    require_files(cfg, "result_dir", "info_file", "export_info", "val_ann_file")
    return cfg


def detect_from_results(result_dir: str, images: List[dict], num_candidates: int, selection: dict,
                        label_to_cat_id: Sequence[int]) -> List[dict]:
    """COCO results of every preprocessed image from its output bins.

    Args:
        images: preprocess_info.json 'images' entries (name, image_id, orig_hw, resized_hw).
        num_candidates: K, candidates per image in the bins.
        selection: select_detections keyword arguments.
    """
    results = []
    for entry in images:
        try:
            boxes, scores, labels = read_result(result_dir, entry["name"], num_candidates)
        except ValueError as err:
            raise ConfigError(f"--result_dir: {err}") from None
        boxes, scores, labels = select_detections(boxes, scores, labels, entry["resized_hw"], **selection,
                                                  original_size=entry["orig_hw"])
        results += to_coco_results(entry["image_id"], boxes, scores, labels, label_to_cat_id,
                                   selection.get("plus_one", False))
    return results


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv)
    setup_logging(cfg.output_dir, 0, "postprocess")
    try:
        export = read_export_info(cfg.export_info)
    except ValueError as err:
        raise ConfigError(f"--export_info: {err}") from None
    try:
        info = read_preprocess_info(cfg.info_file)
    except ValueError as err:
        raise ConfigError(f"--info_file: {err}") from None
    try:
        coco = load_coco(cfg.val_ann_file)
    except DatasetError as err:
        raise ConfigError(f"--val_ann_file: {err}") from None
    label_to_cat_id, _, _ = label_maps(coco.dataset["categories"])
    check_category_count(len(label_to_cat_id), export["model"]["class_num"], cfg.val_ann_file)
    unknown = [e["image_id"] for e in info["images"] if e["image_id"] not in coco.imgs]
    if unknown:
        raise ConfigError(f"--info_file: {len(unknown)} images (e.g. id {unknown[0]}) are not in {cfg.val_ann_file}")
    if info["num_skipped"]:
        logger.warning("%d images were skipped by preprocess.py and are not scored (see %s)",
                       info["num_skipped"], cfg.info_file)
    results = detect_from_results(cfg.result_dir, info["images"], export_candidates(export), export["postprocess"],
                                  label_to_cat_id)
    logger.info("%d detections on %d images, selection %s", len(results), len(info["images"]),
                export["postprocess"])
    metrics = coco_evaluate(coco, results, cfg.output_dir, image_ids=[e["image_id"] for e in info["images"]])
    try:
        timing = read_infer_time(cfg.result_dir)
    except ValueError as err:
        raise ConfigError(f"--result_dir: {err}") from None
    if timing:
        logger.info("inference time: %s", timing)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
