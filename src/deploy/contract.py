"""Every file that crosses a process boundary in deployment, with its one writer and one reader.

The flow: export.py writes the model and ``<file_name>.json`` (the export info); preprocess.py
writes ``<data>/images/<name>.bin`` and ``<data>/preprocess_info.json``; a runner (the Python
one in src/deploy/runner.py, or the C++ program in ascend310_infer/, which follows the same
rules) writes ``<result>/<name>_<i>.bin`` and ``<result>/infer_time.json``; postprocess.py reads
all of it.

- Input bin: one image, raw float32 (3, H, W) at the export shape, C order. Names are
  zero-padded indices of equal width, so sorting the names gives the order of the images in
  preprocess_info.json.
- A runner feeds the bins in sorted order, B images per call (B = the exported batch size; a last
  incomplete batch is filled with zeros whose outputs are dropped).
- Result bins, per image and output i: 0 boxes (K, 4) float32, 1 scores (K,) float32, 2 labels
  (K,) int32 (FCOSInference's candidates), raw, C order.

Readers raise ValueError naming the file; entry points turn it into a one-line ConfigError.
"""
import glob
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from src.geometry import ceil_div
from src.utils.io import write_json_atomic

INFO_FILE = "preprocess_info.json"
IMAGES_DIR = "images"
TIME_FILE = "infer_time.json"
OUTPUT_NAMES = ("boxes", "scores", "labels")
OUTPUT_DTYPES = (np.float32, np.float32, np.int32)
SIZE_MULTIPLE = 32  # the backbone's coarsest stride: exported H and W are multiples of it
EXPORT_INFO_KEYS = ("input", "outputs", "preprocess", "postprocess", "model")
PREPROCESS_INFO_KEYS = ("input_hw", "num_images", "num_skipped", "images")
IMAGE_ENTRY_KEYS = ("name", "image_id", "orig_hw", "resized_hw")


def check_export_shape(height: int, width: int, batch_size: int) -> None:
    """ValueError naming the key unless H, W are positive multiples of 32 and the batch positive."""
    for key, value in (("export_height", height), ("export_width", width)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"--{key}={value}: must be a positive multiple of {SIZE_MULTIPLE}")
    if batch_size <= 0:
        raise ValueError(f"--export_batch_size={batch_size}: must be positive")


def _read_json(path, keys, what):
    """JSON object at path holding every key in keys; ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err})") from None
    missing = [key for key in keys if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{path} is not {what} (it lacks '{missing[0]}')")
    return info


# ---- export info: <file_name>.json next to the model ----

def export_info(model_file: str, file_format: str, ckpt_file: str, input_shape: Sequence[int], num_candidates: int,
                preprocess: Dict[str, Any], postprocess: Dict[str, Any], model: Dict[str, Any]) -> Dict[str, Any]:
    """The export info dict.

    Args:
        input_shape: (B, 3, H, W) of the exported graph; num_candidates: K per image.
        preprocess: {'min_size', 'max_size', 'height', 'width', 'resize_rule'} of preprocess_image and
            its PixelFormat.as_dict().
        postprocess: select_detections keyword arguments.
        model: {'backbone', 'class_num', 'strides', ...} for the reader's checks.
    """
    batch = input_shape[0]
    shapes = ([batch, num_candidates, 4], [batch, num_candidates], [batch, num_candidates])
    return {
        "model_file": os.path.basename(model_file), "file_format": file_format,
        "ckpt_file": os.path.abspath(ckpt_file),
        "input": {"name": "images", "shape": list(input_shape), "dtype": "float32"},
        "outputs": [{"name": name, "shape": shape, "dtype": np.dtype(dtype).name}
                    for name, shape, dtype in zip(OUTPUT_NAMES, shapes, OUTPUT_DTYPES)],
        "preprocess": preprocess, "postprocess": postprocess, "model": model,
    }


def write_export_info(path: str, info: Dict[str, Any]) -> None:
    write_json_atomic(path, info)


def read_export_info(path: str) -> Dict[str, Any]:
    """export.py's <file_name>.json -> dict; ValueError naming the file when it is not one."""
    return _read_json(path, EXPORT_INFO_KEYS, "an export.py .json file")


def export_candidates(info: Dict[str, Any]) -> int:
    """K, the candidates per image of the export's outputs."""
    return info["outputs"][1]["shape"][1]


# ---- preprocessed inputs: <data>/images/<name>.bin and <data>/preprocess_info.json ----

