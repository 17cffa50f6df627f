"""The Python runner of an exported MindIR: input bins in, result bins out, by the file contract
of src/deploy/contract.py (the same one ascend310_infer/ follows in C++).

    python -m src.deploy.runner --mindir_path=fcos.mindir --input_path=DATA/images \\
        --result_path=RESULT [--device_target=CPU] [--device_id=0]
"""
import argparse
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from src.deploy.contract import OUTPUT_DTYPES, list_input_bins, read_input_bin, write_infer_time, write_result
from src.utils.context import init_context

_MINDIR_FLOAT32 = 1  # TensorProto.DataType FLOAT in mind_ir.proto


def mindir_input_shape(mindir_path: str) -> Tuple[int, ...]:
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


def check_outputs(outputs: Any, mindir_path: str) -> None:
    """ValueError unless the graph returned FCOSInference's three outputs with their dtypes (the C++
    program writes raw bytes, so a dtype change would silently break postprocess.py)."""
    dtypes = tuple(out.asnumpy().dtype for out in outputs) if isinstance(outputs, (tuple, list)) else ()
    if dtypes != tuple(np.dtype(d) for d in OUTPUT_DTYPES):
        raise ValueError(f"{mindir_path}: expected outputs boxes float32, scores float32, labels int32, "
                         f"got {[str(d) for d in dtypes] or type(outputs).__name__}")


def run_mindir(mindir_path: str, input_dir: str, result_dir: str) -> Dict[str, Any]:
    """Run a MindIR over the input bins and write the result bins (see src/deploy/contract.py).

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
            buffer[slot] = read_input_bin(path, chw)
        tic = time.perf_counter()
        outputs = [out.asnumpy() for out in graph(Tensor(buffer))]
        elapsed += time.perf_counter() - tic
        for slot, path in enumerate(chunk):
            name = os.path.splitext(os.path.basename(path))[0]
            write_result(result_dir, name, [output[slot] for output in outputs])
    return write_infer_time(result_dir, len(paths), batch, elapsed)


def main(argv: Optional[Sequence[str]] = None) -> None:
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
