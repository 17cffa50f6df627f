"""Where FCOSInference runs for eval.py and predict.py: in MindSpore, or in onnxruntime on its
ONNX export (--runtime=onnxruntime, CPU).

Both are callables images (B, 3, H, W) float32 NumPy -> boxes (B, K, 4), scores (B, K), labels
(B, K) NumPy, the candidates that src.inference.select turns into detections, so the two runtimes
share every step before and after the network.
"""
import logging
import os
import tempfile
import time

import numpy as np
from mindspore import Tensor

from src.inference.export import export_model

logger = logging.getLogger("fcos")

RUNTIMES = ("mindspore", "onnxruntime")


class MindSporeRuntime:
    """FCOSInference run by MindSpore (compiled once per input shape in GRAPH_MODE)."""

    name = "mindspore"

    def __init__(self, infer_cell):
        self.infer_cell = infer_cell

    def __call__(self, images):
        return tuple(x.asnumpy() for x in self.infer_cell(Tensor(images)))


class OnnxRuntime:
    """FCOSInference exported to ONNX and run by onnxruntime's CPU provider.

    MindSpore exports ONNX at a fixed input shape, so every (B, 3, H, W) gets its own export and
    session, made on first use or by prepare(); the .onnx files live in a temporary folder that
    close() removes (the weights are those of infer_cell, whatever checkpoint it loaded).
    threads: onnxruntime's intra-op threads; 0 = its default (one per core).
    """

    name = "onnxruntime"

    def __init__(self, infer_cell, threads=0):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("--runtime=onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
        self._ort = onnxruntime
        self.infer_cell = infer_cell
        self.threads = threads
        self._folder = tempfile.TemporaryDirectory(prefix="fcos_onnx_")
        self._sessions = {}

    def prepare(self, shape):
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
        session = self._ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._sessions[shape] = session
        logger.info("onnxruntime %s: exported and loaded the model for input %s in %.1f s",
                    self._ort.__version__, "x".join(map(str, shape)), time.perf_counter() - start)
        return session

    def __call__(self, images):
        images = np.ascontiguousarray(images, np.float32)
        return tuple(self.prepare(images.shape).run(None, {"images": images}))

    def close(self):
        """Remove the exported files."""
        self._sessions.clear()
        self._folder.cleanup()


def make_runtime(name, infer_cell, threads=0):
    """The runtime called ``name`` (one of RUNTIMES) running infer_cell."""
    if name == "onnxruntime":
        return OnnxRuntime(infer_cell, threads)
    if name == "mindspore":
        return MindSporeRuntime(infer_cell)
    raise ValueError(f"unknown runtime '{name}'; choose one of {', '.join(RUNTIMES)}")