def bin_names(count: int) -> List[str]:
    """Names of ``count`` input bins: equal-width zero-padded indices, so sorted == numbered."""
    width = max(6, len(str(count - 1)))
    return [f"{i:0{width}d}" for i in range(count)]


def input_bin_path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, IMAGES_DIR, f"{name}.bin")


def write_input_bin(data_dir: str, name: str, chw: np.ndarray) -> None:
    """One preprocessed (3, H, W) float32 image."""
    chw.astype(np.float32, copy=False).tofile(input_bin_path(data_dir, name))


def read_input_bin(path: str, chw: Sequence[int]) -> np.ndarray:
    """One preprocessed image of shape chw (3, H, W) back as float32."""
    return np.fromfile(path, np.float32).reshape(chw)


def list_input_bins(input_dir: str, image_bytes: int) -> List[str]:
    """Sorted *.bin paths of input_dir; ValueError when there is none or one has the wrong size."""
    paths = sorted(glob.glob(os.path.join(input_dir, "*.bin")))
    if not paths:
        raise ValueError(f"no .bin input files in {input_dir}")
    for path in paths:
        if os.path.getsize(path) != image_bytes:
            raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the model input needs "
                             f"{image_bytes} per image (preprocessed at another export shape?)")
    return paths


def write_preprocess_info(data_dir: str, info: Dict[str, Any]) -> None:
    write_json_atomic(os.path.join(data_dir, INFO_FILE), info)


def remove_preprocess_info(data_dir: str) -> None:
    """Remove <data>/preprocess_info.json if there (before its bins are replaced)."""
    path = os.path.join(data_dir, INFO_FILE)
    if os.path.exists(path):
        os.remove(path)


def read_preprocess_info(path: str) -> Dict[str, Any]:
    """preprocess.py's preprocess_info.json -> dict; ValueError naming the file when it is not one."""
    info = _read_json(path, PREPROCESS_INFO_KEYS, "a preprocess.py preprocess_info.json")
    for entry in info["images"]:
        missing = [key for key in IMAGE_ENTRY_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ValueError(f"{path}: an image entry lacks '{missing[0]}'")
    return info


# ---- results: <result>/<name>_<i>.bin and <result>/infer_time.json ----

def result_path(result_dir: str, name: str, index: int) -> str:
    """Path of output ``index`` (0 boxes, 1 scores, 2 labels) of input bin ``name``."""
    return os.path.join(result_dir, f"{name}_{index}.bin")


def write_result(result_dir: str, name: str, outputs: Sequence[np.ndarray]) -> None:
    """One image's outputs (boxes (K, 4), scores (K,), labels (K,)) in the contract's dtypes."""
    for index, (output, dtype) in enumerate(zip(outputs, OUTPUT_DTYPES)):
        np.ascontiguousarray(output, dtype=dtype).tofile(result_path(result_dir, name, index))


def read_result(result_dir: str, name: str, num_candidates: int) -> Tuple[np.ndarray, ...]:
    """One image's outputs -> boxes (K, 4) float32, scores (K,) float32, labels (K,) int32.

    Raises ValueError naming the file when it is missing or not K candidates long.
    """
    arrays = []
    for index, (dtype, width) in enumerate(zip(OUTPUT_DTYPES, (4, 1, 1))):
        path = result_path(result_dir, name, index)
        if not os.path.isfile(path):
            raise ValueError(f"result file not found: {path}")
        array = np.fromfile(path, dtype=dtype)
        if array.size != num_candidates * width:
            raise ValueError(f"{path} holds {array.size} values, expected {num_candidates * width} "
                             f"(was it made by another export?)")
        arrays.append(array.reshape(num_candidates, 4) if width == 4 else array)
    return tuple(arrays)


def write_infer_time(result_dir: str, images: int, batch_size: int, seconds: float) -> Dict[str, Any]:
    """infer_time.json: the mean model time per image and per batch call."""
    batches = ceil_div(images, batch_size)
    timing = {"images": images, "batch_size": batch_size, "mean_ms_per_image": 1000.0 * seconds / images,
              "mean_ms_per_batch": 1000.0 * seconds / batches}
    write_json_atomic(os.path.join(result_dir, TIME_FILE), timing)
    return timing


def read_infer_time(result_dir: str) -> Optional[Dict[str, Any]]:
    """infer_time.json of a result folder -> dict, or None when the runner wrote none."""
    path = os.path.join(result_dir, TIME_FILE)
    if not os.path.isfile(path):
        return None
    return _read_json(path, ("images", "mean_ms_per_image"), "an infer_time.json")
