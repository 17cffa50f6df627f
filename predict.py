"""Detect objects in images with a checkpoint and draw them:
python predict.py --ckpt_file=... --input IMAGE_OR_FOLDER [MORE ...] [--output_dir=./output]
                  [--class_names=a,b,c | --val_ann_file=ANN.json] [--draw_score_threshold=0.3]
                  [--runtime=onnxruntime]

For every image: <output_dir>/<name>_pred.png with the boxes, class names and scores drawn (those
scoring at least --draw_score_threshold), and all detections (score > --score_threshold) in
<output_dir>/predictions.json, in original image pixels. Images go through the same steps as in
eval.py: preprocess_image at the evaluation size and pad shape, FCOSInference (in MindSpore or, with
--runtime=onnxruntime, in onnxruntime), select_detections, rescale_boxes. Class names come from
--class_names, else from the categories of --val_ann_file (which also adds category ids to
predictions.json), else labels are shown as numbers. Unreadable
images are skipped, counted and named.
"""
import logging
import os
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import numpy as np
from src.builder import (build_inference, build_runtime, eval_geometry, load_network, pixel_format, selection_kwargs,
                         tta_views)
from src.data.coco import DatasetError, label_maps, load_image_rgb, read_coco_json
from src.utils.context import init_context
from src.utils.logs import setup_logging
from src.inference.predictor import Predictor
from src.config import Config, ConfigError, Flag, guard_main, load_config
from src.utils.io import write_json_atomic
from src.utils.visualize import draw_detections, save_image

logger = logging.getLogger("fcos")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FLAGS = {"input": Flag([], "Image files and/or folders of images.", many=True, required=True),
         "class_names": Flag("", "Class names a,b,c to draw (else the categories of val_ann_file, else numbers)."),
         "draw_score_threshold": Flag(0.3, "Detections at or above this score are drawn (all are listed).")}


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[List[str], Optional[List[str]], float, Config]:
    """-> (input paths, class names or None, draw threshold, Config)."""
    cfg = load_config(argv, "Detect objects in images and draw them.", FLAGS)
    names = [n.strip() for n in cfg.class_names.split(",")] if cfg.class_names else None
    return cfg.input, names, cfg.draw_score_threshold, cfg


def expand_inputs(paths: Iterable[str]) -> List[str]:
    """Image files named, plus the image files (by extension, sorted) of folders named."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ConfigError(f"--input: no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ConfigError(f"--input: no such file or folder: {path}")
    return files


def class_info(cfg: Config, names: Optional[List[str]]) -> Tuple[Optional[List[str]], Optional[List[int]]]:
    """-> (class names or None, label_to_cat_id or None): names from --class_names, else from the
    categories of --val_ann_file, which also gives the category ids."""
    label_to_cat_id = None
    if cfg.val_ann_file:
        try:
            label_to_cat_id, _, ann_names = label_maps(read_coco_json(cfg.val_ann_file)["categories"])
        except DatasetError as err:
            raise ConfigError(f"--val_ann_file: {err}") from None
        names = ann_names if names is None else names
    if names is not None and len(names) != cfg.class_num:
        logger.warning("%d class names for --class_num=%d", len(names), cfg.class_num)
    return names, label_to_cat_id


def unique_output(output_dir: str, path: str, used: Set[str]) -> str:
    """<output_dir>/<stem>_pred.png, with a counter when two inputs share a stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, count = f"{stem}_pred", 1
    while name in used:
        name, count = f"{stem}_pred_{count}", count + 1
    used.add(name)
    return os.path.join(output_dir, f"{name}.png")


def detection_records(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: Optional[Sequence[str]],
                      label_to_cat_id: Optional[Sequence[int]]) -> List[dict]:
    """Detections -> JSON-ready dicts (bbox x1, y1, x2, y2 in original pixels)."""
    records = []
    for box, score, label in zip(boxes, scores, labels):
        record = {"bbox": [round(float(v), 2) for v in box], "score": round(float(score), 5), "label": int(label)}
        if names is not None and label < len(names):
            record["class_name"] = names[label]
        if label_to_cat_id is not None and label < len(label_to_cat_id):
            record["category_id"] = label_to_cat_id[label]
        records.append(record)
    return records


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    inputs, names, draw_threshold, cfg = parse_args(argv)
    files = expand_inputs(inputs)
    init_context(cfg.device_target, cfg.mode, cfg.device_id, distributed=False)
    setup_logging(cfg.output_dir, 0, "predict")
    names, label_to_cat_id = class_info(cfg, names)
    runtime = build_runtime(cfg, build_inference(cfg, load_network(cfg)))
    predictor = Predictor(runtime, eval_geometry(cfg), selection_kwargs(cfg), tta_views(cfg), pixel_format(cfg))
    images, skipped, used = [], [], set()
    for path in files:
        try:
            image = load_image_rgb(path)
            pad_hw = predictor.pad_shape(image.shape[:2])
        except ValueError as err:  # DatasetError (unreadable file) or no pad bucket fits
            logger.warning("skipping %s: %s", path, err)
            skipped.append({"file": path, "reason": str(err)})
            continue
        boxes, scores, labels = predictor(image, pad_hw)
        shown = scores >= draw_threshold
        out_path = unique_output(cfg.output_dir, path, used)
        save_image(out_path, draw_detections(image, boxes[shown], scores[shown], labels[shown], names))
        images.append({"file": path, "output": out_path, "height": image.shape[0], "width": image.shape[1],
                       "detections": detection_records(boxes, scores, labels, names, label_to_cat_id)})
        logger.info("%s: %d detections, %d drawn (score >= %.2f) -> %s", path, len(scores), int(shown.sum()),
                    draw_threshold, out_path)
    write_json_atomic(os.path.join(cfg.output_dir, "predictions.json"),
                      {"images": images, "skipped": skipped, "selection": selection_kwargs(cfg), "tta": cfg.tta,
                       "draw_score_threshold": draw_threshold})
    logger.info("%d images predicted, %d skipped; wrote %s", len(images), len(skipped),
                os.path.join(cfg.output_dir, "predictions.json"))
    if not images:
        raise ConfigError(f"--input: none of the {len(files)} images could be read")


if __name__ == "__main__":
    main()
