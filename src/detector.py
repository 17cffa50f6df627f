"""Network + in-graph decoding as one cell: what eval, prediction and export all run."""
import os

import mindspore as ms
from mindspore import nn


class FCOSInference(nn.Cell):
    """construct(images (B,3,H,W)) -> candidates boxes (B,K,4), scores (B,K), labels (B,K).

    The fixed-shape part of inference (network, scores, per-level top-k, box decoding); the
    NumPy part (threshold, clip, NMS) is src.postprocess.select_detections.
    """

    def __init__(self, network, decoder):
        # No prefix, so parameter names equal the bare network's (checkpoints load either way).
        super().__init__(auto_prefix=False)
        self.network = network
        self.decoder = decoder

    def construct(self, images):
        cls_logits, bbox_reg, centerness = self.network(images)
        return self.decoder(images, cls_logits, bbox_reg, centerness)


def export_model(infer_cell, inputs, path, file_format):
    """Export to ``path`` through a temporary file, so that a failure never leaves half a model."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        if file_format == "ONNX":
            ms.onnx.export(infer_cell, inputs, file_name=tmp, input_names=["images"],
                           output_names=["boxes", "scores", "labels"])
        else:
            ms.export(infer_cell, inputs, file_name=tmp, file_format=file_format)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
