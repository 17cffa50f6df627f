"""Static 8-bit post-training quantization of the exported FCOS for onnxruntime on CPUs
(--runtime=onnxruntime_int8).

The float ONNX export (src.inference.export; the head unstacked, so that its output convolutions
keep their weights' names) is pre-processed by onnxruntime's quant_pre_process (shape inference and
graph optimisation: BatchNorms folded into their convolutions), lifted to opset 13, then quantized
in QDQ form: weights int8 per output channel, activations uint8 per tensor with ranges calibrated
(min/max) on real images preprocessed exactly as for evaluation. What stays float, and why
(docs/int8.md has the measurements):
- the head's output convolutions (class logits, boxes, centreness): their outputs are the scores
  and distances themselves, where an 8-bit step shows directly in every detection;
- the decoding after them (sigmoid, sqrt, top-k, gathers): no arithmetic worth quantizing.

The calibrated model is kept in a cache folder (beside the checkpoint) under a digest of the float
model's computation (model_digest: weights, graph and input shape, names ignored), the calibration
set and these settings, so a second run loads it in seconds; a run only ever adds files there.
"""
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

from src.utils.io import atomic_path

logger = logging.getLogger("fcos")

# Quantized operator types: the convolutions, and the ops between them that can run on 8-bit data
# directly so that no dequantize/quantize pair sits between two convolutions.
QUANTIZED_OPS = ("Conv", "Relu", "Add", "MaxPool", "Resize", "Concat")
# Convolutions kept float, by the parameter names of their weights.
FLOAT_CONVS = ("head.cls_logits", "head.bbox_reg", "head.centerness")
SETTINGS = {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor, min/max",
            "ops": QUANTIZED_OPS, "float": FLOAT_CONVS, "version": 1}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibration inputs: ``batches(shape)`` yields float32 batches of ``shape`` (B, 3, H, W),
    preprocessed as the model's inputs; ``identity`` names them for the cache digest (file names,
    sizes and times of the images and the preprocessing, or how random inputs were drawn)."""
    identity: str
    batches: Callable[[tuple], Iterator[np.ndarray]]


def model_digest(model: Any) -> str:
    """A digest of an onnx ModelProto's computation - operators, attributes, wiring, input shapes and
    weights - that ignores names: MindSpore numbers the names of every export anew, so two exports of
    the same weights and graph differ in their bytes but not here."""
    h = hashlib.sha256()
    ids = {}

    def wire(name: str) -> None:
        h.update(str(ids.setdefault(name, len(ids)) if name else -1).encode())

    initializers = {init.name: init for init in model.graph.initializer}
    for value in model.graph.input:
        wire(value.name)
        h.update(str([d.dim_value for d in value.type.tensor_type.shape.dim]).encode())
    for node in model.graph.node:
        h.update(node.op_type.encode())
        for attribute in node.attribute:
            attribute = type(attribute).FromString(attribute.SerializeToString())
            attribute.t.name = ""  # a Constant's tensor carries a name too
            h.update(attribute.SerializeToString())
        for name in node.input:
            if name in initializers and name not in ids:
                tensor = type(initializers[name]).FromString(initializers[name].SerializeToString())
                tensor.name = ""
                h.update(tensor.SerializeToString())
            wire(name)
        for name in node.output:
            wire(name)
    return h.hexdigest()


def _digest(float_model: str, calibration: Calibration) -> str:
    import onnx
    import onnxruntime
    h = hashlib.sha256(model_digest(onnx.load(float_model)).encode())
    h.update(calibration.identity.encode())
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    h.update(onnxruntime.__version__.encode())
    return h.hexdigest()[:16]


def float_conv_nodes(model: Any) -> list:
    """Names of the Conv nodes of an onnx ModelProto that stay float (FLOAT_CONVS; the optimiser may
    have renamed a weight it fused with the level's scale, e.g. ConvMulFusion_W_head.bbox_reg.weight)."""
    return [node.name for node in model.graph.node
            if node.op_type == "Conv" and any(name in node.input[1] for name in FLOAT_CONVS)]


def quantize(float_model: str, out_path: str, calibration: Calibration, shape: tuple) -> None:
    """Write the 8-bit model of float_model (input ``images`` of ``shape``) to out_path, atomically."""
    try:
        import onnx
        import onnx.version_converter
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)
    except ImportError as err:
        raise ImportError(f"--runtime=onnxruntime_int8 needs onnxruntime's quantization tools and the onnx "
                          f"package (pip install -r requirements.txt): {err}") from None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.batches(shape))

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="fcos_int8_") as work:
        prepared = os.path.join(work, "prepared.onnx")
        quant_pre_process(float_model, prepared, skip_symbolic_shape=True)
        model = onnx.load(prepared)
        if min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
            # per-channel DequantizeLinear (its axis) needs opset 13; MindSpore exports opset 11
            model = onnx.version_converter.convert_version(model, 13)
            onnx.save(model, prepared)
        keep_float = float_conv_nodes(model)
        with atomic_path(out_path) as tmp:
            quantize_static(prepared, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=keep_float)


def quantized_model(float_model: str, calibration: Calibration, shape: tuple, cache_dir: str) -> str:
    """The cached 8-bit model of float_model for inputs of ``shape``, made (quantize) when absent ->
    its path."""
    name = "fcos_int8_" + "x".join(map(str, shape)) + f"_{_digest(float_model, calibration)}.onnx"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        logger.info("int8 model for %s from the cache: %s", "x".join(map(str, shape)), path)
        return path
    start = time.perf_counter()
    quantize(float_model, path, calibration, shape)
    logger.info("int8 model for %s calibrated and written in %.1f s: %s", "x".join(map(str, shape)),
                time.perf_counter() - start, path)
    return path
