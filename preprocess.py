"""Preprocess a COCO-format validation set for an exported FCOS:
python preprocess.py --val_img_dir=... --val_ann_file=... --output_dir=DATA
                     (--export_info=fcos.json | [--export_height=800 --export_width=1344 --min_size=[800] --max_size=1333])

Writes DATA/images/<name>.bin, one float32 (3, H, W) input per image at the export shape
(preprocess_image: keep-ratio resize, normalise, zero-pad; an image whose keep-ratio size does not
fit the export shape, e.g. a portrait image and a landscape export, is shrunk further to fit, and
counted), and DATA/preprocess_info.json with, per image, its bin name, image id, file and original
and resized (h, w). --export_info (export.py's <file_name>.json) takes the shape and resize
settings from the export so that they cannot disagree with it. Missing or unreadable images are
skipped, counted and named.
"""
import glob
import logging
import os
from typing import Optional, Sequence, Tuple

from src.data.coco import CocoDataset, DatasetError
from src.geometry import EvalGeometry, PadBucketError
from src.data.transforms import PixelFormat, preprocess_image
from src.deploy.contract import (IMAGES_DIR, bin_names, check_export_shape, read_export_info, write_input_bin,
                                 remove_preprocess_info, write_preprocess_info)
from src.utils.logs import setup_logging
from src.config import Config, ConfigError, Flag, guard_main, load_config, require_files

logger = logging.getLogger("fcos")

FLAGS = {"export_info": Flag("", "export.py's .json: sets the export shape, min_size and max_size "
                                 "(else export_height/export_width and the configuration's sizes).")}


def resize_settings(cfg: Config, export_info_path: str) -> Tuple[EvalGeometry, PixelFormat, Tuple[int, int]]:
    """-> (EvalGeometry, PixelFormat, (H, W)) from the export info file, else from the configuration."""
    if not export_info_path:
        try:
            geometry = EvalGeometry.from_config(cfg)
        except PadBucketError as err:
            raise ConfigError(f"--pad_buckets: {err}") from None
        pixels, pad_hw = PixelFormat.from_config(cfg), (cfg.export_height, cfg.export_width)
    else:
        require_files({"export_info": export_info_path}, "export_info")
        try:
            pre = read_export_info(export_info_path)["preprocess"]
            pad_hw = (pre["height"], pre["width"])
            # one fixed shape: no per-image padding; export info of earlier versions has no rule
            geometry = EvalGeometry.make(pre["min_size"], pre["max_size"], [list(pad_hw)],
                                         resize_rule=pre.get("resize_rule", "torchvision"))
            pixels = PixelFormat.from_dict(pre)
        except (ValueError, PadBucketError) as err:
            raise ConfigError(f"--export_info: {err}") from None
        except KeyError as err:
            raise ConfigError(f"--export_info: {export_info_path} has no preprocess {err}") from None
    try:
        check_export_shape(*pad_hw, batch_size=1)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return geometry, pixels, pad_hw


def preprocess_dataset(coco: CocoDataset, out_dir: str, geometry: EvalGeometry, pixels: PixelFormat,
                       pad_hw: Tuple[int, int]) -> dict:
    """Write every loadable image of ``coco`` as a bin -> the info dict (see the module docstring)."""
    img_dir = os.path.join(out_dir, IMAGES_DIR)
    os.makedirs(img_dir, exist_ok=True)
    # the info goes first: a run that stops half-way leaves bins without an info file (the runners
    # refuse that), never new bins paired with an earlier run's sizes
    remove_preprocess_info(out_dir)
    stale = glob.glob(os.path.join(img_dir, "*.bin"))
    for path in stale:  # runners take every bin in the folder
        os.remove(path)
    if stale:
        logger.info("removed %d .bin files of an earlier run from %s", len(stale), img_dir)
    images, skipped, shrunk = [], [], 0
    names = iter(bin_names(len(coco.image_ids)))
    for image_id in coco.image_ids:
        try:
            image = coco.load_image(image_id)
        except DatasetError as err:
            skipped.append({"image_id": image_id, "file_name": coco.image_info(image_id)["file_name"],
                            "reason": str(err)})
            logger.warning("skipping image %d: %s", image_id, err)
            continue
        chw, meta = preprocess_image(image, geometry, pad_hw, pixels)
        shrunk += meta.resized_hw != geometry.resized_size(meta.orig_hw)
        name = next(names)
        write_input_bin(out_dir, name, chw)
        images.append({"name": name, "image_id": image_id, "file_name": coco.image_info(image_id)["file_name"],
                       "orig_hw": list(meta.orig_hw), "resized_hw": list(meta.resized_hw)})
    return {"ann_file": os.path.abspath(coco.ann_file), "img_dir": os.path.abspath(coco.img_dir),
            "input_hw": list(pad_hw), "min_size": geometry.min_size, "max_size": geometry.max_size,
            "num_images": len(images), "num_skipped": len(skipped), "num_shrunk_to_fit": shrunk,
            "images": images, "skipped": skipped}


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = load_config(argv, "Preprocess validation images into fixed-size .bin inputs of an exported FCOS.", FLAGS)
    export_info_path = cfg.export_info
    require_files(cfg, "val_img_dir", "val_ann_file")
    geometry, pixels, pad_hw = resize_settings(cfg, export_info_path)
    setup_logging()
    logger.info("input %dx%d, min_size %d, max_size %d, resize %s, %s (from %s)", *pad_hw, geometry.min_size,
                geometry.max_size, geometry.resize_rule, pixels.channel_order, export_info_path or "the configuration")
    try:
        coco = CocoDataset(cfg.val_img_dir, cfg.val_ann_file)
    except DatasetError as err:
        raise ConfigError(f"--val_ann_file: {err}") from None
    info = preprocess_dataset(coco, cfg.output_dir, geometry, pixels, pad_hw)
    write_preprocess_info(cfg.output_dir, info)
    logger.info("wrote %d inputs of 3x%dx%d to %s (%d skipped, %d shrunk to fit the export shape)",
                info["num_images"], pad_hw[0], pad_hw[1], os.path.join(cfg.output_dir, IMAGES_DIR),
                info["num_skipped"], info["num_shrunk_to_fit"])
    if info["num_shrunk_to_fit"]:
        logger.warning("%d images did not fit %dx%d at their evaluation size and were resized smaller than "
                       "eval.py would (export a shape that holds both orientations to avoid it)",
                       info["num_shrunk_to_fit"], *pad_hw)
    if not info["images"]:
        raise ConfigError(f"--val_img_dir: none of the {len(coco.image_ids)} images could be read")


if __name__ == "__main__":
    main()
