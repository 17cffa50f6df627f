"""Export of the inference cell to MINDIR, AIR or ONNX (export.py and the benchmark's ONNX route)."""
import mindspore as ms

from src.utils.io import atomic_path

EXTENSIONS = {"MINDIR": ".mindir", "AIR": ".air", "ONNX": ".onnx"}


def export_model(infer_cell: ms.nn.Cell, inputs: ms.Tensor, path: str, file_format: str) -> None:
    """Export infer_cell at the shape of inputs to path; a failure never leaves half a model.

    ONNX gets named inputs and outputs (images -> boxes, scores, labels), as onnxruntime users
    address them. A cell with custom ops (convolutions, GroupNorm) is refused (ValueError): its file would
    name a library on this machine (the record accelerate leaves, src/ops/backend.py); build it
    with builder.build_model(cfg, portable=True).
    """
    native = [name for name, cell in infer_cell.cells_and_names()
              if getattr(cell, "backend", {"kind": "portable"})["kind"] != "portable"]
    if native:
        raise ValueError(f"export needs MindSpore's own kernels, {native[0] or 'the network'} runs on the CPU native ops "
                         "(build the network with portable=True)")
    with atomic_path(path) as tmp:
        if file_format == "ONNX":
            ms.onnx.export(infer_cell, inputs, file_name=tmp, input_names=["images"],
                           output_names=["boxes", "scores", "labels"])
        else:
            ms.export(infer_cell, inputs, file_name=tmp, file_format=file_format)
