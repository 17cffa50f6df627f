"""The exported model's file contract (bins in, bins out) and its Python runner.

The contract, shared by preprocess.py, this runner, ascend310_infer/ (C++) and postprocess.py:

- preprocess.py writes ``<data>/images/<name>.bin``: one image, raw float32 (3, H, W) at the
  export shape, C order; names are zero-padded indices of equal width, so sorting the names gives
  the order of ``<data>/preprocess_info.json``, which maps every name to its image.
- a runner feeds the bins in sorted order, ``batch`` images per call (the exported batch size; a
  last incomplete batch is filled with zeros whose outputs are dropped), and writes per image
  ``<result>/<name>_<i>.bin`` for output i of the graph: 0 boxes (K, 4) float32, 1 scores (K,)
  float32, 2 labels (K,) int32 (FCOSInference's candidates), plus ``<result>/infer_time.json``.

    python -m src.infer_mindir --mindir_path=fcos.mindir --input_path=DATA/images \\
        --result_path=RESULT [--device_target=CPU] [--device_id=0]
"""
import argparse
import glob
import json
import os
import time

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from src.engine.context import init_context

INFO_FILE = "preprocess_info.json"
IMAGES_DIR = "images"
OUTPUT_DTYPES = (np.float32, np.float32, np.int32)  # boxes, scores, labels
TIME_FILE = "infer_time.json"
EXPORT_INFO_KEYS = ("input", "outputs", "preprocess", "postprocess")
SIZE_MULTIPLE = 32  # the backbone's coarsest stride: exported H and W are multiples of it
_MINDIR_FLOAT32 = 1  # TensorProto.DataType FLOAT in mind_ir.proto


def check_export_shape(height, width, batch_size):
    """ValueError naming the key unless H, W are positive multiples of 32 and the batch positive."""
    for key, value in (("export_height", height), ("export_width", width)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"--{key}={value}: must be a positive multiple of {SIZE_MULTIPLE}")
    if batch_size <= 0:
        raise ValueError(f"--export_batch_size={batch_size}: must be positive")


def read_export_info(path):
    """export.py's <file_name>.json -> dict; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err})") from None
    missing = [key for key in EXPORT_INFO_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{path} is not an export.py .json file (it lacks '{missing[0]}')")
    return info


def bin_names(count):
    """Names of ``count`` input bins: equal-width zero-padded indices, so sorted == numbered."""
    width = max(6, len(str(count - 1)))
    return [f"{i:0{width}d}" for i in range(count)]


def result_path(result_dir, name, index):
    """Path of output ``index`` (0 boxes, 1 scores, 2 labels) of input bin ``name``."""
    return os.path.join(result_dir, f"{name}_{index}.bin")


def read_result(result_dir, name, num_candidates):
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


def mindir_input_shape(mindir_path):
    """(B, 3, H, W) of the single float32 input of a MindIR file (what Model::GetInputs gives in C++)."""
    from mindspore.train.mind_ir_pb2 import ModelProto  # the protobuf schema of MindIR files

    model = ModelProto()
    with open(mindir_path, "rb") as f:
        model.ParseFromString(f.read())
    inputs = [t for i in model.graph.input for t in i.tensor]
    if len(inputs) != 1 or inputs[0].data_type != _MINDIR_FLOAT32 or len(inputs[0].dims) != 4:
        raise ValueError(f"{mindir_path}: expected one float32 (B, 3, H, W) input, found "
                         f"{[(list(t.dims), t.data_type) for t in inputs]}")
    return tuple(int(d) for d in inputs[0].dims)


def list_input_bins(input_dir, image_bytes):
    """Sorted *.bin paths of input_dir; ValueError when there is none or one has the wrong size."""
    paths = sorted(glob.glob(os.path.join(input_dir, "*.bin")))
    if not paths:
        raise ValueError(f"no .bin input files in {input_dir}")
    for path in paths:
        if os.path.getsize(path) != image_bytes:
            raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the model input needs "
                             f"{image_bytes} per image (preprocessed at another export shape?)")
    return paths


def check_outputs(outputs, mindir_path):
    """ValueError unless the graph returned FCOSInference's three outputs with their dtypes (the C++
    program writes raw bytes, so a dtype change would silently break postprocess.py)."""
    dtypes = tuple(out.asnumpy().dtype for out in outputs) if isinstance(outputs, (tuple, list)) else ()
    if dtypes != tuple(np.dtype(d) for d in OUTPUT_DTYPES):
        raise ValueError(f"{mindir_path}: expected outputs boxes float32, scores float32, labels int32, "
                         f"got {[str(d) for d in dtypes] or type(outputs).__name__}")


def run_mindir(mindir_path, input_dir, result_dir):
    """Run a MindIR over the input bins and write the result bins (see the module docstring).

    Returns {'images', 'batch_size', 'mean_ms_per_image', 'mean_ms_per_batch'}; the time is the
    graph call including the copy back to host, after one warm-up call (C++ builds the model before
    timing too).
    """
    batch, *chw = mindir_input_shape(mindir_path)
    paths = list_input_bins(input_dir, int(np.prod(chw)) * 4)
    graph = nn.GraphCell(ms.load(mindir_path))
    buffer = np.zeros((batch, *chw), np.float32)
    check_outputs(graph(Tensor(buffer)), mindir_path)
    os.makedirs(result_dir, exist_ok=True)
    elapsed = 0.0
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        buffer[len(chunk):] = 0.0
        for slot, path in enumerate(chunk):
            buffer[slot] = np.fromfile(path, np.float32).reshape(chw)
        tic = time.perf_counter()
        outputs = [out.asnumpy() for out in graph(Tensor(buffer))]
        elapsed += time.perf_counter() - tic
        for slot, path in enumerate(chunk):
            name = os.path.splitext(os.path.basename(path))[0]
            for index, output in enumerate(outputs):
                output[slot].tofile(result_path(result_dir, name, index))
    batches = -(-len(paths) // batch)
    timing = {"images": len(paths), "batch_size": batch,
              "mean_ms_per_image": 1000.0 * elapsed / len(paths),
              "mean_ms_per_batch": 1000.0 * elapsed / batches}
    with open(os.path.join(result_dir, TIME_FILE), "w", encoding="utf-8") as f:
        json.dump(timing, f)
    return timing


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run an exported FCOS MindIR over preprocessed .bin inputs.")
    parser.add_argument("--mindir_path", required=True, help="exported .mindir file")
    parser.add_argument("--input_path", required=True, help="folder of input .bin files (preprocess.py's images/)")
    parser.add_argument("--result_path", required=True, help="folder for the output .bin files")
    parser.add_argument("--device_target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    parser.add_argument("--device_id", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, path, check in (("--mindir_path", args.mindir_path, os.path.isfile),
                              ("--input_path", args.input_path, os.path.isdir)):
        if not check(path):
            parser.error(f"{flag}: not found: {path}")
    init_context(args.device_target, "GRAPH", args.device_id, distributed=False)
    try:
        timing = run_mindir(args.mindir_path, args.input_path, args.result_path)
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")
    print(f"NN inference cost average time: {timing['mean_ms_per_image']:.3f} ms per image "
          f"({timing['images']} images, batch {timing['batch_size']})")


if __name__ == "__main__":
    main()
