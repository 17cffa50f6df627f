"""Where FCOSInference runs for eval.py and predict.py: in MindSpore, or in onnxruntime on its
ONNX export (--runtime=onnxruntime, CPU), float or quantized to 8 bits (--runtime=onnxruntime_int8,
src.inference.quantize).

Both are callables images (B, 3, H, W) float32 NumPy -> boxes (B, K, 4), scores (B, K), labels
(B, K) NumPy, the candidates that src.inference.select turns into detections, so the two runtimes
share every step before and after the network.
"""
import logging
import os
import tempfile
import time
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor, nn

from src.inference.export import export_model
from src.inference.quantize import Calibration, quantized_model

logger = logging.getLogger("fcos")

RUNTIMES = ("mindspore", "onnxruntime", "onnxruntime_int8")


class MindSporeRuntime:
    """FCOSInference run by MindSpore (compiled once per input shape in GRAPH_MODE)."""

    name = "mindspore"

    def __init__(self, infer_cell: nn.Cell) -> None:
        self.infer_cell = infer_cell

    def __call__(self, images: np.ndarray) -> Tuple[np.ndarray, ...]:
        return tuple(x.asnumpy() for x in self.infer_cell(Tensor(images)))


class OnnxRuntime:
    """FCOSInference exported to ONNX and run by onnxruntime's CPU provider.

    MindSpore exports ONNX at a fixed input shape, so every (B, 3, H, W) gets its own export and
    session, made on first use or by prepare(); the .onnx files live in a temporary folder that
    close() removes (the weights are those of infer_cell, whatever checkpoint it loaded).
    threads: onnxruntime's intra-op threads; 0 = its default (one per core).
    """

    name = "onnxruntime"

    def __init__(self, infer_cell: nn.Cell, threads: int = 0) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("--runtime=onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
        self._ort = onnxruntime
        self.infer_cell = infer_cell
        self.threads = threads
        self._folder = tempfile.TemporaryDirectory(prefix="fcos_onnx_")
        self._sessions = {}

    def prepare(self, shape: Sequence[int]) -> Any:
        """Export and load the model for input shape (B, 3, H, W) unless done already."""
        shape = tuple(int(d) for d in shape)
        if shape in self._sessions:
            return self._sessions[shape]
        start = time.perf_counter()
        self.infer_cell.set_train(False)
        path = os.path.join(self._folder.name, "fcos_" + "x".join(map(str, shape)) + ".onnx")
        export_model(self.infer_cell, Tensor(np.zeros(shape, np.float32)), path, "ONNX")
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        session = self._ort.InferenceSession(self.model_for(path, shape), options, providers=["CPUExecutionProvider"])
        self._sessions[shape] = session
        logger.info("onnxruntime %s: exported and loaded the model for input %s in %.1f s",
                    self._ort.__version__, "x".join(map(str, shape)), time.perf_counter() - start)
        return session

    def model_for(self, float_model: str, shape: Tuple[int, ...]) -> str:
        """The model file a session runs for the float export at float_model: that file."""
        return float_model

    def __call__(self, images: np.ndarray) -> Tuple[np.ndarray, ...]:
        images = np.ascontiguousarray(images, np.float32)
        return tuple(self.prepare(images.shape).run(None, {"images": images}))

    def close(self) -> None:
        """Remove the exported files."""
        self._sessions.clear()
        self._folder.cleanup()


class OnnxInt8Runtime(OnnxRuntime):
    """OnnxRuntime on the 8-bit model of each export (src.inference.quantize), calibrated on
    ``calibration`` and kept in cache_dir."""

    name = "onnxruntime_int8"

    def __init__(self, infer_cell: nn.Cell, calibration: Calibration, cache_dir: str, threads: int = 0) -> None:
        super().__init__(infer_cell, threads)
        # unstacked, the head's output convolutions keep their weights' names in ONNX (what stays float)
        infer_cell.network.head.set_stacking(False)
        self.calibration = calibration
        self.cache_dir = cache_dir

    def model_for(self, float_model: str, shape: Tuple[int, ...]) -> str:
        return quantized_model(float_model, self.calibration, shape, self.cache_dir)


def make_runtime(name: str, infer_cell: nn.Cell, threads: int = 0, calibration: Optional[Calibration] = None,
                 cache_dir: Optional[str] = None) -> Union[MindSporeRuntime, OnnxRuntime]:
    """The runtime called ``name`` (one of RUNTIMES) running infer_cell; onnxruntime_int8 needs the
    calibration (src.inference.quantize.Calibration) and the folder of its cached models."""
    if name == "onnxruntime":
        return OnnxRuntime(infer_cell, threads)
    if name == "onnxruntime_int8":
        return OnnxInt8Runtime(infer_cell, calibration, cache_dir, threads)
    if name == "mindspore":
        return MindSporeRuntime(infer_cell)
    raise ValueError(f"unknown runtime '{name}'; choose one of {', '.join(RUNTIMES)}")
