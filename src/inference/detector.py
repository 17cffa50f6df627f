"""Network + in-graph decoding as one cell: what eval, prediction and export all run."""
from mindspore import nn


class FCOSInference(nn.Cell):
    """construct(images (B,3,H,W)) -> candidates boxes (B,K,4), scores (B,K), labels (B,K).

    The fixed-shape part of inference (network, scores, per-level top-k, box decoding); the
    NumPy part (threshold, clip, NMS) is src.inference.select.select_detections.
    """

    def __init__(self, network: nn.Cell, decoder: nn.Cell) -> None:
        # No prefix, so parameter names equal the bare network's (checkpoints load either way).
        super().__init__(auto_prefix=False)
        self.network = network
        self.decoder = decoder

    def construct(self, images):
        cls_logits, bbox_reg, centerness = self.network(images)
        return self.decoder(images, cls_logits, bbox_reg, centerness)
